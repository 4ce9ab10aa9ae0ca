#!/usr/bin/env python3
"""Generate the Phi-3-small (tiktoken cl100k_base) tokenizer test vectors.

Usage (from anywhere):  python models/make_tiktoken_vectors.py [--big N OUT]
Dependencies: `pip install tiktoken` (tested with tiktoken 0.14.0); no network.

Writes crates/engine/tests/data/phi3_small_tiktoken_more.json: a few hundred varied strings
(unicode, CJK, emoji, code, long numbers, whitespace runs, "\\r\\n", contractions in several cases,
special tokens inside text, seeded random strings) with the ids python tiktoken gives them, checked
by crates/engine/tests/tiktoken.rs against phi-serve's tokenizer built from the same ranks file.

The Encoding is built offline from the repository's copy of the ranks file
(models/tiny/phi3-small-8k/cl100k_base.tiktoken), tiktoken's own cl100k_base pat_str and the 96
Phi-3-small special tokens 100256..100351 (the table below; when the team assets folder
$PHI3_ASSETS, default /work/shared/phi3-assets, exists, the table is checked against its
phi-3-small-tokenizer/ortx-test.tokenizer_config.json). Ids are `encode(text, allowed_special="all")`.

--big N OUT additionally writes N seeded random strings (and chunks of this Python's standard
library sources) with their ids to OUT, for the ignored test `big_corpus_matches_tiktoken`
(PHI_TIKTOKEN_CORPUS=OUT cargo test --release -p phi-engine --test tiktoken -- --ignored).
"""

import base64
import inspect
import hashlib
import json
import os
import random
import sys
from pathlib import Path

import tiktoken
import tiktoken_ext.openai_public as openai_public

ROOT = Path(__file__).resolve().parent.parent
RANKS = ROOT / "models/tiny/phi3-small-8k/cl100k_base.tiktoken"
RANKS_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
OUT = ROOT / "crates/engine/tests/data/phi3_small_tiktoken_more.json"
PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
ASSETS = Path(os.environ.get("PHI3_ASSETS", "/work/shared/phi3-assets"))


def special_tokens():
    """The 96 Phi-3-small special tokens (ids 100256..100351)."""
    named = {
        100257: "<|endoftext|>",
        100258: "<|fim_prefix|>",
        100259: "<|fim_middle|>",
        100260: "<|fim_suffix|>",
        100261: "<|system|>",
        100262: "<|user|>",
        100263: "<|assistant|>",
        100266: "<|end|>",
        100276: "<|endofprompt|>",
    }
    # The unnamed ids are <|dummy_id_N|>, numbered in id order except that 100256 is dummy 2.
    dummies = [100264, 100265, 100256] + [
        i for i in range(100267, 100352) if i not in named
    ]
    table = dict(named)
    for n, i in enumerate(dummies):
        table[i] = f"<|dummy_id_{n}|>"
    assert sorted(table) == list(range(100256, 100352)), "96 contiguous ids"
    ortx = ASSETS / "phi-3-small-tokenizer/ortx-test.tokenizer_config.json"
    if ortx.exists():
        added = json.loads(ortx.read_text())["added_tokens_decoder"]
        want = {int(k): v["content"] for k, v in added.items()}
        assert want == table, "special-token table differs from the ortx test config"
    return {v: k for k, v in sorted(table.items())}


def encoding():
    data = RANKS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == RANKS_SHA256, "unexpected ranks file"
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    # cl100k_base() itself would download the ranks: check that its pattern is PAT_STR instead.
    source = inspect.getsource(openai_public.cl100k_base)
    assert PAT_STR in source, "tiktoken's cl100k_base pat_str is not PAT_STR"
    return tiktoken.Encoding(
        name="phi3-small-cl100k",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=special_tokens(),
    )


