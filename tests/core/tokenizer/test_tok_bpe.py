"""The from-scratch BPE: merging, merge steps, training, files, unknown bytes."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.tokenizer import (
    BPETokenizer,
    TiktokenTokenizer,
    TokenizerError,
    TokenizerFileError,
    TrainingError,
    UnrepresentableBytes,
    gpt2_tokenizer,
)
from core.tokenizer.bpe import GPT2_PATTERN, bytes_to_unicode, merges_from_ranks, ranks_from_gpt2_files

SMALL_TEXT = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs on and on.\n"
    "It is a truth universally acknowledged that a single man in possession of a good fortune "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. Numbers: 12 345 6789, 2024-01-31. Accents: café, naïve, résumé.\n"
    "def tokenize(text):\n    return [piece for piece in split(text) if piece]\n"
    "日本語のテキスト and emoji 😀😀 and more words: training, tokenizer, merging, merged.\n"
) * 20


@pytest.fixture(scope="module")
def gpt2_bpe() -> BPETokenizer:
    return gpt2_tokenizer("bpe")


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=2, max_size=400) | st.text(min_size=1, max_size=300).map(lambda t: t.encode("utf-8", "replace")))
def test_heap_merge_equals_scan_merge(gpt2_bpe, data):
    assert gpt2_bpe._merge_heap(data) == gpt2_bpe._merge_scan(data)


def test_heap_merge_on_long_repetitive_pieces(gpt2_bpe, reference_gpt2):
    for text in ["a" * 1500, "ab" * 700, "🙂" * 400, " " * 1500, "x" + "=" * 1000, "0123456789" * 100]:
        assert gpt2_bpe.encode(text) == reference_gpt2.encode(text)
        parts = gpt2_bpe._merge_heap(text.encode())
        assert parts == gpt2_bpe._merge_scan(text.encode())
        assert b"".join(parts) == text.encode()


def test_long_piece_is_not_quadratic(gpt2_bpe, monkeypatch):
    """A 200 kB piece with no spaces (think base64) merges through the heap in O(n log n): the scan,
    which looks over every pair at each merge, never sees it, and the heap is pushed and popped a
    number of times linear in the piece (the n - 1 first pairs, at most two new pairs per merge)."""
    import heapq
    from types import SimpleNamespace

    from core.tokenizer import bpe

    heap_ops = {"push": 0, "pop": 0}

    def heappush(heap, item):
        heap_ops["push"] += 1
        heapq.heappush(heap, item)

    def heappop(heap):
        heap_ops["pop"] += 1
        return heapq.heappop(heap)

    def heapify(heap):
        heap_ops["push"] += len(heap)
        heapq.heapify(heap)

    # The real heapq, counted.
    monkeypatch.setattr(bpe, "heapq", SimpleNamespace(heappush=heappush, heappop=heappop, heapify=heapify))
    scanned: list[int] = []
    scan = bpe.BPETokenizer._merge_scan
    monkeypatch.setattr(bpe.BPETokenizer, "_merge_scan", lambda self, data: scanned.append(len(data)) or scan(self, data))
    rng = random.Random(0)
    n = 200_000
    blob = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz") for _ in range(n))
    ids = gpt2_bpe.encode(blob)
    assert gpt2_bpe.decode(ids) == blob
    assert not scanned or max(scanned) <= bpe._HEAP_THRESHOLD
    merges = n - len(ids)
    assert heap_ops["push"] <= (n - 1) + 2 * merges and heap_ops["pop"] <= heap_ops["push"] <= 3 * n


def test_merge_steps(gpt2_bpe):
    steps = gpt2_bpe.merge_steps(" hello")
    assert steps[0] == [b" ", b"h", b"e", b"l", b"l", b"o"]
    assert steps[-1] == [b" hello"]
    for before, after in zip(steps, steps[1:]):
        assert len(after) == len(before) - 1 and b"".join(after) == b"".join(before)
    assert [gpt2_bpe.ranks[p] for p in steps[-1]] == gpt2_bpe.encode(" hello")
    assert gpt2_bpe.merge_steps("") == [[]]
    assert gpt2_bpe.merge_steps(b"\xff") == [[b"\xff"]]
    assert gpt2_bpe.merge_steps("é") == [[b"\xc3", b"\xa9"], [b"\xc3\xa9"]]


def test_merge_steps_end_where_encode_ends(gpt2_bpe):
    for piece in gpt2_bpe.pretokenize(SMALL_TEXT[:400] + " internationalization antidisestablishmentarianism"):
        last = gpt2_bpe.merge_steps(piece)[-1]
        assert [gpt2_bpe.ranks[p] for p in last] == gpt2_bpe.encode(piece)


def test_pretokenize(gpt2_bpe):
    assert gpt2_bpe.pretokenize("I'm here  now\n\n 42x") == ["I", "'m", " here", " ", " now", "\n\n", " 42", "x"]
    assert gpt2_bpe.pretokenize("") == []


def test_bytes_to_unicode_is_a_bijection():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256)) and len(set(mapping.values())) == 256
    assert mapping[ord(" ")] == "Ġ" and mapping[ord("A")] == "A" and mapping[ord("\n")] == "Ċ"


def test_train_reaches_the_vocab_and_round_trips():
    tok = BPETokenizer.train(SMALL_TEXT, vocab_size=400, name="tiny")
    assert tok.vocab_size == 400 and len(tok.ranks) == 399
    assert tok.special_tokens == {"<|endoftext|>": 399} and tok.eos_id == 399
    assert sorted(tok.ranks.values()) == list(range(399))
    ids = tok.encode(SMALL_TEXT)
    assert tok.decode(ids) == SMALL_TEXT
    assert len(ids) < len(SMALL_TEXT.encode()) / 2  # 143 merges halve the length
    assert max(ids) < 399
    assert tok.encode("The fox") == [tok.ranks[b"The"], tok.ranks[b" fox"]]
    for text in ["unseen wörds ✓ \x00", "", "<|endoftext|>x"]:
        assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_train_first_merge_is_the_most_frequent_pair():
    tok = BPETokenizer.train("ab ab ab ab cd cd", vocab_size=258, special_tokens=())
    assert tok.token_bytes(256) == b"ab"  # 4 times, vs " a"/" c" 3 and "cd" 2
    assert tok.vocab_size == 258 and tok.special_tokens == {} and tok.eos_id is None


def test_train_is_deterministic_and_ignores_specials_in_text():
    text = SMALL_TEXT + "<|endoftext|>" + SMALL_TEXT
    a = BPETokenizer.train(text, vocab_size=330)
    b = BPETokenizer.train(text, vocab_size=330)
    assert a.ranks == b.ranks
    assert not any(b"<|" in t or b"|>" in t for t in a.ranks)


def test_merges_from_ranks_rebuild_the_ranks_through_gpt2s_files(tmp_path):
    """The merges the exports write read back, through OpenAI's file pair, to the same ranks."""
    tok = BPETokenizer.train(SMALL_TEXT, vocab_size=400, name="tiny")
    merges = merges_from_ranks(tok.ranks)
    assert len(merges) == 399 - 256 and all(a + b in tok.ranks for a, b in merges)
    spell = bytes_to_unicode()

    def text(data: bytes) -> str:
        return "".join(spell[b] for b in data)

    (tmp_path / "encoder.json").write_text(json.dumps({text(t): i for t, i in tok.ranks.items()} | {"<|endoftext|>": 399}))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(f"{text(a)} {text(b)}" for a, b in merges))
    assert ranks_from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe") == (tok.ranks, {"<|endoftext|>": 399})
    # A token that no single merge of lower-ranked tokens makes has no merge list.
    ranks = {bytes((b,)): b for b in range(256)} | {b"abc": 256}
    with pytest.raises(TokenizerError, match="3 parts"):
        merges_from_ranks(ranks)


