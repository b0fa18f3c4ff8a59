// The chat-template interpreter against jinja2 in transformers' environment:
// tests/fixtures/jinja/cases.json was written by scripts/make_jinja_fixtures.py (real model
// templates and one small template per construct, rendered by jinja2 3.1).
#include <catch2/catch.hpp>

#include "test_util.h"
#include "tokenizer/jinja.h"

using lorafit::jinja::Template;
using lorafit::jinja::TemplateError;
using nlohmann::ordered_json;

namespace {

ordered_json cases() {
  return ordered_json::parse(lorafit::test::read_text(lorafit::test::fixture("jinja/cases.json")));
}

std::string render(const std::string& source, const ordered_json& ctx = ordered_json::object()) {
  return Template(source, "t.jinja").render(ctx);
}

}  // namespace

TEST_CASE("templates render as jinja2 renders them, and fail where it fails",
          "[tokenizer][jinja]") {
  const auto all = cases();
  size_t rendered = 0, refused = 0;
  for (const auto& c : all["cases"]) {
    const std::string source =
        c.contains("source")
            ? c["source"].get<std::string>()
            : all["templates"][c["template"].get<std::string>()].get<std::string>();
    INFO((c.contains("template") ? c["template"].get<std::string>() : source)
         << "\n"
         << c["context"].dump());
    if (c.contains("expected")) {
      REQUIRE(render(source, c["context"]) == c["expected"].get<std::string>());
      ++rendered;
    } else {
      INFO("jinja2: " << c["error"].get<std::string>());
      REQUIRE_THROWS_AS(render(source, c["context"]), TemplateError);
      ++refused;
    }
  }
  REQUIRE(rendered > 100);
  REQUIRE(refused >= 5);  // roles the templates reject, undefined names, type errors
}

TEST_CASE("a template error names the template, the line and the construct", "[tokenizer][jinja]") {
  auto fails = [](const std::string& source, const std::string& fragment) {
    INFO(source);
    REQUIRE_THROWS_WITH(render(source, {{"messages", ordered_json::array()}}),
                        Catch::Contains("t.jinja, line ") && Catch::Contains(fragment));
  };
  fails("a\nb\n{% include 'x.jinja' %}", "line 3: the {% include %} statement is not supported");
  fails("{{ x | frobnicate }}", "the filter 'frobnicate' is not supported");
  fails("{{ 1 is prime }}", "the test 'prime' is not supported");
  fails("{% for m in messages %}\n{% endif %}", "line 2: syntax error: {% endif %} closes nothing");
  fails("{% if true %}never closed", "line 1: syntax error: {% if %} is never closed");
  fails("{{ 'unterminated }}", "is never closed");
  fails("{{ (1 + }}", "expected an expression");
  fails("{% break %}", "{% break %} outside a for loop");
  fails("\n\n{{ raise_exception('Only user and assistant roles') }}",
        "line 3: raise_exception: Only user and assistant roles");
  fails("{{ messages[0].role }}", "'list object' has no element 0");
  fails("{{ 1 + 'a' }}", "unsupported operand types for +: 'int' and 'str'");
  fails("{% set x = 1 %}{% set x.y = 2 %}", "which is no namespace()");
}

TEST_CASE("a runaway template is stopped, not run to exhaustion", "[tokenizer][jinja]") {
  REQUIRE_THROWS_WITH(render("{% for i in range(4000) %}{% for j in range(4000) %}{{ '' }}"
                             "{% endfor %}{% endfor %}"),
                      Catch::Contains("runs too long"));
  REQUIRE_THROWS_WITH(render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
                      Catch::Contains("too deeply"));
  REQUIRE_THROWS_WITH(render("{{ 'ab' * 100000000 }}"), Catch::Contains("64 MiB"));
  REQUIRE_THROWS_WITH(render("{{ range(100000000) | length }}"), Catch::Contains("4 million"));
  REQUIRE_THROWS_WITH(render("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}"),
                      Catch::Contains("nest too deeply"));
  std::string nested;
  for (int k = 0; k < 300; ++k) nested += "{% if true %}";
  REQUIRE_THROWS_WITH(render(nested), Catch::Contains("nest too deeply"));
}

TEST_CASE("whitespace control follows trim_blocks and lstrip_blocks", "[tokenizer][jinja]") {
  // trim_blocks drops the newline after a tag; lstrip_blocks the indentation before one;
  // "-" strips all whitespace on its side, "+" keeps it; one final newline goes.
  REQUIRE(render("{% if true %}\n  x\n{% endif %}\n") == "  x\n");
  REQUIRE(render("a\n    {% if true %}b{% endif %}") == "a\nb");
  REQUIRE(render("a  {%- if true %} b {% endif -%}  c") == "a b c");
  REQUIRE(render("a\n  {%+ if true %}b{% endif %}") == "a\n  b");
  REQUIRE(render("{{ 'x' }}\n{{ 'y' }}\n") == "x\ny");
  REQUIRE(render("a\r\nb") == "a\nb");
}