def corpus():
    c = []
    # Plain prose and punctuation.
    c += [
        "Hello world",
        " Hello world",
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "Once upon a time, in a land far, far away...",
        "What's the weather like today? It's sunny!",
        "Mr. Smith went to Washington D.C. on Jan. 5th.",
        "e.g., i.e., etc., vs. — “quotes” and ‘single quotes’ «guillemets»",
        "a",
        "",
        " ",
        "A",
        "supercalifragilisticexpialidocious",
        "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
        "UPPERCASE WORDS AND lowercase words And Title Case",
        "snake_case_identifier camelCaseIdentifier PascalCase kebab-case",
        "¡Hola! ¿Qué tal?",
        "hello...world!!!???",
        "----====____****####",
        "(parentheses) [brackets] {braces} <angles>",
        "@user #hashtag $100 50% a&b a|b a^b ~tilde `backtick`",
    ]
    # Contractions in various cases and spacings.
    c += [
        "I'LL", "I'll", "i'll", "I'Ll", "I'lL", "YOU'RE", "you're", "You'Re", "WE'VE", "we've",
        "IT'S", "it's", "It'S", "DON'T", "don't", "Don'T", "I'M", "i'm", "HE'D", "he'd",
        "they'll've", "'s", "'S", "'t", "'ll", "'LL", "'ve", "'re", "'d", "'m", "''s", "'''",
        "rock'n'roll", "o'clock", "y'all", "ma'am", "'tis", "the '90s", "don’t (curly)",
        "James's book", "JAMES'S BOOK", "'hello'", "\"quoted\"", " 's", "x 'll y",
    ]
    # Numbers of many lengths and forms.
    c += ["1" * n for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 31)]
    c += [str(10**n + 7) for n in range(1, 40, 3)]
    c += [
        "3333333", "12345678901234567890", "0", "00", "007", "3.14159265358979",
        "1,000,000", "-42", "+1 (555) 123-4567", "0x1F 0xDEADBEEF", "1e10 6.02e23", "2024-06-01",
        "12:34:56", "v1.2.3", "100%", "$1,234.56", "١٢٣٤٥٦٧", "１２３４５", "²³¹", "ⅫⅣ", "½¾",
        "a1b2c3", "abc123def456", "1st 2nd 3rd 4th", "99 bottles", "٣.١٤", "०१२३४५",
    ]
    # Whitespace runs, newlines, \r\n, tabs, unusual spaces.
    c += [
        "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\r",
        " \n", "\n ", " \r\n ", "a  b", "a   b", "a\tb", "a \t b", "a\nb", "a\n\nb", "a\r\nb",
        "a \n b", "a   \n  b", "trailing   ", "   leading", "  both  ", "line1\nline2\r\nline3\rline4",
        "a\u00a0b", "a\u3000b", "a\u2028b", "a\u000bb", "a\u000cb", "a\u200bb", "\u00a0\u00a0x",
        "    indented\n        more\n    back", "word \n\n  next", "x\n   \n", "tabs\tbetween\t\twords\t and\n\n\nnewlines\r\n",
        " \t \n \r\n ", "end with newline\n", "end with spaces and newline  \n", "!\n\n", "!!\r\n\r\n",
    ]
    # Unicode scripts, accents, combining marks.
    c += [
        "café naïve résumé façade", "e\u0301 (combining acute)", "Zürich Größe straße", "ÅÄÖ åäö",
        "Привет, мир! Как дела?", "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया",
        "สวัสดีชาวโลก", "안녕하세요 세계", "こんにちは世界", "カタカナとひらがな", "你好，世界！",
        "我想在apple工作1314151天～", "中文混合English和数字123", "繁體中文測試", "日本語の文章です。",
        "Tiếng Việt có dấu", "Türkçe ğüşıöç", "Polski: zażółć gęślą jaźń", "Ελληνικά και English",
        "ქართული ენა", "Հայերեն", "አማርኛ", "ᚠᛇᚻ runes", "𝕄𝕒𝕥𝕙 𝔽𝕣𝕒𝕜𝕥𝕦𝕣", "ﬁ ﬂ ligatures",
        "Ω≈ç√∫˜µ≤≥÷", "∀x∈ℝ: x²≥0", "→ ← ↑ ↓ ⇒ ⇔", "┌─┬─┐│ │ │└─┴─┘", "♠♣♥♦", "°C ℃ ℉",
        "\u0000 nul", "\u007f del", "\ufeffBOM", "\ufffd replacement", "\U0010ffff max",
        "a\u0300\u0301\u0302\u0303 stacked", "ก่่่่่่่่ thai marks", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗̻̽",
    ]
    # Emoji (multi-byte, ZWJ sequences, flags, skin tones).
    c += [
        "😁", "🦀", "Hello 😁 world", "😀😃😄😁😆", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "🇺🇸🇫🇷🇯🇵",
        "👍🏽 thumbs", "❤️ heart", "🤖🧠💡", "emoji at end 🎉", "🎉 at start", "a😁b😁c", "😁😁😁😁😁😁😁😁",
        "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～", "🦀 Rust 🐍 Python ☕ Java",
    ]
    # Code.
    c += [
        "def hello(name: str) -> str:\n    return f\"Hello, {name}!\"\n",
        "fn main() {\n    println!(\"Hello, world!\");\n}\n",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "#include <stdio.h>\nint main(void) { return 0; }",
        "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
        "{\"key\": \"value\", \"list\": [1, 2, 3], \"nested\": {\"a\": null}}",
        "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
        "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
        "const f = (x) => x ** 2; // arrow\n",
        "if x == 1:\n\tpass\r\nelse:\n\tprint('no')",
        "https://example.com/path?query=1&b=two#frag",
        "/usr/local/bin/python3 --version",
        "C:\\Users\\name\\Documents\\file.txt",
        "git commit -m \"fix: handle \\r\\n\" && git push",
        "regex: ^[a-z0-9_.+-]+@[a-z0-9-]+\\.[a-z]{2,}$",
        "    def __init__(self):\n        self.x = 0\n\n\n    def f(self):\n        pass",
        "x=1;y=2;z=x+y*3-4/5%6",
        "a->b->c && d || !e",
        "let v: Vec<u32> = (0..10).map(|i| i * i).collect();",
        "```python\nprint('hi')\n```",
        "    \n    \n",
        "<!-- comment --> <?xml version=\"1.0\"?>",
        "\\begin{equation} E = mc^2 \\end{equation}",
    ]
    # Special tokens inside text.
    c += [
        "<|user|>\nHi<|end|>\n<|assistant|>\n",
        "<|endoftext|>",
        "<|endoftext|><|endoftext|>",
        "Hi<|end|>there",
        " <|end|> ",
        "<|system|>\nYou are helpful.<|end|>\n",
        "text<|endofprompt|>more",
        "<|dummy_id_0|><|dummy_id_86|><|dummy_id_2|>",
        "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
        "<|end",
        "<|END|>",
        "< |user|>",
        "<|user |>",
        "<<|user|>>",
        "<|user|><|user|>",
        "||<|end|>||",
        "😁<|end|>😁",
        "\n<|end|>\n",
        "<|assistant|>  spaced  <|end|>",
        "<|im_start|> is not special here",
        "<|dummy_id_87|> is not a token",
    ]
    # BPE corner cases: repeated characters and patterns (merge order ties).
    for ch in ["a", "b", "e", "x", " ", "=", "-", "0", "ab", "aba", "la", "的", "😁", ".", "*", "\n"]:
        for n in (2, 3, 5, 8, 13, 21, 40):
            c.append(ch * n)
    c += ["abababab", "aaabbbccc", "mississippi", "bananarama", "ananas", "lalalalala lalala"]
    # Longer mixed paragraphs.
    c += [
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt "
        "ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation.",
        "In 2023, the company's revenue grew 12.5% to $3.4B; CEO Jane Doe said: \"We're thrilled!\"\n"
        "Next year's target: 15%.",
        "第一章\n\n　　天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。\n",
        "Ключевые слова: токенизация, BPE, UTF-8 — и числа 1234567.",
    ]
    # Seeded random strings from mixed character pools.
    rng = random.Random(20240601)
    c += random_strings(rng, 120)
    # Deduplicate, keep order.
    seen, out = set(), []
    for s in c:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