def test_train_errors():
    with pytest.raises(TrainingError, match="too small"):
        BPETokenizer.train("abc", vocab_size=200)
    with pytest.raises(TrainingError, match="supports only"):
        BPETokenizer.train("ab ab", vocab_size=1000)


def train_by_recounting(text: str, vocab_size: int) -> dict[bytes, int]:
    """BPE training as defined, with none of train's bookkeeping: before every merge, count every
    adjacent pair of every piece afresh and merge the most frequent (ties: the lowest ids)."""
    ranks = {bytes((b,)): b for b in range(256)}
    pieces = Counter(BPETokenizer(dict(ranks)).pretokenize(text))
    words = [(list(piece.encode("utf-8")), n) for piece, n in pieces.items()]
    token_of = [bytes((b,)) for b in range(256)]
    while len(ranks) < vocab_size:
        pairs: Counter[tuple[int, int]] = Counter()
        for word, n in words:
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        top = max(pairs.values())
        a, b = min(pair for pair, count in pairs.items() if count == top)
        merged = token_of[a] + token_of[b]
        if merged not in ranks:
            ranks[merged] = len(token_of)
            token_of.append(merged)
        for word, _ in words:
            i = 0
            while i < len(word) - 1:
                if word[i] == a and word[i + 1] == b:
                    word[i : i + 2] = [ranks[merged]]
                i += 1
    return ranks


def test_train_equals_recounting_every_merge():
    """train's incremental pair counts and lazy heap learn exactly what recounting learns."""
    trained = BPETokenizer.train(SMALL_TEXT, vocab_size=420, special_tokens=())
    assert trained.ranks == train_by_recounting(SMALL_TEXT, 420)


