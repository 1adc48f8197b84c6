"""Spam classification: one text or a batch, answered by the classifier worker's micro-batches."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from app.api.deps import ModelsDep, Owner, OwnerDep, SettingsDep
from app.schemas import MODEL_RESPONSES, ClassifyBatchRequest, ClassifyBatchResult, ClassifyRequest, ClassifyResult
from app.services.prompts import neutralize_specials
from app.services.registry import CLASSIFIER

router = APIRouter(prefix="/api/v1/classify", tags=["classify"], responses=MODEL_RESPONSES)

LIMIT_RESPONSES = {422: {"description": "Empty text, a text over the length limit, or a batch over the size limit"}}


def _check_text(text: str, max_chars: int, where: str) -> None:
    if len(text) > max_chars:
        raise HTTPException(
            422, detail=f"{where} has {len(text)} characters; the limit is {max_chars} (SCRATCHGPT_MAX_CLASSIFY_CHARS)"
        )


async def _classify(models: ModelsDep, owner: Owner, texts: list[str]) -> list[ClassifyResult]:
    slot = models.require(CLASSIFIER)
    # Text like "<|endoftext|>" in a message is text to classify, not a control token.
    specials = getattr(slot.checkpoint.tokenizer, "special_tokens", None)
    # Owners are served in turn (ClassifierWorker), so one caller's large batch cannot hold up another's text.
    predictions = await slot.worker.classify([neutralize_specials(t, specials) for t in texts], owner.id)
    return [
        ClassifyResult(
            label="spam" if p.label == "spam" else "ham",
            spam_probability=float(p.probabilities["spam"]),
            model=slot.name,
        )
        for p in predictions
    ]


@router.post("", response_model=ClassifyResult, responses=LIMIT_RESPONSES)
async def classify_text(body: ClassifyRequest, models: ModelsDep, settings: SettingsDep, owner: OwnerDep) -> ClassifyResult:
    """Label one message as spam or ham, with the classifier's probability of spam."""
    _check_text(body.text, settings.max_classify_chars, "text")
    return (await _classify(models, owner, [body.text]))[0]


@router.post("/batch", response_model=ClassifyBatchResult, responses=LIMIT_RESPONSES)
async def classify_batch(
    body: ClassifyBatchRequest, models: ModelsDep, settings: SettingsDep, owner: OwnerDep
) -> ClassifyBatchResult:
    """Label several messages at once; results come back in the order of ``texts``."""
    if len(body.texts) > settings.max_classify_batch:
        raise HTTPException(
            422,
            detail=f"batch has {len(body.texts)} texts; the limit is {settings.max_classify_batch} "
            "(SCRATCHGPT_MAX_CLASSIFY_BATCH)",
        )
    for i, text in enumerate(body.texts):
        _check_text(text, settings.max_classify_chars, f"texts[{i}]")
    return ClassifyBatchResult(results=await _classify(models, owner, body.texts))