POOLS = [
    "abcdefghijklmnopqrstuvwxyz",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " " * 6 + "\t\n\r",
    ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    "éèêëàâäôöûüçñßøåæœ",
    "абвгдежзийклмнопрстуфхцчшщъыьэюя",
    "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年",
    "あいうえおかきくけこアイウエオカキクケコ",
    "가나다라마바사아자차카타파하",
    "😁🦀🎉👍🏽❤️🇺🇸👨‍👩‍👧",
    "\u0301\u0300\u200d\u00a0\u3000\ufeff",
    "١٢٣٤٥٦٧٨٩٠ مرحبا",
    "'sdmtlvre",
]
SPECIALS = ["<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>", "<|system|>", "<|dummy_id_5|>"]


def random_strings(rng, n):
    out = []
    for _ in range(n):
        k = rng.randint(1, 60)
        pools = rng.sample(POOLS, rng.randint(1, 4))
        s = []
        for _ in range(k):
            if rng.random() < 0.02:
                s.append(rng.choice(SPECIALS))
            else:
                s.append(rng.choice(rng.choice(pools)))
        out.append("".join(s))
    return out


def stdlib_chunks(rng, n):
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        for i in range(0, len(text), 2000):
            out.append(text[i : i + 2000])
    rng.shuffle(out)
    return out[:n]


def main():
    enc = encoding()
    strings = corpus()
    vectors = []
    for s in strings:
        ids = enc.encode(s, allowed_special="all")
        assert enc.decode(ids) == s, f"tiktoken does not round-trip {s!r}"
        vectors.append({"text": s, "ids": ids})
    doc = {
        "generated_by": "models/make_tiktoken_vectors.py",
        "how": (
            f"python tiktoken {tiktoken.__version__}: tiktoken.Encoding built offline from "
            "models/tiny/phi3-small-8k/cl100k_base.tiktoken (sha256 " + RANKS_SHA256 + "), "
            "tiktoken's cl100k_base pat_str and the 96 Phi-3-small special tokens below; "
            "ids = encode(text, allowed_special=\"all\"); decode(ids) == text for every entry."
        ),
        "pat_str": enc._pat_str,
        "n_vocab": enc.n_vocab,
        "special_tokens": {str(i): t for t, i in sorted(special_tokens().items(), key=lambda x: x[1])},
        "vectors": vectors,
    }
    OUT.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(vectors)} vectors to {OUT.relative_to(ROOT)}")

    if len(sys.argv) == 4 and sys.argv[1] == "--big":
        n, path = int(sys.argv[2]), Path(sys.argv[3])
        rng = random.Random(7)
        big = random_strings(rng, n) + stdlib_chunks(rng, n // 10)
        rows = [{"text": s, "ids": enc.encode(s, allowed_special="all")} for s in big]
        path.write_text(json.dumps({"vectors": rows}, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {len(rows)} vectors to {path}")


if __name__ == "__main__":
    main()
