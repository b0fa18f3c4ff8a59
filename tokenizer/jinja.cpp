#include "tokenizer/jinja.h"

#include <utf8proc.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <ctime>
#include <functional>
#include <iterator>
#include <map>

namespace lorafit::jinja {

namespace {

// Bounds that keep a hostile or broken template from running away.
constexpr size_t kMaxOutput = size_t{64} << 20;  // bytes of rendered text or of one string
constexpr size_t kMaxSteps = 20'000'000;         // statements, expressions and loop turns
constexpr int kMaxDepth = 200;                   // nesting of expressions and statements
constexpr int kMaxCalls = 100;                   // nested macro calls
constexpr int64_t kMaxRange = int64_t{1} << 22;  // items of one range()

// The filters and tests the renderer computes; jinja2 refuses any other name when it compiles a
// template, and so does the parser here.
const char* const kFilters[] = {
    "abs",     "attr",   "capitalize", "count",  "d",          "default",  "e",          "escape",
    "first",   "float",  "indent",     "int",    "items",      "join",     "last",       "length",
    "list",    "lower",  "map",        "max",    "min",        "reject",   "rejectattr", "replace",
    "reverse", "round",  "safe",       "select", "selectattr", "sort",     "string",     "sum",
    "title",   "tojson", "trim",       "unique", "upper",      "wordcount"};
const char* const kTests[] = {
    "defined",  "undefined", "none",        "boolean", "true",        "false",
    "integer",  "float",     "number",      "string",  "mapping",     "sequence",
    "iterable", "callable",  "odd",         "even",    "divisibleby", "equalto",
    "eq",       "==",        "ne",          "!=",      "lt",          "lessthan",
    "<",        "gt",        "greaterthan", ">",       "le",          "<=",
    "ge",       ">=",        "in",          "sameas",  "lower",       "upper"};

bool known(const char* const* names, size_t n, const std::string& name) {
  return std::find_if(names, names + n, [&](const char* k) { return name == k; }) != names + n;
}

// ---------------------------------------------------------------------------------------------
// Values: Python's, as far as templates see them. Lists and dicts are shared, as in Python.

struct Value;
struct Object;
struct Args;
using ValueList = std::vector<Value>;
using Function = std::function<Value(Args&)>;

struct Value {
  enum Kind { Undefined, None, Bool, Int, Float, String, List, Dict, Func };
  Kind kind = Undefined;
  bool b = false;
  bool tuple = false;  // a List that Python would print as a tuple
  int64_t i = 0;
  double f = 0;
  std::string s;  // a String; for Undefined, why the value is undefined
  std::shared_ptr<ValueList> list;
  std::shared_ptr<Object> dict;
  std::shared_ptr<Function> fn;

  static Value undefined(std::string why) {
    Value v;
    v.s = std::move(why);
    return v;
  }
  static Value none() { return with(None); }
  static Value boolean(bool x) {
    auto v = with(Bool);
    v.b = x;
    return v;
  }
  static Value integer(int64_t x) {
    auto v = with(Int);
    v.i = x;
    return v;
  }
  static Value number(double x) {
    auto v = with(Float);
    v.f = x;
    return v;
  }
  static Value string(std::string x) {
    auto v = with(String);
    v.s = std::move(x);
    return v;
  }
  static Value of_list(ValueList items, bool is_tuple = false) {
    auto v = with(List);
    v.list = std::make_shared<ValueList>(std::move(items));
    v.tuple = is_tuple;
    return v;
  }
  static Value of_dict(std::shared_ptr<Object> d) {
    auto v = with(Dict);
    v.dict = std::move(d);
    return v;
  }
  static Value function(Function f) {
    auto v = with(Func);
    v.fn = std::make_shared<Function>(std::move(f));
    return v;
  }
  bool numeric() const { return kind == Int || kind == Float || kind == Bool; }
  double as_double() const { return kind == Float ? f : static_cast<double>(as_int()); }
  int64_t as_int() const { return kind == Bool ? b : i; }

 private:
  static Value with(Kind k) {
    Value v;
    v.kind = k;
    return v;
  }
};

// A dict (insertion-ordered, as Python's) or a namespace() object.
struct Object {
  std::vector<std::pair<std::string, Value>> items;
  bool is_namespace = false;

  const Value* get(const std::string& key) const {
    for (const auto& [k, v] : items)
      if (k == key) return &v;
    return nullptr;
  }
  void set(const std::string& key, Value v) {
    for (auto& [k, old] : items) {
      if (k == key) {
        old = std::move(v);
        return;
      }
    }
    items.emplace_back(key, std::move(v));
  }
};

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  int line = 0;
};

Value from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return Value::none();
    case nlohmann::ordered_json::value_t::boolean:
      return Value::boolean(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return Value::integer(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned:
      return j.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)
                 ? Value::number(static_cast<double>(j.get<uint64_t>()))
                 : Value::integer(static_cast<int64_t>(j.get<uint64_t>()));
    case nlohmann::ordered_json::value_t::number_float:
      return Value::number(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return Value::string(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      ValueList items;
      for (const auto& x : j) items.push_back(from_json(x));
      return Value::of_list(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      auto d = std::make_shared<Object>();
      for (const auto& [k, x] : j.items()) d->items.emplace_back(k, from_json(x));
      return Value::of_dict(std::move(d));
    }
    default:
      return Value::none();
  }
}

// ---------------------------------------------------------------------------------------------
// UTF-8: Python indexes strings by code point.

std::vector<int32_t> code_points(const std::string& s) {
  std::vector<int32_t> out;
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  utf8proc_ssize_t at = 0, n = static_cast<utf8proc_ssize_t>(s.size());
  while (at < n) {
    utf8proc_int32_t cp = 0;
    auto len = utf8proc_iterate(p + at, n - at, &cp);
    if (len <= 0) cp = static_cast<unsigned char>(s[at]), len = 1;  // a stray byte stays one
    out.push_back(cp);
    at += len;
  }
  return out;
}

std::string from_code_points(const std::vector<int32_t>& cps, size_t begin, size_t end) {
  std::string out;
  for (size_t k = begin; k < end; ++k) {
    utf8proc_uint8_t buf[4];
    const auto n = utf8proc_encode_char(cps[k], buf);
    out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
  }
  return out;
}

bool ascii(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return (c & 0x80) == 0; });
}

size_t str_length(const std::string& s) {
  return ascii(s) ? s.size() : code_points(s).size();
}

// Python's str.isspace for one code point: category Zs or bidirectional class WS, B or S.
bool py_space(int32_t cp) {
  if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x1f);
  const auto* p = utf8proc_get_property(cp);
  return p->category == UTF8PROC_CATEGORY_ZS || p->bidi_class == UTF8PROC_BIDI_CLASS_WS ||
         p->bidi_class == UTF8PROC_BIDI_CLASS_B || p->bidi_class == UTF8PROC_BIDI_CLASS_S;
}

std::string map_case(const std::string& s, bool upper) {
  auto cps = code_points(s);
  for (auto& c : cps) c = upper ? utf8proc_toupper(c) : utf8proc_tolower(c);
  return from_code_points(cps, 0, cps.size());
}

// ---------------------------------------------------------------------------------------------
// Python's str() and repr().

std::string float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x < 0 ? "-inf" : "inf";
  char buf[40];
  int digits = 1;
  for (; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*e", digits - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  // buf: [-]d.ddde[+-]XX, the shortest that reads back as x
  std::string s = buf;
  const bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  const auto e = s.find('e');
  const int exp = std::atoi(s.c_str() + e + 1);
  std::string mant = s.substr(0, e);
  mant.erase(std::remove(mant.begin(), mant.end(), '.'), mant.end());
  std::string out;
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + mant;
    } else if (static_cast<size_t>(exp) + 1 >= mant.size()) {
      out = mant + std::string(static_cast<size_t>(exp) + 1 - mant.size(), '0') + ".0";
    } else {
      out = mant.substr(0, static_cast<size_t>(exp) + 1) + "." +
            mant.substr(static_cast<size_t>(exp) + 1);
    }
  } else {
    out = mant.substr(0, 1) + (mant.size() > 1 ? "." + mant.substr(1) : "") + "e" +
          (exp < 0 ? "-" : "+") + (std::abs(exp) < 10 ? "0" : "") + std::to_string(std::abs(exp));
  }
  return (neg ? "-" : "") + out;
}

std::string str_repr(const std::string& s) {
  const char q = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\' || c == q) {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + q;
}

std::string to_str(const Value& v, bool repr = false) {
  switch (v.kind) {
    case Value::Undefined:
      return "";
    case Value::None:
      return "None";
    case Value::Bool:
      return v.b ? "True" : "False";
    case Value::Int:
      return std::to_string(v.i);
    case Value::Float:
      return float_repr(v.f);
    case Value::String:
      return repr ? str_repr(v.s) : v.s;
    case Value::List: {
      std::string out = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += ", ";
        out += to_str((*v.list)[k], true);
        if (out.size() > kMaxOutput) break;
      }
      if (v.tuple && v.list->size() == 1) out += ",";
      return out + (v.tuple ? ")" : "]");
    }
    case Value::Dict: {
      if (v.dict->is_namespace) return "<Namespace>";
      std::string out = "{";
      for (size_t k = 0; k < v.dict->items.size(); ++k) {
        if (k) out += ", ";
        out += str_repr(v.dict->items[k].first) + ": " + to_str(v.dict->items[k].second, true);
        if (out.size() > kMaxOutput) break;
      }
      return out + "}";
    }
    case Value::Func:
      return "<function>";
  }
  return "";
}

const char* type_name(const Value& v) {
  switch (v.kind) {
    case Value::Undefined:
      return "undefined";
    case Value::None:
      return "NoneType";
    case Value::Bool:
      return "bool";
    case Value::Int:
      return "int";
    case Value::Float:
      return "float";
    case Value::String:
      return "str";
    case Value::List:
      return v.tuple ? "tuple" : "list";
    case Value::Dict:
      return v.dict->is_namespace ? "Namespace" : "dict";
    case Value::Func:
      return "function";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Undefined:
    case Value::None:
      return false;
    case Value::Bool:
      return v.b;
    case Value::Int:
      return v.i != 0;
    case Value::Float:
      return v.f != 0;
    case Value::String:
      return !v.s.empty();
    case Value::List:
      return !v.list->empty();
    case Value::Dict:
      return v.dict->is_namespace || !v.dict->items.empty();
    case Value::Func:
      return true;
  }
  return false;
}

bool equal(const Value& a, const Value& b) {
  if (a.numeric() && b.numeric()) {
    if (a.kind == Value::Float || b.kind == Value::Float) return a.as_double() == b.as_double();
    return a.as_int() == b.as_int();
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Undefined:
    case Value::None:
      return true;
    case Value::String:
      return a.s == b.s;
    case Value::List:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k)
        if (!equal((*a.list)[k], (*b.list)[k])) return false;
      return true;
    case Value::Dict:
      if (a.dict == b.dict) return true;
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, x] : a.dict->items) {
        const Value* y = b.dict->get(k);
        if (!y || !equal(x, *y)) return false;
      }
      return true;
    default:
      return a.fn == b.fn;
  }
}

