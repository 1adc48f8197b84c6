"""Fixtures for the tokenizer tests: independent references and the optional real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

REPO = Path(__file__).resolve().parents[3]
GPT2_RANK_FILE = REPO / "core" / "assets" / "gpt2.tiktoken"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def reference_gpt2() -> tiktoken.Encoding:
    """GPT-2 as tiktoken itself defines it (its loader, its pattern), from the vendored file."""
    ranks = load_tiktoken_bpe(str(GPT2_RANK_FILE), expected_hash=GPT2_SHA256)
    return tiktoken.Encoding("gpt2-reference", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="session")
def gpt2_files() -> tuple[Path, Path]:
    """OpenAI's encoder.json and vocab.bpe from ../shared/data, when present."""
    folder = SHARED_DATA / "gpt2_tokenizer"
    encoder, vocab = folder / "encoder.json", folder / "vocab.bpe"
    if not (encoder.is_file() and vocab.is_file()):
        pytest.skip("../shared/data/gpt2_tokenizer is not present")
    return encoder, vocab


@pytest.fixture()
def smollm2_gguf_path(request: pytest.FixtureRequest) -> Path:
    """The SmolLM2 GGUF through the suite's `smollm2_gguf` fixture, or SCRATCHGPT_SMOLLM2_GGUF."""
    try:
        return Path(request.getfixturevalue("smollm2_gguf"))
    except pytest.FixtureLookupError:
        env = os.environ.get("SCRATCHGPT_SMOLLM2_GGUF")
        if env and Path(env).is_file():
            return Path(env)
        pytest.skip("SmolLM2 GGUF not found: set SCRATCHGPT_SMOLLM2_GGUF")


# Hand-written cases where byte-level BPE implementations tend to disagree.
VARIED_TEXTS = [
    "",
    "Hello, world!",
    "I'm sure you'll see they've done it, he'd said; she's 'quoted' and it's DON'T.",
    "I'M LOUD AND YOU'LL HEAR IT'S",
    "  leading spaces and trailing spaces   ",
    "line one\nline two\n\nafter a blank line  \n\n",
    "  \n\n",
    "tabs\tand\t\tmore tabs\t \t\n\r\nwindows line\r\n",
    "\u00a0non-breaking\u2009thin\u3000ideographic\u2028line-sep\x85NEL",
    "digits 12345 and 1234567890 and 3.14159, -42, 1e-9, 0x1F",
    "a  1 b\t2 c   33 ² ³ ½ Ⅻ ٣ ௫ 𝟙",
    "café naïve résumé Ångström Zürich façade",
    "decomposed: cafe\u0301 nai\u0308ve",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🫠",
    "math: ∑_{i=1}^{n} x² ≤ ∞ ∧ ∀ε>0 ∃δ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n\tpass\n",
    "if (a != b && c <= d) { return x->y; } // C++ ::std::vector<int>",
    "<html><body class=\"x\">Hi &amp; bye</body></html>",
    "control chars \x00\x01\x07\x1b[31m red \x1b[0m \x7f \x1c\x1d\x1e\x1f",
    "zero width\u200bjoiner\u200d and BOM\ufeff and soft\u00adhyphen",
    "mixed 'quotes' \u2018curly\u2019 \u201cdouble\u201d and apostrophe's",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!!!!!!!!!!????????........,,,,,,,,;;;;;;;;------------============",
    " " * 300 + "x",
    "\n" * 50,
    "ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖ×ØÙÚÛÜÝÞßàáâãäåæçèéêëìíîïðñòóôõö÷øùúûüýþÿ",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी, ไทย",
    "new in Unicode 16: \U0001FAE9 \U00011B00 and unassigned \U000E0080 \U0010FFFD private",
]


@pytest.fixture(scope="session")
def varied_texts() -> list[str]:
    """Hand-written texts covering contractions, whitespace, digits, scripts, emoji, code."""
    return list(VARIED_TEXTS)