def test_train_on_a_larger_corpus(shared_data):
    """A few thousand merges over ~1 MB (the Austen novel Emma), round-tripping the novel; on its
    first 40,000 characters the merges equal recounting's."""
    path = shared_data / "text" / "austen" / "emma.txt"
    assert path.is_file(), f"{path} is missing from ../shared/data"
    text = path.read_text(encoding="utf-8")
    tok = BPETokenizer.train(text, vocab_size=4096, name="emma")
    assert tok.vocab_size == 4096
    assert tok.decode(tok.encode(text)) == text
    start = text[:40_000]
    assert BPETokenizer.train(start, vocab_size=600, special_tokens=()).ranks == train_by_recounting(start, 600)


@pytest.mark.parametrize("cls", [BPETokenizer, TiktokenTokenizer])
def test_save_load_round_trip(tmp_path, cls):
    trained = BPETokenizer.train(SMALL_TEXT, vocab_size=300, name="tiny")
    tok = cls(trained.ranks, trained.pattern, trained.special_tokens, trained.name)
    path = tok.save(tmp_path / "tokenizer.json")
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["format"] == "scratchgpt-bpe" and doc["type"] == "bpe" and doc["byte_encoding"] == "latin-1"
    assert doc["pattern"] == GPT2_PATTERN and doc["special_tokens"] == {"<|endoftext|>": 299} and doc["eos_id"] == 299
    assert list(doc["ranks"].values()) == list(range(299))  # ordered by rank, readable
    for loader in (BPETokenizer.load, TiktokenTokenizer.load):
        loaded = loader(path)
        assert loaded.ranks == tok.ranks and loaded.special_tokens == tok.special_tokens
        assert (loaded.name, loaded.eos_id, loaded.bos_id, loaded.vocab_size) == ("tiny", 299, None, 300)
        assert loaded.encode(SMALL_TEXT) == tok.encode(SMALL_TEXT)


def test_gpt2_save_load_every_byte_value(tmp_path, gpt2_bpe):
    loaded = BPETokenizer.load(gpt2_bpe.save(tmp_path / "gpt2.json"))
    assert loaded.ranks == gpt2_bpe.ranks  # all 256 byte values survive latin-1 + JSON


def test_bad_tokenizer_files(tmp_path):
    path = tmp_path / "tokenizer.json"
    with pytest.raises(TokenizerFileError, match="does not exist"):
        BPETokenizer.load(path)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="not valid JSON"):
        BPETokenizer.load(path)
    path.write_text(json.dumps({"model": {"type": "BPE"}}), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="Hugging Face"):
        BPETokenizer.load(path)
    path.write_text(json.dumps({"format": "scratchgpt-bpe", "version": 1, "ranks": {}}), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="'pattern'"):
        BPETokenizer.load(path)
    path.write_text(json.dumps({"format": "scratchgpt-bpe", "version": 9}), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="version 9"):
        BPETokenizer.load(path)


def test_constructor_validation():
    ranks = {bytes((b,)): b for b in range(256)}
    with pytest.raises(ValueError, match="share one rank"):
        BPETokenizer({**ranks, b"ab": 0})
    with pytest.raises(ValueError, match="already the rank"):
        BPETokenizer(ranks, special_tokens={"<s>": 5})
    with pytest.raises(ValueError, match="eos_id=999"):
        BPETokenizer(ranks, eos_id=999)
    with pytest.raises(ValueError, match="invalid pre-tokenizer pattern"):
        BPETokenizer(ranks, pattern="(unclosed")
    with pytest.raises(ValueError, match="unknown_bytes"):
        BPETokenizer(ranks, unknown_bytes="ignore")


@pytest.mark.parametrize("cls", [BPETokenizer, TiktokenTokenizer])
def test_unknown_bytes_policy(cls):
    """A vocabulary without some bytes drops them (like HF tokenizers) or raises, as asked."""
    ranks = {bytes((b,)): b for b in range(256) if b not in (0x13, 0xFF)}
    ranks[b"ab"] = 256
    ranks[b"!!"] = 257
    dropper = cls(ranks, GPT2_PATTERN, name="holes", unknown_bytes="drop")
    # The byte is removed from its piece before merging, so "!" + 0x13 + "!" merges to "!!".
    assert dropper.encode("ab\x13ab !\x13!") == [256, 256, 32, 257]
    assert dropper.encode("\x13") == []
    assert dropper.encode("abab") == [256, 256]
    raiser = cls(ranks, GPT2_PATTERN, name="holes", unknown_bytes="error")
    with pytest.raises(UnrepresentableBytes, match="0x13"):
        raiser.encode("ab\x13")
    assert raiser.encode("ab ab") == [256, 32, 256]
    assert raiser.vocab_size == 258