// Python's json.dumps(x, ensure_ascii=False, indent, separators, sort_keys), as transformers'
// tojson filter calls it.
struct JsonStyle {
  int64_t indent = -1;  // -1: on one line
  std::string item_sep = ", ", key_sep = ": ";
  bool sort_keys = false;
};

void json_string(const std::string& s, std::string& out) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

[[noreturn]] void type_error(const std::string& what);

void to_json(const Value& v, const JsonStyle& st, int level, std::string& out) {
  if (out.size() > kMaxOutput) type_error("tojson: the text grows past 64 MiB");
  auto newline = [&](int at) {
    if (st.indent >= 0) out += "\n" + std::string(static_cast<size_t>(st.indent * at), ' ');
  };
  switch (v.kind) {
    case Value::None:
      out += "null";
      return;
    case Value::Bool:
      out += v.b ? "true" : "false";
      return;
    case Value::Int:
      out += std::to_string(v.i);
      return;
    case Value::Float:
      out += std::isnan(v.f)   ? "NaN"
             : std::isinf(v.f) ? (v.f < 0 ? "-Infinity" : "Infinity")
                               : float_repr(v.f);
      return;
    case Value::String:
      json_string(v.s, out);
      return;
    case Value::List: {
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += st.item_sep;
        newline(level + 1);
        to_json((*v.list)[k], st, level + 1, out);
      }
      newline(level);
      out += ']';
      return;
    }
    case Value::Dict: {
      if (v.dict->is_namespace) type_error("tojson: a namespace is not JSON serializable");
      if (v.dict->items.empty()) {
        out += "{}";
        return;
      }
      auto items = v.dict->items;
      if (st.sort_keys)
        std::stable_sort(items.begin(), items.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      out += '{';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += st.item_sep;
        newline(level + 1);
        json_string(items[k].first, out);
        out += st.key_sep;
        to_json(items[k].second, st, level + 1, out);
      }
      newline(level);
      out += '}';
      return;
    }
    default:
      type_error(std::string("tojson: an object of type ") + type_name(v) +
                 " is not JSON serializable");
  }
}

// ---------------------------------------------------------------------------------------------
// The lexer: the template as text, {{ expressions }} and {% statements %}, with jinja2's
// whitespace control (trim_blocks, lstrip_blocks, "-" and "+" markers) applied.

struct Segment {
  enum Kind { Text, Expression, Statement } kind;
  std::string text;
  int line;
};

// A problem found while parsing or rendering: the line, what, and whether a template file
// that lorafit renders would help (everything but the template's own raise_exception).
struct Problem : std::runtime_error {
  Problem(int line_, const std::string& what, bool unsupported_ = false)
      : std::runtime_error(what), line(line_), unsupported(unsupported_) {}
  int line;
  bool unsupported;
};

void type_error(const std::string& what) {
  throw Problem(0, what);
}

bool space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

// Where the tag that starts at `from` ends ("%}", "}}" or "#}"), skipping string literals in
// expressions; npos when it never does.
size_t tag_end(const std::string& src, size_t from, char kind) {
  const char close = kind == '{' ? '}' : kind;
  char quote = 0;
  for (size_t k = from; k + 1 < src.size(); ++k) {
    const char c = src[k];
    if (kind != '#' && quote) {
      if (c == '\\') {
        ++k;
      } else if (c == quote) {
        quote = 0;
      }
    } else if (kind != '#' && (c == '\'' || c == '"')) {
      quote = c;
    } else if (c == close && src[k + 1] == '}') {
      return k;
    }
  }
  return std::string::npos;
}

