"""The Lab's word / character / BPE comparison: one text, three ways of cutting it, with their counts.

The word-level and character-level vocabularies (core.tokenizer.word, .char) are learned from a
reference text sent with the request, as the book's chapter 2 builds its vocabulary from a story;
GPT-2's BPE is the one our models use, and our from-scratch BPE can be trained on the same
reference for a like-for-like vocabulary. Nothing here reads a served model, so it works with
no model loaded.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.api.deps import LabDep, OwnerDep
from app.api.routes.lab import LIMITS, measure
from app.schemas import MODEL_RESPONSES, Int, Prompt, RequestModel, Token, bounded, not_blank
from app.services import lab
from core.tokenizer.compare import compare_tokenizers, reference_tokenizers
from core.tokenizer.gpt2 import gpt2_tokenizer

router = APIRouter(prefix="/api/v1/lab", tags=["lab"], responses=MODEL_RESPONSES)

# A few pages of text: enough vocabulary to make the point, and BPE training on it stays
# around a tenth of a second.
MAX_REFERENCE_CHARS = 20_000
# 256 byte tokens plus <|endoftext|> is the smallest byte-level BPE (no merges at all).
MIN_BPE_VOCAB, MAX_BPE_VOCAB = 257, 1024


class LevelsRequest(RequestModel):
    text: Prompt = Field(examples=["The cat sat on the sofa, purring."])
    reference: not_blank(MAX_REFERENCE_CHARS) = Field(
        description="The text the word and character vocabularies (and the optional BPE) are learned from",
        examples=["The cat sat on the mat. The dog sat on the rug."],
    )
    bpe_vocab_size: bounded(Int, ge=MIN_BPE_VOCAB, le=MAX_BPE_VOCAB) | None = Field(
        None, description="Also train our BPE on the reference to this vocabulary size (256 bytes + merges + 1 special)"
    )


class Level(BaseModel):
    key: str = Field(description="word, char, bpe (trained on the reference) or gpt2")
    name: str
    vocab_size: int
    count: int = Field(description="Tokens the text becomes")
    unknown: int = Field(description="Tokens that are <|unk|>: pieces the vocabulary lacks")
    tokens_per_word: float
    tokens: list[Token]


class LevelsResult(BaseModel):
    characters: int
    words: int
    levels: list[Level]


def _compare(body: LevelsRequest) -> list[Any]:
    tokenizers = reference_tokenizers(lab.clean_text(body.reference), body.bpe_vocab_size)
    tokenizers["gpt2"] = ("GPT-2 BPE (50,257 tokens, learned from WebText)", gpt2_tokenizer())
    counts = compare_tokenizers(tokenizers, lab.clean_text(body.text))
    return [(c, lab.tokens(tokenizers[c.key][1], c.ids)) for c in counts]


@router.post("/tokenizer-levels", response_model=LevelsResult, responses=LIMITS)
async def tokenizer_levels(body: LevelsRequest, runner: LabDep, owner: OwnerDep) -> LevelsResult:
    """The text cut by word-level, character-level and BPE tokenizers, with vocabulary size, tokens and unknowns."""
    # A reference too short for the asked BPE vocabulary raises TrainingError: a 422 that says so.
    results = await measure(runner, _compare, body)
    text = lab.clean_text(body.text)
    return LevelsResult(
        characters=len(text),
        words=results[0][0].words,
        levels=[
            Level(key=c.key, name=c.name, vocab_size=c.vocab_size, count=c.tokens, unknown=c.unknown,
                  tokens_per_word=round(c.tokens_per_word, 3), tokens=views)
            for c, views in results
        ],
    )
