"""Word-level and character-level tokenizers: vocabularies, unknown pieces, special tokens, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.tokenizer import (
    ENDOFTEXT,
    UNK,
    CharTokenizer,
    DisallowedSpecialToken,
    Tokenizer,
    TrainingError,
    UnknownPiece,
    UnknownTokenId,
    WordTokenizer,
)

TEXT = "The cat sat on the mat. The dog sat too; it didn't mind the cat."


def test_word_vocabulary_is_the_sorted_words_and_punctuation_then_specials():
    tok = WordTokenizer.train(TEXT)
    assert tok.pieces == sorted(set(tok.split(TEXT)))
    assert {"The", "the", "didn", "'", "t", ".", ";"} <= set(tok.pieces)  # case kept, punctuation split
    assert tok.special_tokens == {ENDOFTEXT: len(tok.pieces), UNK: len(tok.pieces) + 1}
    assert tok.vocab_size == len(tok.pieces) + 2 and tok.eos_id == tok.special_tokens[ENDOFTEXT]
    assert isinstance(tok, Tokenizer) and isinstance(CharTokenizer.train(TEXT), Tokenizer)


def test_unknown_words_become_unk_and_are_counted():
    tok = WordTokenizer.train(TEXT)
    ids = tok.encode("The cow sat on the sofa.")
    assert [tok.decode([i]) for i in ids] == ["The", UNK, "sat", "on", "the", UNK, "."]
    assert tok.unknown_count(ids) == 2
    assert tok.decode(ids) == "The <|unk|> sat on the <|unk|>."


def test_word_decode_normalises_spacing():
    tok = WordTokenizer.train(TEXT)
    assert tok.decode(tok.encode("The   cat\nsat ;  it didn't .")) == "The cat sat; it didn't."


def test_vocab_size_keeps_the_most_frequent_words():
    tok = WordTokenizer.train("b b b a a c d", vocab_size=4)  # two pieces beside the two specials
    assert tok.pieces == ["a", "b"]
    assert tok.unknown_count(tok.encode("a b c d")) == 2
    assert WordTokenizer.train("b b b a a c d", min_count=2).pieces == ["a", "b"]


def test_characters_round_trip_and_an_unseen_one_is_unk():
    tok = CharTokenizer.train(TEXT)
    assert tok.pieces == sorted(set(TEXT)) and tok.vocab_size == len(set(TEXT)) + 2
    assert tok.decode(tok.encode("the cat didn't")) == "the cat didn't"
    ids = tok.encode("cat 🙂!")
    assert tok.unknown_count(ids) == 2 and tok.decode(ids) == "cat <|unk|><|unk|>"


def test_special_tokens_follow_the_bpe_rules():
    for tok in (WordTokenizer.train(TEXT), CharTokenizer.train(TEXT)):
        with pytest.raises(DisallowedSpecialToken):
            tok.encode(f"the cat{ENDOFTEXT}")
        ids = tok.encode(f"the cat{ENDOFTEXT}", allowed_special="all")
        assert ids[-1] == tok.eos_id and tok.decode(ids).endswith(ENDOFTEXT)
        # As ordinary text it is just its pieces, none of which the vocabulary has as one token.
        assert tok.eos_id not in tok.encode_ordinary(ENDOFTEXT)
    # Special strings in the training text are not learned as pieces.
    assert "endoftext" not in WordTokenizer.train(f"a b{ENDOFTEXT}c").pieces


def test_bytes_and_bad_ids():
    tok = WordTokenizer.train("naïve café")
    ids = tok.encode("café naïve")
    assert tok.token_bytes(ids[0]) == "café".encode() and tok.decode_bytes(ids) == "café naïve".encode()
    for bad in (-1, tok.vocab_size, "x"):
        with pytest.raises(UnknownTokenId):
            tok.decode([bad])


def test_without_unk_an_unknown_piece_is_a_clear_error():
    tok = WordTokenizer.train(TEXT, special_tokens=(ENDOFTEXT,))
    assert tok.unk_id is None
    with pytest.raises(UnknownPiece, match="'cow' is not in the vocabulary of tokenizer 'word'"):
        tok.encode("the cow")


@pytest.mark.parametrize("cls", [WordTokenizer, CharTokenizer])
def test_training_errors(cls):
    with pytest.raises(TrainingError, match="no piece"):
        cls.train("")
    with pytest.raises(TrainingError, match="vocab_size=2 leaves no room"):
        cls.train(TEXT, vocab_size=2)


any_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=120)


@settings(max_examples=200, deadline=None)
@given(any_text)
def test_trained_on_a_text_both_encode_it_without_unknowns(text):
    if not text.strip():
        return
    char = CharTokenizer.train(text, special_tokens=())
    assert char.decode(char.encode_ordinary(text)) == text
    word = WordTokenizer.train(text, special_tokens=())
    # The spacing is not kept, but decoding then splitting again gives the same words.
    ids = word.encode_ordinary(text)
    assert word.split(word.decode(ids)) == word.split(text)


def test_compare_counts_each_level_on_the_same_text():
    from core.tokenizer import gpt2_tokenizer
    from core.tokenizer.compare import compare_tokenizers, reference_tokenizers

    tokenizers = reference_tokenizers(TEXT * 3, bpe_vocab_size=280)
    tokenizers["gpt2"] = ("GPT-2", gpt2_tokenizer())
    text = "The cat sat on the sofa, purring."
    counts = {c.key: c for c in compare_tokenizers(tokenizers, text)}
    assert list(counts) == ["word", "char", "bpe", "gpt2"]
    assert all(c.words == 7 for c in counts.values())
    word, char, bpe, gpt2 = counts.values()
    assert word.tokens == 9 and word.unknown == 3  # sofa, ",", purring
    assert word.vocab_size == len(set(WordTokenizer.split(TEXT))) + 2
    assert char.tokens == len(text) and char.unknown == sum(ch not in TEXT for ch in text)
    assert bpe.vocab_size == 280 and bpe.unknown == 0 and tokenizers["bpe"][1].decode(bpe.ids) == text
    assert gpt2.ids == gpt2_tokenizer().encode(text) and gpt2.unknown == 0
    assert word.tokens < gpt2.tokens < bpe.tokens < char.tokens
    assert char.tokens_per_word == pytest.approx(len(text) / 7)


def test_bpe_trained_at_most_stops_where_the_text_runs_out_of_pairs():
    from core.tokenizer import BPETokenizer

    with pytest.raises(TrainingError, match="supports only"):
        BPETokenizer.train(TEXT, 1000)
    bpe = BPETokenizer.train(TEXT, 1000, at_most=True)
    assert 257 < bpe.vocab_size < 1000 and bpe.decode(bpe.encode(TEXT)) == TEXT
    # Every piece of the text is one token now: nothing was left to merge.
    assert len(bpe.encode_ordinary(TEXT)) == len(bpe.pretokenize(TEXT))
    assert BPETokenizer.train(TEXT, 280, at_most=True).ranks == BPETokenizer.train(TEXT, 280).ranks