std::vector<Segment> lex(std::string src) {
  // jinja2 reads the source by lines: \r\n and \r become \n, and one final newline goes.
  std::string norm;
  norm.reserve(src.size());
  for (size_t k = 0; k < src.size(); ++k) {
    if (src[k] == '\r') {
      norm += '\n';
      if (k + 1 < src.size() && src[k + 1] == '\n') ++k;
    } else {
      norm += src[k];
    }
  }
  src = std::move(norm);
  if (!src.empty() && src.back() == '\n') src.pop_back();

  std::vector<Segment> out;
  size_t pos = 0;
  int line = 1;
  bool line_starting = true;
  auto count_lines = [&](size_t from, size_t to) {
    line += static_cast<int>(std::count(src.begin() + static_cast<long>(from),
                                        src.begin() + static_cast<long>(to), '\n'));
  };
  while (pos < src.size()) {
    size_t start = pos;
    while ((start = src.find('{', start)) != std::string::npos && start + 1 < src.size() &&
           src[start + 1] != '{' && src[start + 1] != '%' && src[start + 1] != '#') {
      ++start;
    }
    if (start == std::string::npos || start + 1 >= src.size()) {
      out.push_back({Segment::Text, src.substr(pos), line});
      break;
    }
    std::string text = src.substr(pos, start - pos);
    const char kind = src[start + 1];
    size_t inner = start + 2;
    const char mark =
        inner < src.size() && (src[inner] == '-' || src[inner] == '+') ? src[inner] : 0;
    if (mark) ++inner;
    if (mark == '-') {
      while (!text.empty() && space(text.back())) text.pop_back();
    } else if (mark != '+' && kind != '{') {
      // lstrip_blocks: spaces and tabs from the start of the line to a block or comment tag
      const size_t nl = text.rfind('\n');
      const size_t from = nl == std::string::npos ? 0 : nl + 1;
      if ((nl != std::string::npos || line_starting) &&
          text.find_first_not_of(" \t", from) == std::string::npos)
        text.resize(from);
    }
    count_lines(pos, start);
    if (!text.empty()) out.push_back({Segment::Text, std::move(text), line});
    const int tag_line = line;
    const size_t close = tag_end(src, inner, kind);
    if (close == std::string::npos) {
      throw Problem(tag_line, std::string("the tag opened by '{") + kind +
                                  "' is never closed (expected '" + (kind == '{' ? '}' : kind) +
                                  "}')");
    }
    std::string content = src.substr(inner, close - inner);
    count_lines(start, close);
    pos = close + 2;
    char end_mark = 0;
    if (!content.empty() && (content.back() == '-' || content.back() == '+')) {
      end_mark = content.back();
      content.pop_back();
    }
    // {% raw %} ... {% endraw %}: the text between is not parsed
    if (kind == '%') {
      const auto first = content.find_first_not_of(" \t\n");
      const auto last = content.find_last_not_of(" \t\n");
      if (first != std::string::npos && content.substr(first, last - first + 1) == "raw") {
        size_t at = pos, end_open = std::string::npos, end_close = 0;
        while ((at = src.find("{%", at)) != std::string::npos) {
          size_t k = at + 2;
          const bool minus = k < src.size() && src[k] == '-';
          if (k < src.size() && (src[k] == '-' || src[k] == '+')) ++k;
          while (k < src.size() && space(src[k])) ++k;
          if (src.compare(k, 6, "endraw") == 0) {
            const size_t c = tag_end(src, k, '%');
            if (c == std::string::npos) break;
            std::string raw = src.substr(pos, at - pos);
            if (minus)
              while (!raw.empty() && space(raw.back())) raw.pop_back();
            out.push_back({Segment::Text, std::move(raw), tag_line});
            end_open = at;
            end_close = c;
            break;
          }
          at += 2;
        }
        if (end_open == std::string::npos) throw Problem(tag_line, "{% raw %} has no {% endraw %}");
        count_lines(pos, end_close);
        end_mark = end_close > 0 && (src[end_close - 1] == '-' || src[end_close - 1] == '+')
                       ? src[end_close - 1]
                       : 0;
        pos = end_close + 2;
        content.clear();
      }
    }
    if (end_mark == '-') {
      const size_t from = pos;
      while (pos < src.size() && space(src[pos])) ++pos;
      count_lines(from, pos);
      line_starting = pos > from && src[pos - 1] == '\n';
    } else if (kind != '{' && end_mark != '+' && pos < src.size() && src[pos] == '\n') {
      ++pos;  // trim_blocks
      ++line;
      line_starting = true;
    } else {
      line_starting = false;
    }
    if (kind == '{') {
      out.push_back({Segment::Expression, std::move(content), tag_line});
    } else if (kind == '%' && !content.empty()) {
      out.push_back({Segment::Statement, std::move(content), tag_line});
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Expressions: tokens, then a tree by jinja2's precedence (or < and < not < comparisons <
// + - < ~ < * / // % < ** < unary - < postfix . [] () < filters | and tests is).

struct Token {
  enum Kind { Name, Int, Float, Str, Op, End } kind;
  std::string text;  // the name, operator or (unescaped) string
  int64_t i = 0;
  double f = 0;
  int line = 0;
};

void append_utf8(std::string& out, uint32_t cp, int line) {
  utf8proc_uint8_t buf[4];
  if (!utf8proc_codepoint_valid(static_cast<utf8proc_int32_t>(cp)))
    throw Problem(line, "a string literal escapes an invalid code point");
  const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
  out.append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

// A string literal's escapes, as Python's unicode-escape codec reads them (an unknown escape
// keeps its backslash).
size_t read_string(const std::string& s, size_t at, int line, std::string& out) {
  const char quote = s[at++];
  while (at < s.size() && s[at] != quote) {
    char c = s[at++];
    if (c != '\\' || at >= s.size()) {
      out += c;
      continue;
    }
    c = s[at++];
    auto hex = [&](size_t n) {
      if (at + n > s.size()) throw Problem(line, "a string literal ends inside an escape");
      uint32_t v = 0;
      for (size_t k = 0; k < n; ++k) {
        const char h = s[at + k];
        if (!std::isxdigit(static_cast<unsigned char>(h)))
          throw Problem(line, "a string literal has a malformed \\x, \\u or \\U escape");
        v = v * 16 +
            static_cast<uint32_t>(std::isdigit(static_cast<unsigned char>(h))
                                      ? h - '0'
                                      : std::tolower(static_cast<unsigned char>(h)) - 'a' + 10);
      }
      at += n;
      return v;
    };
    switch (c) {
      case 'n':
        out += '\n';
        break;
      case 't':
        out += '\t';
        break;
      case 'r':
        out += '\r';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'v':
        out += '\v';
        break;
      case 'a':
        out += '\a';
        break;
      case '\\':
        out += '\\';
        break;
      case '\'':
        out += '\'';
        break;
      case '"':
        out += '"';
        break;
      case '\n':
        break;
      case 'x':
        append_utf8(out, hex(2), line);
        break;
      case 'u':
        append_utf8(out, hex(4), line);
        break;
      case 'U':
        append_utf8(out, hex(8), line);
        break;
      default:
        if (c >= '0' && c <= '7') {
          uint32_t v = static_cast<uint32_t>(c - '0');
          for (int k = 0; k < 2 && at < s.size() && s[at] >= '0' && s[at] <= '7'; ++k)
            v = v * 8 + static_cast<uint32_t>(s[at++] - '0');
          append_utf8(out, v, line);
        } else {
          out += '\\';
          out += c;
        }
    }
  }
  if (at >= s.size()) throw Problem(line, "a string literal is never closed");
  return at + 1;
}

std::vector<Token> tokenize(const std::string& s, int line) {
  static const char* const kOps[] = {"**", "//", "==", "!=", "<=", ">="};
  std::vector<Token> out;
  size_t at = 0;
  while (at < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[at]);
    if (space(static_cast<char>(c))) {
      line += c == '\n';
      ++at;
    } else if (std::isalpha(c) || c == '_') {
      size_t end = at;
      while (end < s.size() && (std::isalnum(static_cast<unsigned char>(s[end])) || s[end] == '_'))
        ++end;
      out.push_back({Token::Name, s.substr(at, end - at), 0, 0, line});
      at = end;
    } else if (std::isdigit(c)) {
      size_t end = at;
      bool is_float = false;
      auto digits = [&] {
        while (end < s.size() &&
               (std::isdigit(static_cast<unsigned char>(s[end])) || s[end] == '_'))
          ++end;
      };
      digits();
      if (end + 1 < s.size() && s[end] == '.' &&
          std::isdigit(static_cast<unsigned char>(s[end + 1]))) {
        is_float = true;
        ++end;
        digits();
      }
      if (end < s.size() && (s[end] == 'e' || s[end] == 'E')) {
        size_t k = end + 1;
        if (k < s.size() && (s[k] == '+' || s[k] == '-')) ++k;
        if (k < s.size() && std::isdigit(static_cast<unsigned char>(s[k]))) {
          is_float = true;
          end = k;
          digits();
        }
      }
      std::string num = s.substr(at, end - at);
      num.erase(std::remove(num.begin(), num.end(), '_'), num.end());
      Token t{is_float ? Token::Float : Token::Int, num, 0, 0, line};
      errno = 0;
      if (is_float) {
        t.f = std::strtod(num.c_str(), nullptr);
      } else {
        t.i = std::strtoll(num.c_str(), nullptr, 10);
        if (errno == ERANGE) throw Problem(line, "the integer " + num + " is too large");
      }
      out.push_back(t);
      at = end;
    } else if (c == '\'' || c == '"') {
      Token t{Token::Str, "", 0, 0, line};
      at = read_string(s, at, line, t.text);
      out.push_back(std::move(t));
    } else {
      std::string op(1, static_cast<char>(c));
      for (const char* two : kOps)
        if (s.compare(at, 2, two) == 0) op = two;
      if (op.size() == 1 &&
          std::string("+-*/%~<>=()[]{},.:|").find(static_cast<char>(c)) == std::string::npos)
        throw Problem(line, "unexpected character '" + op + "'", true);
      out.push_back({Token::Op, op, 0, 0, line});
      at += op.size();
    }
  }
  out.push_back({Token::End, "", 0, 0, line});
  return out;
}

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;
using Keywords = std::vector<std::pair<std::string, ExprPtr>>;

struct Expr {
  enum Type {
    Literal,
    Name,
    ListLit,
    TupleLit,
    DictLit,
    Attr,
    Item,
    Slice,
    Call,
    Filter,
    Test,
    Not,
    Neg,
    Pos,
    Binary,
    And,
    Or,
    Cond,
    Compare
  };
  Type type;
  int line = 0;
  Value value;                   // Literal
  std::string name;              // Name, Attr, Filter and Test names, Binary's operator
  std::vector<ExprPtr> args;     // operands (a null one for a missing slice bound or else)
  Keywords kwargs;               // Call, Filter, Test
  std::vector<std::string> ops;  // Compare: between args[k] and args[k + 1]
  bool negated = false;          // Test: "is not"
};

ExprPtr make(Expr::Type type, int line) {
  auto e = std::make_unique<Expr>();
  e->type = type;
  e->line = line;
  return e;
}

class ExprParser {
 public:
  ExprParser(std::vector<Token> tokens) : t_(std::move(tokens)) {}

  const Token& peek(size_t ahead = 0) const { return t_[std::min(at_ + ahead, t_.size() - 1)]; }
  bool at_end() const { return peek().kind == Token::End; }
  bool is_op(const char* op, size_t ahead = 0) const {
    return peek(ahead).kind == Token::Op && peek(ahead).text == op;
  }
  bool is_name(const char* name, size_t ahead = 0) const {
    return peek(ahead).kind == Token::Name && peek(ahead).text == name;
  }
  const Token& next() { return t_[std::min(at_++, t_.size() - 1)]; }
  bool skip_op(const char* op) { return is_op(op) ? (next(), true) : false; }
  bool skip_name(const char* name) { return is_name(name) ? (next(), true) : false; }
  [[noreturn]] void unexpected(const std::string& wanted) const {
    const auto& t = peek();
    const std::string got = t.kind == Token::End   ? "the end of the tag"
                            : t.kind == Token::Str ? "a string"
                                                   : "'" + t.text + "'";
    throw Problem(t.line, "expected " + wanted + ", got " + got);
  }
  void expect_op(const char* op) {
    if (!skip_op(op)) unexpected(std::string("'") + op + "'");
  }
  std::string expect_name() {
    if (peek().kind != Token::Name) unexpected("a name");
    return next().text;
  }
  void expect_end() {
    if (!at_end()) unexpected("the end of the tag");
  }

  // An expression, or a tuple of them when commas follow.
  ExprPtr tuple(bool with_cond = true) {
    const int line = peek().line;
    auto first = expression(with_cond);
    if (!is_op(",")) return first;
    auto t = make(Expr::TupleLit, line);
    t->args.push_back(std::move(first));
    while (skip_op(",")) {
      if (at_end() || is_op(")") || is_op("]") || is_name("if")) break;
      t->args.push_back(expression(with_cond));
    }
    return t;
  }

  ExprPtr expression(bool with_cond = true) {
    Depth d(depth_, peek().line);
    auto e = or_expr();
    if (with_cond && is_name("if")) {
      const int line = next().line;
      auto c = make(Expr::Cond, line);
      auto test = or_expr();
      ExprPtr otherwise = skip_name("else") ? expression() : nullptr;
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(test));
      c->args.push_back(std::move(otherwise));
      return c;
    }
    return e;
  }

  Keywords call_args(std::vector<ExprPtr>& pos) {
    Keywords kw;
    while (!is_op(")")) {
      if (is_op("*") || is_op("**"))
        throw Problem(peek().line, "*args and **kwargs in calls", true);
      if (peek().kind == Token::Name && is_op("=", 1)) {
        std::string key = next().text;
        next();
        kw.emplace_back(std::move(key), expression());
      } else {
        if (!kw.empty())
          throw Problem(peek().line, "a positional argument follows a keyword argument");
        pos.push_back(expression());
      }
      if (!skip_op(",")) break;
    }
    expect_op(")");
    return kw;
  }

 private:
  struct Depth {
    Depth(int& d, int line) : d_(d) {
      if (++d_ > kMaxDepth) throw Problem(line, "expressions nest too deeply");
    }
    ~Depth() { --d_; }
    int& d_;
  };

  ExprPtr binary(Expr::Type type, const std::string& op, ExprPtr a, ExprPtr b, int line) {
    auto e = make(type, line);
    e->name = op;
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }

  ExprPtr or_expr() {
    auto e = and_expr();
    while (is_name("or"))
      e = binary(Expr::Or, "or", std::move(e), (next(), and_expr()), peek().line);
    return e;
  }
  ExprPtr and_expr() {
    auto e = not_expr();
    while (is_name("and"))
      e = binary(Expr::And, "and", std::move(e), (next(), not_expr()), peek().line);
    return e;
  }
  ExprPtr not_expr() {
    if (is_name("not")) {
      Depth d(depth_, peek().line);
      auto e = make(Expr::Not, next().line);
      e->args.push_back(not_expr());
      return e;
    }
    return compare();
  }
  ExprPtr compare() {
    auto first = math1();
    ExprPtr cmp;
    for (;;) {
      std::string op;
      if (peek().kind == Token::Op &&
          (peek().text == "==" || peek().text == "!=" || peek().text == "<" || peek().text == ">" ||
           peek().text == "<=" || peek().text == ">=")) {
        op = next().text;
      } else if (is_name("in")) {
        next();
        op = "in";
      } else if (is_name("not") && is_name("in", 1)) {
        next(), next();
        op = "not in";
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(Expr::Compare, peek().line);
        cmp->args.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(math1());
    }
    return cmp ? std::move(cmp) : std::move(first);
  }
  ExprPtr math1() {
    auto e = concat();
    while (is_op("+") || is_op("-")) {
      const std::string op = next().text;
      e = binary(Expr::Binary, op, std::move(e), concat(), peek().line);
    }
    return e;
  }
  ExprPtr concat() {
    auto e = math2();
    while (skip_op("~")) e = binary(Expr::Binary, "~", std::move(e), math2(), peek().line);
    return e;
  }
  ExprPtr math2() {
    auto e = power();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = next().text;
      e = binary(Expr::Binary, op, std::move(e), power(), peek().line);
    }
    return e;
  }
  ExprPtr power() {
    auto e = unary(true);
    while (skip_op("**")) e = binary(Expr::Binary, "**", std::move(e), unary(true), peek().line);
    return e;
  }
  ExprPtr unary(bool with_filter) {
    Depth d(depth_, peek().line);
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      const bool neg = next().text == "-";
      e = make(neg ? Expr::Neg : Expr::Pos, peek().line);
      e->args.push_back(unary(false));
    } else {
      e = postfix(primary());
    }
    return with_filter ? filters(std::move(e)) : std::move(e);
  }

  ExprPtr primary() {
    const Token& t = peek();
    const int line = t.line;
    if (t.kind == Token::Name) {
      const std::string n = next().text;
      auto e = make(Expr::Literal, line);
      if (n == "true" || n == "True") {
        e->value = Value::boolean(true);
      } else if (n == "false" || n == "False") {
        e->value = Value::boolean(false);
      } else if (n == "none" || n == "None") {
        e->value = Value::none();
      } else {
        e->type = Expr::Name;
        e->name = n;
      }
      return e;
    }
    if (t.kind == Token::Str) {
      std::string text;
      while (peek().kind == Token::Str) text += next().text;  // adjacent literals join
      auto e = make(Expr::Literal, line);
      e->value = Value::string(std::move(text));
      return e;
    }
    if (t.kind == Token::Int || t.kind == Token::Float) {
      next();
      auto e = make(Expr::Literal, line);
      e->value = t.kind == Token::Int ? Value::integer(t.i) : Value::number(t.f);
      return e;
    }
    if (skip_op("(")) {
      if (skip_op(")")) return make(Expr::TupleLit, line);
      auto e = tuple();
      expect_op(")");
      return e;
    }
    if (skip_op("[")) {
      auto e = make(Expr::ListLit, line);
      while (!is_op("]")) {
        e->args.push_back(expression());
        if (!skip_op(",")) break;
      }
      expect_op("]");
      return e;
    }
    if (skip_op("{")) {
      auto e = make(Expr::DictLit, line);
      while (!is_op("}")) {
        e->args.push_back(expression());
        expect_op(":");
        e->args.push_back(expression());
        if (!skip_op(",")) break;
      }
      expect_op("}");
      return e;
    }
    unexpected("an expression");
  }

  ExprPtr postfix(ExprPtr e) {
    for (;;) {
      const int line = peek().line;
      if (skip_op(".")) {
        if (peek().kind == Token::Int) {  // foo.0 is foo[0]
          auto item = make(Expr::Item, line);
          auto index = make(Expr::Literal, line);
          index->value = Value::integer(next().i);
          item->args.push_back(std::move(e));
          item->args.push_back(std::move(index));
          e = std::move(item);
          continue;
        }
        auto a = make(Expr::Attr, line);
        a->name = expect_name();
        a->args.push_back(std::move(e));
        e = std::move(a);
      } else if (skip_op("[")) {
        e = subscript(std::move(e), line);
      } else if (skip_op("(")) {
        auto c = make(Expr::Call, line);
        c->args.push_back(std::move(e));
        std::vector<ExprPtr> pos;
        c->kwargs = call_args(pos);
        for (auto& p : pos) c->args.push_back(std::move(p));
        e = std::move(c);
      } else {
        return e;
      }
    }
  }

  ExprPtr subscript(ExprPtr target, int line) {
    ExprPtr parts[3];
    int part = 0;
    bool slice = false;
    while (!is_op("]")) {
      if (skip_op(":")) {
        slice = true;
        if (++part > 2) unexpected("']'");
        continue;
      }
      if (parts[part]) unexpected("':' or ']'");
      parts[part] = expression();
    }
    expect_op("]");
    if (!slice) {
      if (!parts[0]) throw Problem(line, "an empty subscript []");
      auto e = make(Expr::Item, line);
      e->args.push_back(std::move(target));
      e->args.push_back(std::move(parts[0]));
      return e;
    }
    auto e = make(Expr::Slice, line);
    e->args.push_back(std::move(target));
    for (auto& p : parts) e->args.push_back(std::move(p));
    return e;
  }

  ExprPtr filters(ExprPtr e) {
    for (;;) {
      const int line = peek().line;
      if (skip_op("|")) {
        auto f = make(Expr::Filter, line);
        f->name = expect_name();
        if (!known(kFilters, std::size(kFilters), f->name))
          throw Problem(line, "the filter '" + f->name + "'", true);
        f->args.push_back(std::move(e));
        if (skip_op("(")) {
          std::vector<ExprPtr> pos;
          f->kwargs = call_args(pos);
          for (auto& p : pos) f->args.push_back(std::move(p));
        }
        e = std::move(f);
      } else if (skip_name("is")) {
        auto t = make(Expr::Test, line);
        t->negated = skip_name("not");
        t->name = expect_name();
        if (!known(kTests, std::size(kTests), t->name))
          throw Problem(line, "the test '" + t->name + "'", true);
        t->args.push_back(std::move(e));
        if (skip_op("(")) {
          std::vector<ExprPtr> pos;
          t->kwargs = call_args(pos);
          for (auto& p : pos) t->args.push_back(std::move(p));
        } else if ((peek().kind == Token::Str || peek().kind == Token::Int ||
                    peek().kind == Token::Float || is_op("[") || is_op("{") ||
                    (peek().kind == Token::Name && !is_name("else") && !is_name("or") &&
                     !is_name("and") && !is_name("if") && !is_name("is") && !is_name("not") &&
                     !is_name("in")))) {
          t->args.push_back(postfix(primary()));
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }

  std::vector<Token> t_;
  size_t at_ = 0;
  int depth_ = 0;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Statements.

struct Node {
  enum Type { Body, Text, Output, If, For, Set, SetBlock, Macro, Break, Continue };
  Type type = Body;
  int line = 0;
  std::string text;                         // Text; SetBlock and Macro: the name
  std::vector<std::unique_ptr<Node>> kids;  // Body: statements; If: a body per condition,
                                            // then else; For: body, else; SetBlock, Macro: body
  std::vector<ExprPtr> exprs;               // If: conditions; For: iterable, filter (or null);
                                            // Set, Output: the value
  std::vector<std::string> names;           // For and Set: targets; Set of ns.attr: ns, attr
  bool attr = false;                        // Set: of a namespace attribute
  Keywords params;                          // Macro: parameters with defaults (or null)
};

namespace {

std::unique_ptr<Node> node(Node::Type type, int line) {
  auto n = std::make_unique<Node>();
  n->type = type;
  n->line = line;
  return n;
}

class StmtParser {
 public:
  explicit StmtParser(const std::vector<Segment>& segments) : s_(segments) {}

  std::unique_ptr<Node> parse() {
    std::string found;
    std::unique_ptr<ExprParser> tag;
    return body({}, found, tag, 1, "");
  }

 private:
  // Statements up to one of the tags `ends` (none: the end of the template); the tag found and
  // the parser of its remaining tokens come back through `found` and `tag`.
  std::unique_ptr<Node> body(const std::vector<std::string>& ends,
                             std::string& found,
                             std::unique_ptr<ExprParser>& tag,
                             int opened_at,
                             const std::string& opener) {
    if (++depth_ > kMaxDepth) throw Problem(opened_at, "statements nest too deeply");
    auto b = node(Node::Body, opened_at);
    while (at_ < s_.size()) {
      const Segment& seg = s_[at_++];
      if (seg.kind == Segment::Text) {
        auto t = node(Node::Text, seg.line);
        t->text = seg.text;
        b->kids.push_back(std::move(t));
        continue;
      }
      auto p = std::make_unique<ExprParser>(tokenize(seg.text, seg.line));
      if (seg.kind == Segment::Expression) {
        auto o = node(Node::Output, seg.line);
        o->exprs.push_back(p->tuple());
        p->expect_end();
        b->kids.push_back(std::move(o));
        continue;
      }
      const std::string kw = p->expect_name();
      if (std::find(ends.begin(), ends.end(), kw) != ends.end()) {
        found = kw;
        tag = std::move(p);
        --depth_;
        return b;
      }
      b->kids.push_back(statement(kw, *p, seg.line));
    }
    if (!ends.empty()) {
      throw Problem(opened_at,
                    "{% " + opener + " %} is never closed (expected {% " + ends.back() + " %})");
    }
    --depth_;
    return b;
  }

  std::unique_ptr<Node> statement(const std::string& kw, ExprParser& p, int line) {
    std::string found;
    std::unique_ptr<ExprParser> tag;
    if (kw == "for") {
      auto n = node(Node::For, line);
      const bool paren = p.skip_op("(");
      do n->names.push_back(p.expect_name());
      while (p.skip_op(","));
      if (paren) p.expect_op(")");
      if (!p.skip_name("in")) p.unexpected("'in'");
      n->exprs.push_back(p.tuple(false));
      n->exprs.push_back(p.skip_name("if") ? p.expression() : nullptr);
      if (p.is_name("recursive")) throw Problem(line, "recursive for loops", true);
      p.expect_end();
      ++loops_;
      n->kids.push_back(body({"else", "endfor"}, found, tag, line, "for"));
      tag->expect_end();
      --loops_;
      if (found == "else") {
        n->kids.push_back(body({"endfor"}, found, tag, line, "for"));
        tag->expect_end();
      }
      return n;
    }
    if (kw == "if") {
      auto n = node(Node::If, line);
      n->exprs.push_back(p.tuple());
      p.expect_end();
      for (;;) {
        n->kids.push_back(body({"elif", "else", "endif"}, found, tag, line, "if"));
        if (found == "elif") {
          n->exprs.push_back(tag->tuple());
          tag->expect_end();
          continue;
        }
        tag->expect_end();
        if (found == "else") {
          n->kids.push_back(body({"endif"}, found, tag, line, "if"));
          tag->expect_end();
        }
        return n;
      }
    }
    if (kw == "set") {
      auto n = node(Node::Set, line);
      n->names.push_back(p.expect_name());
      if (p.skip_op(".")) {
        n->attr = true;
        n->names.push_back(p.expect_name());
      } else {
        while (p.skip_op(",")) n->names.push_back(p.expect_name());
      }
      if (p.skip_op("=")) {
        n->exprs.push_back(p.tuple());
        p.expect_end();
        return n;
      }
      if (p.is_op("|")) throw Problem(line, "filters on a {% set %} block", true);
      p.expect_end();
      if (n->attr || n->names.size() != 1) p.unexpected("'='");
      n->type = Node::SetBlock;
      n->text = n->names[0];
      n->kids.push_back(body({"endset"}, found, tag, line, "set"));
      tag->expect_end();
      return n;
    }
    if (kw == "macro") {
      auto n = node(Node::Macro, line);
      n->text = p.expect_name();
      p.expect_op("(");
      while (!p.is_op(")")) {
        std::string name = p.expect_name();
        n->params.emplace_back(std::move(name), p.skip_op("=") ? p.expression() : nullptr);
        if (!p.skip_op(",")) break;
      }
      p.expect_op(")");
      p.expect_end();
      const int saved = loops_;
      loops_ = 0;  // a loop outside does not make break legal inside
      n->kids.push_back(body({"endmacro"}, found, tag, line, "macro"));
      loops_ = saved;
      tag->expect_end();
      return n;
    }
    if (kw == "break" || kw == "continue") {
      p.expect_end();
      if (loops_ == 0) throw Problem(line, "{% " + kw + " %} outside a for loop");
      return node(kw == "break" ? Node::Break : Node::Continue, line);
    }
    if (kw == "generation") {  // transformers' marker of assistant text: rendered as is
      p.expect_end();
      auto b = body({"endgeneration"}, found, tag, line, "generation");
      tag->expect_end();
      return b;
    }
    static const char* const kClosers[] = {"endfor", "endif",    "elif",          "else",
                                           "endset", "endmacro", "endgeneration", "endraw"};
    for (const char* c : kClosers)
      if (kw == c) throw Problem(line, "{% " + kw + " %} closes nothing that is open here");
    throw Problem(line, "the {% " + kw + " %} statement", true);
  }

  const std::vector<Segment>& s_;
  size_t at_ = 0;
  int depth_ = 0;
  int loops_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Rendering.

using Scope = std::map<std::string, Value>;

const Value* kwarg(const Args& a, const char* name) {
  for (const auto& [k, v] : a.kw)
    if (k == name) return &v;
  return nullptr;
}

// Argument `k` (positional) or `name` (keyword), or null when neither is given.
const Value* arg(const Args& a, size_t k, const char* name) {
  if (k < a.pos.size()) return &a.pos[k];
  return kwarg(a, name);
}

const std::string& need_str(const Value& v, const char* what) {
  if (v.kind != Value::String)
    type_error(std::string(what) + " expects a string, got " + type_name(v));
  return v.s;
}

int64_t need_int(const Value& v, const char* what) {
  if (v.kind != Value::Int && v.kind != Value::Bool)
    type_error(std::string(what) + " expects an integer, got " + type_name(v));
  return v.as_int();
}

ValueList iterate(const Value& v) {
  switch (v.kind) {
    case Value::Undefined:
      return {};
    case Value::List:
      return *v.list;
    case Value::Dict: {
      ValueList keys;
      for (const auto& [k, x] : v.dict->items) keys.push_back(Value::string(k));
      return keys;
    }
    case Value::String: {
      ValueList chars;
      const auto cps = code_points(v.s);
      for (size_t k = 0; k < cps.size(); ++k)
        chars.push_back(Value::string(from_code_points(cps, k, k + 1)));
      return chars;
    }
    default:
      type_error(std::string("'") + type_name(v) + "' object is not iterable");
  }
}

// Python's slice indices of a sequence of `n`.
std::vector<int64_t> slice_indices(int64_t n,
                                   const Value* start,
                                   const Value* stop,
                                   const Value* step) {
  const int64_t st = step && step->kind != Value::None ? need_int(*step, "a slice step") : 1;
  if (st == 0) type_error("slice step cannot be zero");
  auto bound = [&](const Value* v, int64_t fallback) {
    if (!v || v->kind == Value::None) return fallback;
    int64_t x = need_int(*v, "a slice bound");
    if (x < 0) x += n;
    if (st > 0) return std::clamp<int64_t>(x, 0, n);
    return std::clamp<int64_t>(x, -1, n - 1);
  };
  const int64_t a = bound(start, st > 0 ? 0 : n - 1), b = bound(stop, st > 0 ? n : -1);
  std::vector<int64_t> out;
  for (int64_t k = a; st > 0 ? k < b : k > b; k += st) out.push_back(k);
  return out;
}

std::string strip(const std::string& s, const Value* chars, bool left, bool right) {
  const auto cps = code_points(s);
  std::vector<int32_t> set;
  const bool custom = chars && chars->kind != Value::None;
  if (custom) set = code_points(need_str(*chars, "strip"));
  auto drop = [&](int32_t c) {
    return custom ? std::find(set.begin(), set.end(), c) != set.end() : py_space(c);
  };
  size_t a = 0, b = cps.size();
  if (left)
    while (a < b && drop(cps[a])) ++a;
  if (right)
    while (b > a && drop(cps[b - 1])) --b;
  return from_code_points(cps, a, b);
}

ValueList split(const std::string& s, const Value* sep, int64_t max_split) {
  ValueList out;
  if (!sep || sep->kind == Value::None) {  // runs of whitespace, no empty parts
    const auto cps = code_points(s);
    size_t k = 0;
    while (k < cps.size()) {
      while (k < cps.size() && py_space(cps[k])) ++k;
      if (k == cps.size()) break;
      size_t e = k;
      if (max_split >= 0 && static_cast<int64_t>(out.size()) == max_split) {
        size_t end = cps.size();
        while (end > k && py_space(cps[end - 1])) --end;
        out.push_back(Value::string(from_code_points(cps, k, end)));
        break;
      }
      while (e < cps.size() && !py_space(cps[e])) ++e;
      out.push_back(Value::string(from_code_points(cps, k, e)));
      k = e;
    }
    return out;
  }
  const std::string& d = need_str(*sep, "split");
  if (d.empty()) type_error("split: empty separator");
  size_t at = 0;
  for (;;) {
    const size_t hit = s.find(d, at);
    if (hit == std::string::npos ||
        (max_split >= 0 && static_cast<int64_t>(out.size()) == max_split)) {
      out.push_back(Value::string(s.substr(at)));
      return out;
    }
    out.push_back(Value::string(s.substr(at, hit - at)));
    at = hit + d.size();
  }
}

std::string replace(const std::string& s,
                    const std::string& from,
                    const std::string& to,
                    int64_t count) {
  std::string out;
  size_t at = 0;
  int64_t done = 0;
  if (from.empty()) {  // Python inserts `to` around every character
    const auto cps = code_points(s);
    for (size_t k = 0; k <= cps.size(); ++k) {
      if (count < 0 || done < count) out += to, ++done;
      if (k < cps.size()) out += from_code_points(cps, k, k + 1);
      if (out.size() > kMaxOutput) type_error("replace: the text grows past 64 MiB");
    }
    return out;
  }
  for (;;) {
    const size_t hit = s.find(from, at);
    if (hit == std::string::npos || (count >= 0 && done >= count)) break;
    out.append(s, at, hit - at);
    out += to;
    if (out.size() > kMaxOutput) type_error("replace: the text grows past 64 MiB");
    at = hit + from.size();
    ++done;
  }
  return out + s.substr(at);
}

std::string title_case(const std::string& s, bool only_first) {
  auto cps = code_points(s);
  bool start = true;
  for (auto& c : cps) {
    const bool letter = utf8proc_category(c) <= UTF8PROC_CATEGORY_LO && c != ' ';
    if (only_first) {
      c = start ? utf8proc_toupper(c) : utf8proc_tolower(c);
      start = false;
    } else {
      c = start && letter ? utf8proc_toupper(c) : utf8proc_tolower(c);
      start = !letter;
    }
  }
  return from_code_points(cps, 0, cps.size());
}

bool less(const Value& a, const Value& b) {
  if (a.numeric() && b.numeric()) return a.as_double() < b.as_double();
  if (a.kind == Value::String && b.kind == Value::String) return a.s < b.s;
  if (a.kind == Value::List && b.kind == Value::List) {
    const auto &x = *a.list, &y = *b.list;
    for (size_t k = 0; k < x.size() && k < y.size(); ++k) {
      if (less(x[k], y[k])) return true;
      if (less(y[k], x[k])) return false;
    }
    return x.size() < y.size();
  }
  type_error(std::string("'<' is not supported between '") + type_name(a) + "' and '" +
             type_name(b) + "'");
}

bool contains(const Value& container, const Value& item) {
  switch (container.kind) {
    case Value::String:
      return container.s.find(need_str(item, "'in <string>'")) != std::string::npos;
    case Value::List:
      return std::any_of(container.list->begin(), container.list->end(),
                         [&](const Value& x) { return equal(x, item); });
    case Value::Dict:
      return item.kind == Value::String && container.dict->get(item.s) != nullptr;
    case Value::Undefined:
      return false;
    default:
      type_error(std::string("argument of type '") + type_name(container) + "' is not iterable");
  }
}

Value arithmetic(const std::string& op, const Value& a, const Value& b) {
  auto unsupported = [&]() -> Value {
    type_error("unsupported operand types for " + op + ": '" + type_name(a) + "' and '" +
               type_name(b) + "'");
  };
  if (op == "~") return Value::string(to_str(a) + to_str(b));
  const bool ints = (a.kind == Value::Int || a.kind == Value::Bool) &&
                    (b.kind == Value::Int || b.kind == Value::Bool);
  if (op == "+") {
    if (a.kind == Value::String && b.kind == Value::String) {
      if (a.s.size() + b.s.size() > kMaxOutput) type_error("a string grows past 64 MiB");
      return Value::string(a.s + b.s);
    }
    if (a.kind == Value::List && b.kind == Value::List) {
      ValueList items = *a.list;
      items.insert(items.end(), b.list->begin(), b.list->end());
      return Value::of_list(std::move(items), a.tuple && b.tuple);
    }
  }
  if (op == "*" && (a.kind == Value::String || a.kind == Value::List) &&
      (b.kind == Value::Int || b.kind == Value::Bool))
    return arithmetic(op, b, a);
  if (op == "*" && (a.kind == Value::Int || a.kind == Value::Bool) &&
      (b.kind == Value::String || b.kind == Value::List)) {
    const int64_t n = std::max<int64_t>(0, a.as_int());
    const size_t unit = b.kind == Value::String ? b.s.size() : b.list->size() * 16;
    if (unit &&
        static_cast<double>(n) * static_cast<double>(unit) > static_cast<double>(kMaxOutput))
      type_error("a repetition grows past 64 MiB");
    if (b.kind == Value::String) {
      std::string out;
      for (int64_t k = 0; k < n; ++k) out += b.s;
      return Value::string(std::move(out));
    }
    ValueList items;
    for (int64_t k = 0; k < n; ++k) items.insert(items.end(), b.list->begin(), b.list->end());
    return Value::of_list(std::move(items), b.tuple);
  }
  if (!a.numeric() || !b.numeric()) return unsupported();
  const double x = a.as_double(), y = b.as_double();
  if (op == "/") {
    if (y == 0) type_error("division by zero");
    return Value::number(x / y);
  }
  if (op == "//" || op == "%") {
    if (y == 0) type_error("integer division or modulo by zero");
    if (ints) {
      const int64_t p = a.as_int(), q = b.as_int();
      if (p == INT64_MIN && q == -1) type_error("integer overflow");
      int64_t d = p / q, m = p % q;
      if (m != 0 && ((m < 0) != (q < 0))) --d, m += q;
      return Value::integer(op == "//" ? d : m);
    }
    const double d = std::floor(x / y);
    return Value::number(op == "//" ? d : x - d * y);
  }
  if (op == "**") {
    if (ints && b.as_int() >= 0) {
      int64_t base = a.as_int(), e = b.as_int(), r = 1;
      while (e > 0) {
        if (e & 1 && __builtin_mul_overflow(r, base, &r)) type_error("integer overflow in **");
        e >>= 1;
        if (e && __builtin_mul_overflow(base, base, &base)) type_error("integer overflow in **");
      }
      return Value::integer(r);
    }
    return Value::number(std::pow(x, y));
  }
  if (ints) {
    int64_t r = 0;
    const bool over = op == "+"   ? __builtin_add_overflow(a.as_int(), b.as_int(), &r)
                      : op == "-" ? __builtin_sub_overflow(a.as_int(), b.as_int(), &r)
                                  : __builtin_mul_overflow(a.as_int(), b.as_int(), &r);
    if (over) type_error("integer overflow in " + op);
    return Value::integer(r);
  }
  return Value::number(op == "+" ? x + y : op == "-" ? x - y : x * y);
}

bool test(const std::string& name, const Value& v, const Args& a) {
  auto other = [&]() -> const Value& {
    if (a.pos.empty()) type_error("the test '" + name + "' needs an argument");
    return a.pos[0];
  };
  if (name == "defined") return v.kind != Value::Undefined;
  if (name == "undefined") return v.kind == Value::Undefined;
  if (name == "none") return v.kind == Value::None;
  if (name == "boolean") return v.kind == Value::Bool;
  if (name == "true") return v.kind == Value::Bool && v.b;
  if (name == "false") return v.kind == Value::Bool && !v.b;
  if (name == "integer") return v.kind == Value::Int;
  if (name == "float") return v.kind == Value::Float;
  if (name == "number") return v.numeric();
  if (name == "string") return v.kind == Value::String;
  if (name == "mapping") return v.kind == Value::Dict;
  if (name == "sequence")
    return v.kind == Value::List || v.kind == Value::String || v.kind == Value::Dict;
  if (name == "iterable")
    return v.kind == Value::List || v.kind == Value::String || v.kind == Value::Dict;
  if (name == "callable") return v.kind == Value::Func;
  if (name == "odd" || name == "even") {
    const auto n = need_int(v, "the test odd/even");
    return (n % 2 != 0) == (name == "odd");
  }
  if (name == "divisibleby") {
    const auto d = need_int(other(), "divisibleby");
    if (d == 0) type_error("divisibleby(0)");
    return need_int(v, "divisibleby") % d == 0;
  }
  if (name == "equalto" || name == "eq" || name == "==") return equal(v, other());
  if (name == "ne" || name == "!=") return !equal(v, other());
  if (name == "lt" || name == "lessthan" || name == "<") return less(v, other());
  if (name == "gt" || name == "greaterthan" || name == ">") return less(other(), v);
  if (name == "le" || name == "<=") return !less(other(), v);
  if (name == "ge" || name == ">=") return !less(v, other());
  if (name == "in") return contains(other(), v);
  if (name == "sameas") {
    const Value& o = other();
    if (v.kind != o.kind) return false;
    if (v.kind == Value::List) return v.list == o.list;
    if (v.kind == Value::Dict) return v.dict == o.dict;
    return equal(v, o);
  }
  if (name == "lower" || name == "upper") {
    const auto& s = need_str(v, "the test lower/upper");
    return s == map_case(s, name == "upper");
  }
  throw Problem(0, "the test '" + name + "'", true);
}

class Renderer {
 public:
  explicit Renderer(const nlohmann::ordered_json& context) {
    if (context.is_object())
      for (const auto& [k, v] : context.items()) top_[k] = from_json(v);
    add_globals();
    scopes_ = {&globals_, &top_};
  }

  int line = 0;  // of the statement or expression being computed, for messages

  void run(const Node& root, std::string& out) { exec(root, out); }

 private:
  enum class Flow { Normal, Break, Continue };

  void step(int at) {
    line = at;
    if (++steps_ > kMaxSteps)
      throw Problem(at, "the template runs too long (over 20 million steps)");
  }

  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = (*it)->find(name);
      if (f != (*it)->end()) return f->second;
    }
    return Value::undefined("'" + name + "' is undefined");
  }

  // ---- globals and methods

  void add_globals() {
    globals_["raise_exception"] = Value::function([](Args& a) -> Value {
      throw Problem(a.line,
                    "raise_exception: " + (a.pos.empty() ? std::string() : to_str(a.pos[0])));
    });
    globals_["range"] = Value::function([](Args& a) {
      int64_t start = 0, stop = 0, st = 1;
      if (a.pos.size() == 1) {
        stop = need_int(a.pos[0], "range");
      } else if (a.pos.size() == 2 || a.pos.size() == 3) {
        start = need_int(a.pos[0], "range");
        stop = need_int(a.pos[1], "range");
        if (a.pos.size() == 3) st = need_int(a.pos[2], "range");
      } else {
        type_error("range expects 1 to 3 integers");
      }
      if (st == 0) type_error("range() step must not be zero");
      const double n = std::ceil((static_cast<double>(stop) - static_cast<double>(start)) /
                                 static_cast<double>(st));
      if (n > static_cast<double>(kMaxRange)) type_error("range() of more than 4 million items");
      ValueList items;
      for (int64_t k = start; st > 0 ? k < stop : k > stop; k += st)
        items.push_back(Value::integer(k));
      return Value::of_list(std::move(items));
    });
    auto make_dict = [](bool ns) {
      return [ns](Args& a) {
        auto d = std::make_shared<Object>();
        d->is_namespace = ns;
        for (const auto& p : a.pos) {
          if (p.kind != Value::Dict)
            type_error("namespace() and dict() take keyword arguments or a dict");
          for (const auto& [k, v] : p.dict->items) d->set(k, v);
        }
        for (const auto& [k, v] : a.kw) d->set(k, v);
        return Value::of_dict(std::move(d));
      };
    };
    globals_["namespace"] = Value::function(make_dict(true));
    globals_["dict"] = Value::function(make_dict(false));
    globals_["strftime_now"] = Value::function([](Args& a) {
      const std::string fmt = a.pos.empty() ? "" : need_str(a.pos[0], "strftime_now");
      if (fmt.size() > 256) type_error("strftime_now: the format is too long");
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[2048];
      const size_t n = fmt.empty() ? 0 : std::strftime(buf, sizeof buf, fmt.c_str(), &tm);
      return Value::string(std::string(buf, n));
    });
  }

  static Value method(const Value& obj, const std::string& name) {
    auto bind = [&](std::function<Value(const Value&, Args&)> f) {
      return Value::function([obj, f](Args& a) { return f(obj, a); });
    };
    if (obj.kind == Value::Dict && !obj.dict->is_namespace) {
      if (name == "items")
        return bind([](const Value& d, Args&) {
          ValueList out;
          for (const auto& [k, v] : d.dict->items)
            out.push_back(Value::of_list({Value::string(k), v}, true));
          return Value::of_list(std::move(out));
        });
      if (name == "keys")
        return bind([](const Value& d, Args&) { return Value::of_list(iterate(d)); });
      if (name == "values")
        return bind([](const Value& d, Args&) {
          ValueList out;
          for (const auto& kv : d.dict->items) out.push_back(kv.second);
          return Value::of_list(std::move(out));
        });
      if (name == "get")
        return bind([](const Value& d, Args& a) {
          if (a.pos.empty()) type_error("get() needs a key");
          const Value* v = a.pos[0].kind == Value::String ? d.dict->get(a.pos[0].s) : nullptr;
          return v ? *v : a.pos.size() > 1 ? a.pos[1] : Value::none();
        });
    }
    if (obj.kind == Value::String) {
      if (name == "startswith" || name == "endswith") {
        const bool start = name == "startswith";
        return bind([start](const Value& s, Args& a) {
          if (a.pos.empty()) type_error("startswith/endswith need an argument");
          ValueList options = a.pos[0].kind == Value::List ? *a.pos[0].list : ValueList{a.pos[0]};
          for (const auto& o : options) {
            const auto& p = need_str(o, "startswith/endswith");
            if (p.size() <= s.s.size() &&
                s.s.compare(start ? 0 : s.s.size() - p.size(), p.size(), p) == 0)
              return Value::boolean(true);
          }
          return Value::boolean(false);
        });
      }
      if (name == "strip" || name == "lstrip" || name == "rstrip") {
        const bool l = name != "rstrip", r = name != "lstrip";
        return bind([l, r](const Value& s, Args& a) {
          return Value::string(strip(s.s, arg(a, 0, "chars"), l, r));
        });
      }
      if (name == "split")
        return bind([](const Value& s, Args& a) {
          const Value* m = arg(a, 1, "maxsplit");
          return Value::of_list(split(s.s, arg(a, 0, "sep"), m ? need_int(*m, "split") : -1));
        });
      if (name == "upper" || name == "lower") {
        const bool up = name == "upper";
        return bind([up](const Value& s, Args&) { return Value::string(map_case(s.s, up)); });
      }
      if (name == "title" || name == "capitalize") {
        const bool first = name == "capitalize";
        return bind(
            [first](const Value& s, Args&) { return Value::string(title_case(s.s, first)); });
      }
      if (name == "replace")
        return bind([](const Value& s, Args& a) {
          if (a.pos.size() < 2) type_error("replace() needs two arguments");
          const Value* n = arg(a, 2, "count");
          return Value::string(replace(s.s, need_str(a.pos[0], "replace"),
                                       need_str(a.pos[1], "replace"),
                                       n ? need_int(*n, "replace") : -1));
        });
      if (name == "find" || name == "count" || name == "index") {
        return bind([name](const Value& s, Args& a) {
          if (a.pos.empty()) type_error(name + "() needs an argument");
          const auto& sub = need_str(a.pos[0], name.c_str());
          if (name == "count") {
            if (sub.empty()) return Value::integer(static_cast<int64_t>(str_length(s.s) + 1));
            int64_t n = 0;
            for (size_t at = s.s.find(sub); at != std::string::npos;
                 at = s.s.find(sub, at + sub.size()))
              ++n;
            return Value::integer(n);
          }
          const size_t at = s.s.find(sub);
          if (at == std::string::npos && name == "index") type_error("substring not found");
          return Value::integer(
              at == std::string::npos ? -1 : static_cast<int64_t>(str_length(s.s.substr(0, at))));
        });
      }
      if (name == "join")
        return bind([](const Value& s, Args& a) {
          if (a.pos.empty()) type_error("join() needs an argument");
          std::string out;
          bool first = true;
          for (const auto& x : iterate(a.pos[0])) {
            if (!first) out += s.s;
            out += need_str(x, "join");
            first = false;
          }
          return Value::string(std::move(out));
        });
      if (name == "isdigit" || name == "isspace" || name == "isalpha" || name == "isalnum") {
        return bind([name](const Value& s, Args&) {
          const auto cps = code_points(s.s);
          bool ok = !cps.empty();
          for (auto c : cps) {
            const auto cat = utf8proc_category(c);
            const bool alpha = cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
            const bool digit = cat == UTF8PROC_CATEGORY_ND;
            ok = ok && (name == "isdigit"   ? digit
                        : name == "isspace" ? py_space(c)
                        : name == "isalpha" ? alpha
                                            : alpha || digit);
          }
          return Value::boolean(ok);
        });
      }
    }
    return Value::undefined(std::string("'") + type_name(obj) + "' object has no attribute '" +
                            name + "'");
  }

  Value attribute(const Value& obj, const std::string& name) {
    if (obj.kind == Value::Undefined) throw Problem(line, obj.s);
    if (obj.kind == Value::Dict) {
      auto m = method(obj, name);
      if (m.kind == Value::Func) return m;
      if (const Value* v = obj.dict->get(name)) return *v;
      return Value::undefined(std::string("'") + type_name(obj) + "' object has no attribute '" +
                              name + "'");
    }
    return method(obj, name);
  }

  Value item(const Value& obj, const Value& key) {
    switch (obj.kind) {
      case Value::Undefined:
        throw Problem(line, obj.s);
      case Value::Dict: {
        if (key.kind == Value::String)
          if (const Value* v = obj.dict->get(key.s)) return *v;
        return Value::undefined("'dict object' has no attribute " + to_str(key, true));
      }
      case Value::List:
      case Value::String: {
        if (key.kind != Value::Int && key.kind != Value::Bool)
          return key.kind == Value::String ? method(obj, key.s)
                                           : Value::undefined("indices must be integers");
        const auto cps = obj.kind == Value::String ? code_points(obj.s) : std::vector<int32_t>{};
        const int64_t n = obj.kind == Value::String ? static_cast<int64_t>(cps.size())
                                                    : static_cast<int64_t>(obj.list->size());
        int64_t k = key.as_int();
        if (k < 0) k += n;
        if (k < 0 || k >= n)
          return Value::undefined(std::string("'") + type_name(obj) + " object' has no element " +
                                  to_str(key));
        if (obj.kind == Value::List) return (*obj.list)[static_cast<size_t>(k)];
        return Value::string(
            from_code_points(cps, static_cast<size_t>(k), static_cast<size_t>(k) + 1));
      }
      default:
        return Value::undefined(std::string("'") + type_name(obj) +
                                "' object is not subscriptable");
    }
  }

  // ---- filters

  Value filter(const std::string& name, const Value& v, Args& a) {
    auto seq_len = [&](const Value& x) -> int64_t {
      switch (x.kind) {
        case Value::String:
          return static_cast<int64_t>(str_length(x.s));
        case Value::List:
          return static_cast<int64_t>(x.list->size());
        case Value::Dict:
          return static_cast<int64_t>(x.dict->items.size());
        case Value::Undefined:
          return 0;
        default:
          type_error(std::string("object of type '") + type_name(x) + "' has no len()");
      }
    };
    if (name == "length" || name == "count") return Value::integer(seq_len(v));
    if (name == "safe") return v;
    if (name == "string") return Value::string(to_str(v));
    if (name == "trim") return Value::string(strip(to_str(v), arg(a, 0, "chars"), true, true));
    if (name == "upper" || name == "lower")
      return Value::string(map_case(to_str(v), name == "upper"));
    if (name == "title" || name == "capitalize")
      return Value::string(title_case(to_str(v), name == "capitalize"));
    if (name == "default" || name == "d") {
      const Value* b = arg(a, 1, "boolean");
      const bool use = v.kind == Value::Undefined || (b && truthy(*b) && !truthy(v));
      if (!use) return v;
      const Value* d = arg(a, 0, "default_value");
      return d ? *d : Value::string("");
    }
    if (name == "tojson") {
      JsonStyle st;
      if (const Value* i = arg(a, 0, "indent"); i && i->kind != Value::None) {
        st.indent = std::clamp<int64_t>(need_int(*i, "tojson indent"), 0, 64);
        st.item_sep = ",";
      }
      if (const Value* sep = kwarg(a, "separators");
          sep && sep->kind == Value::List && sep->list->size() == 2) {
        st.item_sep = need_str((*sep->list)[0], "tojson separators");
        st.key_sep = need_str((*sep->list)[1], "tojson separators");
      }
      if (const Value* k = kwarg(a, "sort_keys")) st.sort_keys = truthy(*k);
      std::string out;
      to_json(v, st, 0, out);
      return Value::string(std::move(out));
    }
    if (name == "first" || name == "last") {
      auto items = iterate(v);
      if (items.empty()) return Value::undefined("the sequence is empty");
      return name == "first" ? items.front() : items.back();
    }
    if (name == "join") {
      const Value* sep = arg(a, 0, "d");
      const Value* attr = arg(a, 1, "attribute");
      std::string out;
      bool first = true;
      for (const auto& x : iterate(v)) {
        if (!first) out += sep ? to_str(*sep) : "";
        out += to_str(attr ? attribute(x, to_str(*attr)) : x);
        if (out.size() > kMaxOutput) type_error("join: the text grows past 64 MiB");
        first = false;
      }
      return Value::string(std::move(out));
    }
    if (name == "list") return Value::of_list(iterate(v));
    if (name == "items") {
      if (v.kind == Value::Undefined) return Value::of_list({});
      if (v.kind != Value::Dict) type_error("items expects a mapping");
      Args none;
      return method(v, "items").fn->operator()(none);
    }
    if (name == "reverse") {
      if (v.kind == Value::String) {
        auto cps = code_points(v.s);
        std::reverse(cps.begin(), cps.end());
        return Value::string(from_code_points(cps, 0, cps.size()));
      }
      auto items = iterate(v);
      std::reverse(items.begin(), items.end());
      return Value::of_list(std::move(items));
    }
    if (name == "int") {
      const Value* d = arg(a, 0, "default");
      const Value fallback = d ? *d : Value::integer(0);
      if (v.kind == Value::Int || v.kind == Value::Bool) return Value::integer(v.as_int());
      if (v.kind == Value::Float)
        return std::isfinite(v.f) && std::fabs(v.f) < 9.2e18
                   ? Value::integer(static_cast<int64_t>(v.f))
                   : fallback;
      if (v.kind == Value::String) {
        const std::string t = strip(v.s, nullptr, true, true);
        char* end = nullptr;
        errno = 0;
        const long long n = std::strtoll(t.c_str(), &end, 10);
        if (!t.empty() && *end == 0 && errno == 0) return Value::integer(n);
        const double f = std::strtod(t.c_str(), &end);
        if (!t.empty() && *end == 0 && std::isfinite(f) && std::fabs(f) < 9.2e18)
          return Value::integer(static_cast<int64_t>(f));
      }
      return fallback;
    }
    if (name == "float") {
      const Value* d = arg(a, 0, "default");
      if (v.numeric()) return Value::number(v.as_double());
      if (v.kind == Value::String) {
        const std::string t = strip(v.s, nullptr, true, true);
        char* end = nullptr;
        const double f = std::strtod(t.c_str(), &end);
        if (!t.empty() && *end == 0) return Value::number(f);
      }
      return d ? *d : Value::number(0.0);
    }
    if (name == "abs") {
      if (v.kind == Value::Float) return Value::number(std::fabs(v.f));
      const int64_t n = need_int(v, "abs");
      if (n == INT64_MIN) type_error("integer overflow in abs");
      return Value::integer(n < 0 ? -n : n);
    }
    if (name == "round") {
      const Value* p = arg(a, 0, "precision");
      const Value* m = arg(a, 1, "method");
      const int64_t digits = p ? std::clamp<int64_t>(need_int(*p, "round"), -300, 300) : 0;
      const std::string how = m ? need_str(*m, "round") : "common";
      if (!v.numeric()) type_error("round expects a number");
      const double scale = std::pow(10.0, static_cast<double>(digits));
      const double x = v.as_double() * scale;
      const double r = how == "floor"  ? std::floor(x)
                       : how == "ceil" ? std::ceil(x)
                                       : std::round(x);
      return Value::number(r / scale);
    }
    if (name == "replace") {
      if (a.pos.size() < 2) type_error("replace needs two arguments");
      const Value* n = arg(a, 2, "count");
      return Value::string(
          replace(to_str(v), to_str(a.pos[0]), to_str(a.pos[1]), n ? need_int(*n, "replace") : -1));
    }
    if (name == "indent") {
      const Value* w = arg(a, 0, "width");
      const Value* first = arg(a, 1, "first");
      const Value* blank = arg(a, 2, "blank");
      const std::string pad = w && w->kind == Value::String
                                  ? w->s
                                  : std::string(static_cast<size_t>(std::clamp<int64_t>(
                                                    w ? need_int(*w, "indent") : 4, 0, 256)),
                                                ' ');
      std::string text = to_str(v), out;
      size_t at = 0, index = 0;
      while (at <= text.size()) {
        size_t nl = text.find('\n', at);
        const std::string l =
            text.substr(at, nl == std::string::npos ? std::string::npos : nl - at);
        const bool indent_it =
            (index > 0 || (first && truthy(*first))) && (!l.empty() || (blank && truthy(*blank)));
        out += (indent_it ? pad : "") + l;
        if (nl == std::string::npos) break;
        out += '\n';
        at = nl + 1;
        ++index;
        if (out.size() > kMaxOutput) type_error("indent: the text grows past 64 MiB");
      }
      return Value::string(std::move(out));
    }
    if (name == "wordcount")
      return Value::integer(static_cast<int64_t>(split(to_str(v), nullptr, -1).size()));
    if (name == "escape" || name == "e") {
      std::string out;
      for (char c : to_str(v)) {
        switch (c) {
          case '&':
            out += "&amp;";
            break;
          case '<':
            out += "&lt;";
            break;
          case '>':
            out += "&gt;";
            break;
          case '"':
            out += "&#34;";
            break;
          case '\'':
            out += "&#39;";
            break;
          default:
            out += c;
        }
      }
      return Value::string(std::move(out));
    }
    if (name == "attr") {
      if (a.pos.empty()) type_error("attr needs a name");
      return attribute(v, need_str(a.pos[0], "attr"));
    }
    if (name == "map") {
      ValueList out;
      const Value* attr = kwarg(a, "attribute");
      for (const auto& x : iterate(v)) {
        if (attr) {
          Value got = attribute(x, to_str(*attr));
          if (got.kind == Value::Undefined)
            if (const Value* d = kwarg(a, "default")) got = *d;
          out.push_back(got);
        } else {
          if (a.pos.empty()) type_error("map needs a filter name or attribute=");
          Args rest;
          rest.line = a.line;
          rest.pos.assign(a.pos.begin() + 1, a.pos.end());
          rest.kw = a.kw;
          out.push_back(filter(need_str(a.pos[0], "map"), x, rest));
        }
      }
      return Value::of_list(std::move(out));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      const bool by_attr = name.size() > 6;
      const bool keep_true = name[0] == 's';
      ValueList out;
      for (const auto& x : iterate(v)) {
        size_t at = 0;
        Value subject = x;
        if (by_attr) {
          if (a.pos.empty()) type_error(name + " needs an attribute name");
          subject = attribute(x, need_str(a.pos[0], name.c_str()));
          at = 1;
        }
        bool ok;
        if (a.pos.size() > at) {
          Args targs;
          targs.line = a.line;
          targs.pos.assign(a.pos.begin() + static_cast<long>(at) + 1, a.pos.end());
          ok = test(need_str(a.pos[at], name.c_str()), subject, targs);
        } else {
          ok = truthy(subject);
        }
        if (ok == keep_true) out.push_back(x);
      }
      return Value::of_list(std::move(out));
    }
    if (name == "unique") {
      ValueList out;
      for (const auto& x : iterate(v))
        if (std::none_of(out.begin(), out.end(), [&](const Value& y) { return equal(x, y); }))
          out.push_back(x);
      return Value::of_list(std::move(out));
    }
    if (name == "sort" || name == "min" || name == "max") {
      auto items = iterate(v);
      const Value* attr = kwarg(a, "attribute");
      auto key = [&](const Value& x) { return attr ? attribute(x, to_str(*attr)) : x; };
      std::stable_sort(items.begin(), items.end(),
                       [&](const Value& x, const Value& y) { return less(key(x), key(y)); });
      if (name == "min" || name == "max") {
        if (items.empty()) return Value::undefined("no items");
        return name == "min" ? items.front() : items.back();
      }
      const Value* rev = arg(a, 0, "reverse");
      if (rev && truthy(*rev)) std::reverse(items.begin(), items.end());
      return Value::of_list(std::move(items));
    }
    if (name == "sum") {
      Value total = Value::integer(0);
      const Value* attr = kwarg(a, "attribute");
      for (const auto& x : iterate(v))
        total = arithmetic("+", total, attr ? attribute(x, to_str(*attr)) : x);
      return total;
    }
    throw Problem(a.line, "the filter '" + name + "'", true);
  }

  // ---- expressions

  Args call_args(const Expr& e, size_t first) {
    Args a;
    a.line = e.line;
    for (size_t k = first; k < e.args.size(); ++k) a.pos.push_back(eval(*e.args[k]));
    for (const auto& [k, x] : e.kwargs) a.kw.emplace_back(k, eval(*x));
    return a;
  }

  Value eval(const Expr& e) {
    step(e.line);
    switch (e.type) {
      case Expr::Literal:
        return e.value;
      case Expr::Name:
        return lookup(e.name);
      case Expr::ListLit:
      case Expr::TupleLit: {
        ValueList items;
        for (const auto& x : e.args) items.push_back(eval(*x));
        return Value::of_list(std::move(items), e.type == Expr::TupleLit);
      }
      case Expr::DictLit: {
        auto d = std::make_shared<Object>();
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          const Value key = eval(*e.args[k]);
          if (key.kind != Value::String)
            type_error("lorafit's templates take string dict keys only");
          d->set(key.s, eval(*e.args[k + 1]));
        }
        return Value::of_dict(std::move(d));
      }
      case Expr::Attr: {
        const Value obj = eval(*e.args[0]);
        line = e.line;
        return attribute(obj, e.name);
      }
      case Expr::Item: {
        const Value obj = eval(*e.args[0]);
        const Value key = eval(*e.args[1]);
        line = e.line;
        return item(obj, key);
      }
      case Expr::Slice: {
        const Value obj = eval(*e.args[0]);
        Value bounds[3];
        for (int k = 0; k < 3; ++k)
          bounds[k] = e.args[1 + k] ? eval(*e.args[1 + k]) : Value::none();
        line = e.line;
        if (obj.kind == Value::Undefined) throw Problem(line, obj.s);
        if (obj.kind != Value::List && obj.kind != Value::String)
          type_error(std::string("'") + type_name(obj) + "' object cannot be sliced");
        const auto cps = obj.kind == Value::String ? code_points(obj.s) : std::vector<int32_t>{};
        const int64_t n = obj.kind == Value::String ? static_cast<int64_t>(cps.size())
                                                    : static_cast<int64_t>(obj.list->size());
        const auto idx = slice_indices(n, &bounds[0], &bounds[1], &bounds[2]);
        if (obj.kind == Value::String) {
          std::string out;
          for (auto k : idx)
            out += from_code_points(cps, static_cast<size_t>(k), static_cast<size_t>(k) + 1);
          return Value::string(std::move(out));
        }
        ValueList items;
        for (auto k : idx) items.push_back((*obj.list)[static_cast<size_t>(k)]);
        return Value::of_list(std::move(items), obj.tuple);
      }
      case Expr::Call: {
        const Value callee = eval(*e.args[0]);
        Args a = call_args(e, 1);
        line = e.line;
        if (callee.kind == Value::Undefined) throw Problem(e.line, callee.s);
        if (callee.kind != Value::Func)
          type_error(std::string("'") + type_name(callee) + "' object is not callable");
        return (*callee.fn)(a);
      }
      case Expr::Filter: {
        const Value v = eval(*e.args[0]);
        Args a = call_args(e, 1);
        line = e.line;
        return filter(e.name, v, a);
      }
      case Expr::Test: {
        const Value v = eval(*e.args[0]);
        Args a = call_args(e, 1);
        line = e.line;
        return Value::boolean(test(e.name, v, a) != e.negated);
      }
      case Expr::Not:
        return Value::boolean(!truthy(eval(*e.args[0])));
      case Expr::Neg:
      case Expr::Pos: {
        const Value v = eval(*e.args[0]);
        if (!v.numeric())
          type_error(std::string("bad operand type for unary ") +
                     (e.type == Expr::Neg ? "-" : "+") + ": '" + type_name(v) + "'");
        if (e.type == Expr::Pos) return v.kind == Value::Float ? v : Value::integer(v.as_int());
        if (v.kind == Value::Float) return Value::number(-v.f);
        if (v.as_int() == INT64_MIN) type_error("integer overflow in unary -");
        return Value::integer(-v.as_int());
      }
      case Expr::Binary: {
        const Value a = eval(*e.args[0]);
        const Value b = eval(*e.args[1]);
        line = e.line;
        return arithmetic(e.name, a, b);
      }
      case Expr::And: {
        Value a = eval(*e.args[0]);
        return truthy(a) ? eval(*e.args[1]) : a;
      }
      case Expr::Or: {
        Value a = eval(*e.args[0]);
        return truthy(a) ? a : eval(*e.args[1]);
      }
      case Expr::Cond:
        if (truthy(eval(*e.args[1]))) return eval(*e.args[0]);
        return e.args[2] ? eval(*e.args[2])
                         : Value::undefined("the conditional expression has no else");
      case Expr::Compare: {
        Value left = eval(*e.args[0]);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value right = eval(*e.args[k + 1]);
          line = e.line;
          const auto& op = e.ops[k];
          const bool ok = op == "=="   ? equal(left, right)
                          : op == "!=" ? !equal(left, right)
                          : op == "<"  ? less(left, right)
                          : op == ">"  ? less(right, left)
                          : op == "<=" ? !less(right, left)
                          : op == ">=" ? !less(left, right)
                          : op == "in" ? contains(right, left)
                                       : !contains(right, left);
          if (!ok) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
    }
    return Value::undefined("");
  }

  // ---- statements

  void emit(std::string& out, const std::string& text) {
    if (out.size() + text.size() > kMaxOutput)
      throw Problem(line, "the rendering grows past 64 MiB");
    out += text;
  }

  void bind(Scope& scope, const std::vector<std::string>& names, const Value& v) {
    if (names.size() == 1) {
      scope[names[0]] = v;
      return;
    }
    const auto items = iterate(v);
    if (items.size() != names.size())
      type_error("cannot unpack " + std::to_string(items.size()) + " values into " +
                 std::to_string(names.size()));
    for (size_t k = 0; k < names.size(); ++k) scope[names[k]] = items[k];
  }

  Flow exec(const Node& n, std::string& out) {
    step(n.line);
    switch (n.type) {
      case Node::Body:
        for (const auto& k : n.kids) {
          const Flow f = exec(*k, out);
          if (f != Flow::Normal) return f;
        }
        return Flow::Normal;
      case Node::Text:
        emit(out, n.text);
        return Flow::Normal;
      case Node::Output: {
        const std::string text = to_str(eval(*n.exprs[0]));
        emit(out, text);
        return Flow::Normal;
      }
      case Node::If:
        for (size_t k = 0; k < n.exprs.size(); ++k)
          if (truthy(eval(*n.exprs[k]))) return exec(*n.kids[k], out);
        return n.kids.size() > n.exprs.size() ? exec(*n.kids.back(), out) : Flow::Normal;
      case Node::For:
        return run_for(n, out);
      case Node::Set: {
        const Value v = eval(*n.exprs[0]);
        line = n.line;
        if (n.attr) {
          const Value ns = lookup(n.names[0]);
          if (ns.kind != Value::Dict || !ns.dict->is_namespace)
            type_error("cannot set '" + n.names[1] + "' on '" + n.names[0] +
                       "', which is no namespace()");
          ns.dict->set(n.names[1], v);
        } else {
          bind(*scopes_.back(), n.names, v);
        }
        return Flow::Normal;
      }
      case Node::SetBlock: {
        std::string text;
        const Flow f = exec(*n.kids[0], text);
        (*scopes_.back())[n.text] = Value::string(std::move(text));
        return f;
      }
      case Node::Macro:
        (*scopes_.back())[n.text] = macro(n);
        return Flow::Normal;
      case Node::Break:
        return Flow::Break;
      case Node::Continue:
        return Flow::Continue;
    }
    return Flow::Normal;
  }

  Flow run_for(const Node& n, std::string& out) {
    ValueList items = iterate(eval(*n.exprs[0]));
    if (n.exprs[1]) {  // {% for x in xs if cond %}: the loop sees only the items that pass
      ValueList kept;
      for (auto& x : items) {
        Scope probe;
        line = n.line;
        bind(probe, n.names, x);
        scopes_.push_back(&probe);
        const bool ok = truthy(eval(*n.exprs[1]));
        scopes_.pop_back();
        if (ok) kept.push_back(std::move(x));
      }
      items = std::move(kept);
    }
    if (items.empty()) return n.kids.size() > 1 ? exec(*n.kids[1], out) : Flow::Normal;
    const int64_t count = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < count; ++k) {
      step(n.line);
      Scope scope;
      bind(scope, n.names, items[static_cast<size_t>(k)]);
      auto loop = std::make_shared<Object>();
      loop->items = {{"index", Value::integer(k + 1)},
                     {"index0", Value::integer(k)},
                     {"revindex", Value::integer(count - k)},
                     {"revindex0", Value::integer(count - k - 1)},
                     {"first", Value::boolean(k == 0)},
                     {"last", Value::boolean(k == count - 1)},
                     {"length", Value::integer(count)},
                     {"depth", Value::integer(1)},
                     {"depth0", Value::integer(0)},
                     {"previtem", k > 0 ? items[static_cast<size_t>(k - 1)]
                                        : Value::undefined("there is no previous item")},
                     {"nextitem", k + 1 < count ? items[static_cast<size_t>(k + 1)]
                                                : Value::undefined("there is no next item")}};
      loop->items.emplace_back("cycle", Value::function([k](Args& a) {
                                 if (a.pos.empty()) type_error("loop.cycle needs arguments");
                                 return a.pos[static_cast<size_t>(k) % a.pos.size()];
                               }));
      scope["loop"] = Value::of_dict(loop);
      scopes_.push_back(&scope);
      Flow f;
      try {
        f = exec(*n.kids[0], out);
      } catch (...) {
        scopes_.pop_back();
        throw;
      }
      scopes_.pop_back();
      if (f == Flow::Break) break;
    }
    return Flow::Normal;
  }

  Value macro(const Node& n) {
    return Value::function([this, &n](Args& a) {
      if (++calls_ > kMaxCalls) throw Problem(n.line, "macros call each other too deeply");
      if (a.pos.size() > n.params.size())
        type_error("macro '" + n.text + "' takes " + std::to_string(n.params.size()) +
                   " arguments");
      Scope args;
      auto saved = scopes_;
      scopes_ = {&globals_, &top_, &args};
      for (size_t k = 0; k < n.params.size(); ++k) {
        const auto& [pname, fallback] = n.params[k];
        const Value* given = k < a.pos.size() ? &a.pos[k] : kwarg(a, pname.c_str());
        args[pname] = given      ? *given
                      : fallback ? eval(*fallback)
                                 : Value::undefined("'" + pname + "' is undefined");
      }
      std::string text;
      try {
        exec(*n.kids[0], text);
      } catch (...) {
        scopes_ = saved;
        --calls_;
        throw;
      }
      scopes_ = saved;
      --calls_;
      return Value::string(std::move(text));
    });
  }

  Scope globals_, top_;
  std::vector<Scope*> scopes_;
  size_t steps_ = 0;
  int calls_ = 0;
};

}  // namespace

Template::Template(const std::string& source, const std::string& name) : name_(name) {
  try {
    root_ = StmtParser(lex(source)).parse();
  } catch (const Problem& p) {
    throw TemplateError(name_ + ", line " + std::to_string(p.line) + ": " +
                        (p.unsupported
                             ? std::string(p.what()) + " is not supported by lorafit's template "
                                                       "interpreter"
                             : std::string("syntax error: ") + p.what()));
  }
}

Template::~Template() = default;
Template::Template(Template&&) noexcept = default;

std::string Template::render(const nlohmann::ordered_json& context) const {
  Renderer r(context);
  std::string out;
  try {
    r.run(*root_, out);
  } catch (const Problem& p) {
    const int at = p.line > 0 ? p.line : r.line;
    throw TemplateError(name_ + ", line " + std::to_string(at) + ": " +
                        (p.unsupported
                             ? std::string(p.what()) + " is not supported by lorafit's template "
                                                       "interpreter"
                             : std::string(p.what())));
  }
  return out;
}

}  // namespace lorafit::jinja
