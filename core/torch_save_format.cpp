#include "core/torch_save_format.h"

#include <array>
#include <cstring>
#include <deque>
#include <limits>

#include "core/errors.h"

namespace lorafit {

namespace {

// --- zip (stored entries only: torch.save never compresses) ------------------------------

constexpr uint32_t kLocalHeader = 0x04034b50, kCentralHeader = 0x02014b50, kEnd = 0x06054b50,
                   kEnd64 = 0x06064b50, kEnd64Locator = 0x07064b50;
constexpr uint64_t kAlign = 64;  // torch.save aligns every entry's data for mmap

const std::array<uint32_t, 256>& crc_table() {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

uint32_t crc32(const uint8_t* p, size_t n) {
  const auto& t = crc_table();
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = t[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

struct ZipEntry {
  uint64_t offset = 0;  // of the data, in the file
  uint64_t size = 0;
  uint32_t crc = 0;
  bool checked = false;
};

// Reads little-endian integers at checked positions of the file.
struct Bytes {
  const uint8_t* data;
  uint64_t size;
  const std::string& path;

  [[noreturn]] void fail(const std::string& what) const {
    throw IoError("'" + path + "' is not a readable torch.save file: " + what +
                  " (hint: is it truncated or damaged? re-save it with torch.save)");
  }
  uint64_t le(uint64_t at, int n) const {
    if (at > size || static_cast<uint64_t>(n) > size - at) fail("a record runs past the end");
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = v << 8 | data[at + i];
    return v;
  }
};

std::map<std::string, ZipEntry> read_zip(const Bytes& b) {
  if (b.size < 22) b.fail("too short for a zip archive");
  // The end record is the last 22 bytes plus a comment of at most 65535 bytes.
  uint64_t end = b.size - 22;
  const uint64_t lowest = b.size > 22 + 65535 ? b.size - 22 - 65535 : 0;
  while (b.le(end, 4) != kEnd) {
    if (end == lowest) b.fail("no end-of-archive record");
    --end;
  }
  uint64_t count = b.le(end + 10, 2), cd_size = b.le(end + 12, 4), cd_offset = b.le(end + 16, 4);
  if (count == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {
    if (end < 20 || b.le(end - 20, 4) != kEnd64Locator) b.fail("no zip64 end-record locator");
    const uint64_t end64 = b.le(end - 20 + 8, 8);
    if (b.le(end64, 4) != kEnd64) b.fail("no zip64 end record");
    count = b.le(end64 + 32, 8);
    cd_size = b.le(end64 + 40, 8);
    cd_offset = b.le(end64 + 48, 8);
  }
  if (cd_offset > b.size || cd_size > b.size - cd_offset) b.fail("the directory lies outside");
  std::map<std::string, ZipEntry> out;
  uint64_t at = cd_offset;
  for (uint64_t i = 0; i < count; ++i) {
    if (b.le(at, 4) != kCentralHeader) b.fail("a damaged directory entry");
    const uint64_t flags = b.le(at + 8, 2), method = b.le(at + 10, 2);
    ZipEntry e;
    e.crc = static_cast<uint32_t>(b.le(at + 16, 4));
    uint64_t csize = b.le(at + 20, 4), usize = b.le(at + 24, 4);
    const uint64_t name_len = b.le(at + 28, 2), extra_len = b.le(at + 30, 2),
                   comment_len = b.le(at + 32, 2);
    uint64_t local = b.le(at + 42, 4);
    if (46 + name_len + extra_len + comment_len > b.size - at)
      b.fail("a directory entry runs past the end");
    const std::string name(reinterpret_cast<const char*>(b.data + at + 46), name_len);
    // zip64: the sizes and offset that do not fit 32 bits follow in extra field 0x0001.
    for (uint64_t x = at + 46 + name_len; x + 4 <= at + 46 + name_len + extra_len;) {
      const uint64_t id = b.le(x, 2), len = b.le(x + 2, 2);
      uint64_t f = x + 4;
      if (id == 1) {
        if (usize == 0xFFFFFFFF) usize = b.le(f, 8), f += 8;
        if (csize == 0xFFFFFFFF) csize = b.le(f, 8), f += 8;
        if (local == 0xFFFFFFFF) local = b.le(f, 8);
      }
      x += 4 + len;
    }
    if (method != 0 || csize != usize) b.fail("entry '" + name + "' is compressed");
    if (flags & 1) b.fail("entry '" + name + "' is encrypted");
    if (b.le(local, 4) != kLocalHeader) b.fail("entry '" + name + "' has no local header");
    e.offset = local + 30 + b.le(local + 26, 2) + b.le(local + 28, 2);
    e.size = usize;
    if (e.offset > b.size || e.size > b.size - e.offset)
      b.fail("entry '" + name + "' runs past the end");
    if (!out.emplace(name, e).second) b.fail("entry '" + name + "' appears twice");
    at += 46 + name_len + extra_len + comment_len;
  }
  return out;
}

void put_le(std::string& out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out.push_back(static_cast<char>(v >> (8 * i) & 0xFF));
}

// --- the pickle --------------------------------------------------------------------------

// Values live in the unpickler's arena and refer to each other by pointer: a hostile pickle
// can make cycles and deep nests, which neither leak nor recurse when the arena goes.
struct Value;
using Ref = Value*;

struct Value {
  enum Kind { None, Bool, Int, Float, Str, Tuple, List, Dict, Global, Storage, Tensor } kind;
  int64_t i = 0;                             // Bool, Int; Storage: its numel
  double f = 0;                              // Float
  std::string s;                             // Str; Global: "module.name"
  std::vector<Ref> items;                    // Tuple, List
  std::vector<std::pair<Ref, Ref>> entries;  // Dict
  PtTensor tensor;                           // Tensor; Storage: dtype and key
};

// The storage classes that torch.save names in a persistent id, with their dtypes.
const std::map<std::string, StDtype>& storage_types() {
  static const std::map<std::string, StDtype> types = {
      {"torch.DoubleStorage", StDtype::F64}, {"torch.FloatStorage", StDtype::F32},
      {"torch.HalfStorage", StDtype::F16},   {"torch.BFloat16Storage", StDtype::BF16},
      {"torch.LongStorage", StDtype::I64},   {"torch.IntStorage", StDtype::I32},
      {"torch.ShortStorage", StDtype::I16},  {"torch.CharStorage", StDtype::I8},
      {"torch.ByteStorage", StDtype::U8},    {"torch.BoolStorage", StDtype::BOOL}};
  return types;
}

constexpr const char* kRebuildTensor = "torch._utils._rebuild_tensor_v2";
constexpr const char* kRebuildParameter = "torch._utils._rebuild_parameter";
constexpr const char* kOrderedDict = "collections.OrderedDict";

bool allowed_global(const std::string& name) {
  return name == kRebuildTensor || name == kRebuildParameter || name == kOrderedDict ||
         storage_types().count(name);
}

class Unpickler {
 public:
  Unpickler(const uint8_t* p, uint64_t n, const std::string& path) : p_(p), n_(n), path_(path) {}

  Ref run() {
    while (true) {
      const uint8_t op = byte();
      switch (op) {
        case 0x80:
          byte();
          break;  // PROTO
        case 0x95:
          bytes(8);
          break;     // FRAME: a length hint
        case '.': {  // STOP
          if (stack_.size() != 1 || !marks_.empty()) fail("the pickle ends with a broken stack");
          return stack_.back();
        }
        case '}':
          push(make(Value::Dict));
          break;
        case ']':
          push(make(Value::List));
          break;
        case ')':
          push(make(Value::Tuple));
          break;
        case '(':
          marks_.push_back(stack_.size());
          break;
        case 'N':
          push(make(Value::None));
          break;
        case 0x88:
        case 0x89: {
          auto v = make(Value::Bool);
          v->i = op == 0x88;
          push(v);
          break;
        }
        case 'K':
          push_int(static_cast<int64_t>(le(1)));
          break;
        case 'M':
          push_int(static_cast<int64_t>(le(2)));
          break;
        case 'J':
          push_int(static_cast<int32_t>(le(4)));
          break;
        case 0x8a: {  // LONG1: a little-endian two's complement of n bytes
          const uint64_t n = le(1);
          if (n > 8) fail("an integer of more than 64 bits");
          uint64_t v = n ? le(static_cast<int>(n)) : 0;
          if (n && n < 8 && (v >> (8 * n - 1) & 1)) v |= ~uint64_t{0} << (8 * n);
          push_int(static_cast<int64_t>(v));
          break;
        }
        case 'G': {  // BINFLOAT: big-endian double
          uint64_t bits = 0;
          for (int k = 0; k < 8; ++k) bits = bits << 8 | byte();
          auto v = make(Value::Float);
          std::memcpy(&v->f, &bits, 8);
          push(v);
          break;
        }
        case 'X':  // BINUNICODE
        case 'T':  // BINSTRING
          push_str(bytes(le(4)));
          break;
        case 0x8c:  // SHORT_BINUNICODE
        case 'U':   // SHORT_BINSTRING
          push_str(bytes(le(1)));
          break;
        case 'c': {  // GLOBAL module\nname\n
          const auto module = line(), name = line();
          push_global(module + "." + name);
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          const auto name = pop(Value::Str, "a global's name"),
                     module = pop(Value::Str, "a module");
          push_global(module->s + "." + name->s);
          break;
        }
        case 't': {
          auto v = make(Value::Tuple);
          v->items = pop_mark();
          push(v);
          break;
        }
        case 0x85:
        case 0x86:
        case 0x87: {
          auto v = make(Value::Tuple);
          v->items.resize(op - 0x84);
          for (size_t k = v->items.size(); k-- > 0;) v->items[k] = pop();
          push(v);
          break;
        }
        case 'q':  // BINPUT
        case 'r':  // LONG_BINPUT
          memo_[le(op == 'q' ? 1 : 4)] = top();
          break;
        case 0x94:  // MEMOIZE
          memo_[memo_.size()] = top();
          break;
        case 'h':  // BINGET
        case 'j':  // LONG_BINGET
          push(memo(le(op == 'h' ? 1 : 4)));
          break;
        case 's': {  // SETITEM
          auto value = pop(), key = pop();
          set_items(top(), {key, value});
          break;
        }
        case 'u':
          set_items(nullptr, pop_mark());
          break;     // SETITEMS
        case 'a': {  // APPEND
          auto value = pop();
          append(top(), {value});
          break;
        }
        case 'e':
          append(nullptr, pop_mark());
          break;  // APPENDS
        case 'Q':
          persistent_id();
          break;  // BINPERSID
        case 'R':
          reduce();
          break;
        default: {
          static const char hex[] = "0123456789abcdef";
          fail(std::string("pickle opcode 0x") + hex[op >> 4] + hex[op & 15] +
               " is not one torch.save writes for tensors");
        }
      }
      if (stack_.size() > kMaxStack || memo_.size() > kMaxStack)
        fail("a pickle too deep to be tensors");
    }
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw IoError("'" + path_ + "': " + what +
                  " (hint: lorafit reads torch.save files of tensors only, and runs nothing "
                  "from them)");
  }

 private:
  static constexpr size_t kMaxStack = 1 << 20;

  Ref make(Value::Kind kind) {
    arena_.emplace_back();
    arena_.back().kind = kind;
    return &arena_.back();
  }

  uint8_t byte() {
    if (at_ >= n_) fail("the pickle ends early");
    return p_[at_++];
  }
  uint64_t le(int n) {
    uint64_t v = 0;
    for (int k = 0; k < n; ++k) v |= static_cast<uint64_t>(byte()) << (8 * k);
    return v;
  }
  std::string bytes(uint64_t n) {
    if (n > n_ - at_) fail("the pickle ends early");
    std::string s(reinterpret_cast<const char*>(p_ + at_), n);
    at_ += n;
    return s;
  }
  std::string line() {
    std::string s;
    for (uint8_t c; (c = byte()) != '\n';) {
      if (s.size() > 256) fail("a global's name is too long");
      s.push_back(static_cast<char>(c));
    }
    return s;
  }
  void push(Ref v) { stack_.push_back(std::move(v)); }
  void push_int(int64_t i) {
    auto v = make(Value::Int);
    v->i = i;
    push(v);
  }
  void push_str(std::string s) {
    auto v = make(Value::Str);
    v->s = std::move(s);
    push(v);
  }
  void push_global(const std::string& name) {
    if (!allowed_global(name)) {
      fail("the pickle names '" + name +
           "', which is not a tensor or a container of tensors; refused without running it");
    }
    auto v = make(Value::Global);
    v->s = name;
    push(v);
  }
  size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  Ref top() {
    if (stack_.size() <= floor()) fail("the pickle's stack is empty where a value is needed");
    return stack_.back();
  }
  Ref pop() {
    auto v = top();
    stack_.pop_back();
    return v;
  }
  Ref pop(Value::Kind kind, const char* what) {
    auto v = pop();
    if (v->kind != kind) fail(std::string("expected ") + what + " in the pickle");
    return v;
  }
  std::vector<Ref> pop_mark() {
    if (marks_.empty()) fail("the pickle pops a mark it never set");
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<Ref> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  Ref memo(uint64_t key) {
    const auto it = memo_.find(key);
    if (it == memo_.end()) fail("the pickle reads a memo entry it never wrote");
    return it->second;
  }
  void set_items(Ref dict, const std::vector<Ref>& kv) {
    if (!dict) dict = top();
    if (dict->kind != Value::Dict || kv.size() % 2) fail("the pickle sets items on a non-dict");
    for (size_t k = 0; k < kv.size(); k += 2) dict->entries.emplace_back(kv[k], kv[k + 1]);
  }
  void append(Ref list, const std::vector<Ref>& items) {
    if (!list) list = top();
    if (list->kind != Value::List) fail("the pickle appends to a non-list");
    list->items.insert(list->items.end(), items.begin(), items.end());
  }

  // ('storage', <storage class>, key, location, numel): a storage of the archive.
  void persistent_id() {
    const auto pid = pop(Value::Tuple, "a storage tuple");
    const auto& t = pid->items;
    if (t.size() != 5 || t[0]->kind != Value::Str || t[0]->s != "storage" ||
        t[1]->kind != Value::Global || !storage_types().count(t[1]->s) ||
        t[2]->kind != Value::Str || t[3]->kind != Value::Str || t[4]->kind != Value::Int ||
        t[4]->i < 0) {
      fail("a persistent id that is not ('storage', type, key, location, numel)");
    }
    auto v = make(Value::Storage);
    v->tensor.dtype = storage_types().at(t[1]->s);
    v->tensor.storage = t[2]->s;
    v->i = t[4]->i;
    push(v);
  }

  std::vector<int64_t> ints(const Ref& tuple, const char* what) {
    if (tuple->kind != Value::Tuple) fail(std::string("a tensor's ") + what + " is not a tuple");
    std::vector<int64_t> out;
    for (const auto& x : tuple->items) {
      if (x->kind != Value::Int || x->i < 0)
        fail(std::string("a tensor's ") + what + " is not non-negative integers");
      out.push_back(x->i);
    }
    return out;
  }

  void reduce() {
    const auto args = pop(Value::Tuple, "the arguments of a call");
    const auto fn = pop(Value::Global, "a function to call");
    const auto& a = args->items;
    if (fn->s == kOrderedDict) {
      if (!a.empty()) fail("OrderedDict is built with arguments");
      push(make(Value::Dict));
    } else if (fn->s == kRebuildTensor) {
      // (storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
      if (a.size() < 6 || a.size() > 7 || a[0]->kind != Value::Storage ||
          a[1]->kind != Value::Int || a[1]->i < 0 || a[4]->kind != Value::Bool ||
          a[5]->kind != Value::Dict || !a[5]->entries.empty() ||
          (a.size() == 7 && a[6]->kind != Value::None &&
           (a[6]->kind != Value::Dict || !a[6]->entries.empty()))) {
        fail("a tensor is rebuilt with arguments torch.save does not write");
      }
      auto v = make(Value::Tensor);
      v->tensor.dtype = a[0]->tensor.dtype;
      v->tensor.storage = a[0]->tensor.storage;
      v->tensor.offset = a[1]->i;
      v->tensor.shape = ints(a[2], "size");
      v->tensor.stride = ints(a[3], "stride");
      if (v->tensor.shape.size() != v->tensor.stride.size())
        fail("a tensor's size and stride differ in length");
      v->i = a[0]->i;  // the storage's numel, for the bounds check
      push(v);
    } else if (fn->s == kRebuildParameter) {
      if (a.size() != 3 || a[0]->kind != Value::Tensor || a[1]->kind != Value::Bool ||
          a[2]->kind != Value::Dict || !a[2]->entries.empty()) {
        fail("a parameter is rebuilt with arguments torch.save does not write");
      }
      push(a[0]);
    } else {
      fail("'" + fn->s + "' is called, which builds no tensor");
    }
  }

  const uint8_t* p_;
  uint64_t n_;
  uint64_t at_ = 0;
  const std::string& path_;
  std::vector<Ref> stack_;
  std::vector<size_t> marks_;
  std::map<uint64_t, Ref> memo_;
  std::deque<Value> arena_;
};

// The tensors of nested dicts, named by their keys joined with ".".
// `budget` bounds the entries visited: dicts that share sub-dicts would otherwise be
// walked exponentially often.
void flatten(const Unpickler& up,
             const Value* dict,
             const std::string& prefix,
             int depth,
             size_t& budget,
             std::map<std::string, std::pair<PtTensor, int64_t>>& out) {
  if (depth > 4) up.fail("dicts nested more than 4 deep");
  for (const auto& [key, value] : dict->entries) {
    if (budget-- == 0) up.fail("more than a million entries");
    if (key->kind != Value::Str) up.fail("a dict key that is not a string");
    const auto name = prefix + key->s;
    if (value->kind == Value::Dict) {
      flatten(up, value, name + ".", depth + 1, budget, out);
    } else if (value->kind == Value::Tensor) {
      if (!out.emplace(name, std::make_pair(value->tensor, value->i)).second) {
        up.fail("the name '" + name + "' appears twice");
      }
    } else {
      up.fail("'" + name + "' is not a tensor (lorafit reads dicts of tensors)");
    }
  }
}

// The number of elements a tensor reaches in its storage: 1 + its last element's index.
uint64_t extent(const PtTensor& t, const Bytes& b) {
  uint64_t last = static_cast<uint64_t>(t.offset);
  for (size_t d = 0; d < t.shape.size(); ++d) {
    if (t.shape[d] == 0) return 0;
    const auto span =
        static_cast<unsigned __int128>(t.shape[d] - 1) * static_cast<uint64_t>(t.stride[d]);
    if (span > std::numeric_limits<uint64_t>::max() - last) b.fail("a tensor's strides overflow");
    last += static_cast<uint64_t>(span);
  }
  return last + 1;
}

}  // namespace

PtArchive parse_torch_save(const uint8_t* data, size_t size, const std::string& path) {
  const Bytes b{data, size, path};
  if (size >= 2 && data[0] == 0x80 && data[1] == 0x02) {
    throw IoError("'" + path +
                  "' is in PyTorch's legacy format (before 1.6), which lorafit does not read "
                  "(hint: load and save it again with a newer torch.save)");
  }
  auto entries = read_zip(b);
  std::string prefix;
  for (const auto& [name, e] : entries) {
    const auto slash = name.find('/');
    if (slash != std::string::npos && name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      if (!prefix.empty()) b.fail("two pickles in one archive");
      prefix = name.substr(0, slash + 1);
    }
  }
  if (prefix.empty()) b.fail("no data.pkl (is it a torch.save file?)");
  const auto read = [&](const std::string& name) -> ZipEntry& {
    auto& e = entries.at(name);
    if (!e.checked && crc32(data + e.offset, e.size) != e.crc)
      b.fail("entry '" + name + "' fails its CRC");
    e.checked = true;
    return e;
  };
  if (entries.count(prefix + "byteorder")) {
    const auto& e = read(prefix + "byteorder");
    if (std::string(reinterpret_cast<const char*>(data + e.offset), e.size) != "little") {
      throw IoError("'" + path +
                    "' was saved on a big-endian machine, which lorafit does not read");
    }
  }
  const auto& pkl = read(prefix + "data.pkl");
  Unpickler up(data + pkl.offset, pkl.size, path);
  const Value* root = up.run();
  if (root->kind != Value::Dict) up.fail("the file holds no dict of tensors");
  std::map<std::string, std::pair<PtTensor, int64_t>> flat;
  size_t budget = 1 << 20;
  flatten(up, root, "", 0, budget, flat);

  PtArchive out;
  for (auto& [name, tn] : flat) {
    auto& [t, numel] = tn;
    const auto key = prefix + "data/" + t.storage;
    if (!entries.count(key))
      b.fail("tensor '" + name + "' names storage '" + t.storage + "', which is not in the file");
    const auto& e = read(key);
    const uint64_t elem = st_dtype_size(t.dtype);
    if (static_cast<unsigned __int128>(numel) * elem != e.size) {
      b.fail("storage '" + t.storage + "' holds " + std::to_string(e.size) + " bytes, not " +
             std::to_string(numel) + " elements of " + st_dtype_name(t.dtype));
    }
    if (extent(t, b) > static_cast<uint64_t>(numel)) {
      b.fail("tensor '" + name + "' reaches past the end of its storage '" + t.storage + "'");
    }
    const auto [it, fresh] = out.storages.emplace(t.storage, PtStorage{t.dtype, e.offset, e.size});
    if (!fresh && it->second.dtype != t.dtype)
      b.fail("storage '" + t.storage + "' is read as two dtypes");
    out.tensors.emplace(name, std::move(t));
  }
  return out;
}

namespace {

void pickle_int(std::string& p, uint64_t v) {
  if (v < 256) {
    p += 'K';
    put_le(p, v, 1);
  } else if (v < (uint64_t{1} << 31)) {
    p += 'J';
    put_le(p, v, 4);
  } else {
    p += '\x8a';
    p += '\x08';
    put_le(p, v, 8);
  }
}

void pickle_str(std::string& p, const std::string& s) {
  p += 'X';
  put_le(p, s.size(), 4);
  p += s;
}

void pickle_ints(std::string& p, const std::vector<int64_t>& v) {
  p += '(';
  for (const auto x : v) pickle_int(p, static_cast<uint64_t>(x));
  p += 't';
}

}  // namespace

std::string torch_save_archive(const std::string& pickle,
                               const std::vector<std::pair<std::string, std::string>>& storages) {
  std::vector<std::pair<std::string, const std::string*>> entries;
  const std::string byteorder = "little", version = "3\n";
  entries.emplace_back("archive/data.pkl", &pickle);
  entries.emplace_back("archive/byteorder", &byteorder);
  for (const auto& [key, bytes] : storages) entries.emplace_back("archive/data/" + key, &bytes);
  entries.emplace_back("archive/version", &version);
  entries.emplace_back("archive/.data/version", &version);

  std::string out, directory;
  for (const auto& entry : entries) {
    const std::string& name = entry.first;  // not a structured binding: the lambda captures it
    const std::string* bytes = entry.second;
    if (bytes->size() >= 0xFFFFFFFFu || out.size() >= 0xFFFFFFFFu) {
      throw Error("a torch.save file over 4 GiB is not written (entry '" + name + "')");
    }
    const uint32_t crc = crc32(reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size());
    const uint64_t local = out.size();
    // Pad through an extra field ("FB", as PyTorch does) so that the data starts aligned.
    const uint64_t header = 30 + name.size() + 4;
    const uint64_t pad = (kAlign - (local + header) % kAlign) % kAlign;
    const auto record = [&](std::string& o, bool central) {
      put_le(o, central ? kCentralHeader : kLocalHeader, 4);
      if (central) put_le(o, 20, 2);  // made by
      put_le(o, 20, 2);               // needed
      put_le(o, 0, 2);                // flags
      put_le(o, 0, 2);                // stored
      put_le(o, 0, 4);                // time, date
      put_le(o, crc, 4);
      put_le(o, bytes->size(), 4);
      put_le(o, bytes->size(), 4);
      put_le(o, name.size(), 2);
      put_le(o, central ? 0 : 4 + pad, 2);
      if (central) {
        put_le(o, 0, 2);  // comment length
        put_le(o, 0, 2);  // disk
        put_le(o, 0, 2);  // internal attributes
        put_le(o, 0, 4);  // external attributes
        put_le(o, local, 4);
      }
      o += name;
      if (!central) {
        put_le(o, 0x4246, 2);
        put_le(o, pad, 2);
        o.append(pad, 'Z');
      }
    };
    record(out, false);
    out += *bytes;
    record(directory, true);
  }
  const uint64_t cd_offset = out.size();
  out += directory;
  put_le(out, kEnd, 4);
  put_le(out, 0, 4);  // disk numbers
  put_le(out, entries.size(), 2);
  put_le(out, entries.size(), 2);
  put_le(out, directory.size(), 4);
  put_le(out, cd_offset, 4);
  put_le(out, 0, 2);
  return out;
}

std::string torch_save_bytes(const std::map<std::string, PtTensorBytes>& tensors) {
  static const std::map<StDtype, std::string> storage_name = [] {
    std::map<StDtype, std::string> m;
    for (const auto& [name, dtype] : storage_types()) m[dtype] = name.substr(6);  // "torch."
    return m;
  }();
  std::string p = "\x80\x02}(";
  std::vector<std::pair<std::string, std::string>> storages;
  for (const auto& [name, t] : tensors) {
    int64_t numel = 1;
    for (const auto d : t.shape) numel *= d;
    if (static_cast<uint64_t>(numel) * st_dtype_size(t.dtype) != t.bytes.size()) {
      throw Error("tensor '" + name + "' has " + std::to_string(t.bytes.size()) +
                  " bytes for shape " + shape_text(t.shape));
    }
    std::vector<int64_t> stride(t.shape.size(), 1);
    for (size_t d = t.shape.size(); d-- > 1;) stride[d - 1] = stride[d] * t.shape[d];
    const auto key = std::to_string(storages.size());
    storages.emplace_back(key, t.bytes);
    pickle_str(p, name);
    p += "ctorch._utils\n_rebuild_tensor_v2\n(";
    p += "(";  // the persistent id
    pickle_str(p, "storage");
    p += "ctorch\n" + storage_name.at(t.dtype) + "\n";
    pickle_str(p, key);
    pickle_str(p, "cpu");
    pickle_int(p, static_cast<uint64_t>(numel));
    p += "tQ";
    pickle_int(p, 0);
    pickle_ints(p, t.shape);
    pickle_ints(p, stride);
    p += "\x89"
         "ccollections\nOrderedDict\n)R";  // requires_grad, backward_hooks
    p += "tR";
  }
  p += "u.";
  return torch_save_archive(p, storages);
}

}  // namespace lorafit
