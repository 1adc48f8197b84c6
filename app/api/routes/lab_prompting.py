"""The Lab's zero-shot against few-shot view: one text classified by the chat model after k = 0, 1, 3 examples.

The prompts, answers and label probabilities come from core.few_shot; this module turns a request
into calls of it on the served chat model (on that model's worker, like every Lab measurement) and
the results into JSON.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.api.deps import LabDep, ModelsDep, OwnerDep
from app.api.routes.lab import CHAT_LIMITS, ModelName, in_process_chat, measure
from app.schemas import MODEL_RESPONSES, Bool, Int, RequestModel, bounded, not_blank
from app.services import lab
from app.services.prompts import neutralize_specials, template_of
from core.few_shot import TASKS, FewShotError, FewShotResult, classify_few_shot, get_task
from core.generation.chat_template import ChatTemplateError

router = APIRouter(prefix="/api/v1/lab", tags=["lab"], responses=MODEL_RESPONSES)

MAX_FEW_SHOT_CHARS = 500  # one review or message
MAX_SHOTS = max(len(task.examples) for task in TASKS.values())

Shots = Annotated[list[bounded(Int, ge=0, le=MAX_SHOTS)], Field(min_length=1, max_length=4)]


class FewShotRequest(RequestModel):
    task: Literal["sentiment", "spam"] = "sentiment"
    text: not_blank(MAX_FEW_SHOT_CHARS) = Field(examples=["Not bad at all, I enjoyed it more than I expected."])
    shots: Shots = Field([0, 1, 3], description="The numbers of examples k to compare, each its own prompt")
    chat_template: Bool = Field(
        False, description="Build each prompt as chat turns in the model's template instead of plain text"
    )


class LabelProbability(BaseModel):
    label: str
    probability: float = Field(description="Normalised over the task's labels")
    logprob: float | None = Field(description="log P(label | prompt); null where it is minus infinity")


class Attempt(BaseModel):
    k: int
    prompt: str = Field(description="The prompt exactly as the model read it")
    prompt_tokens: int
    answer: str = Field(description="What the model wrote (greedy), up to the end of its line or turn")
    predicted: str = Field(description="The label with the highest probability")
    label_mass: float = Field(description="How much probability the model put on the label words at all")
    labels: list[LabelProbability]


class FewShotResponse(BaseModel):
    model: str
    task: str
    instruction: str
    labels: list[str]
    attempts: list[Attempt]


def _attempts(checkpoint, body: FewShotRequest) -> list[FewShotResult]:
    tokenizer = checkpoint.tokenizer
    # Typed text stays text: "<|im_end|>" in it must not close the user's turn.
    text = neutralize_specials(body.text, getattr(tokenizer, "special_tokens", None))
    template = template_of(checkpoint) if body.chat_template else None
    try:
        return [classify_few_shot(checkpoint.model, tokenizer, get_task(body.task), text, k, template)
                for k in dict.fromkeys(body.shots)]
    except (FewShotError, ChatTemplateError) as exc:
        raise lab.LabInputError(str(exc)) from None


def _finite(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


@router.post("/few-shot", response_model=FewShotResponse, responses=CHAT_LIMITS)
async def few_shot(body: FewShotRequest, runner: LabDep, models: ModelsDep, owner: OwnerDep,
                   model: ModelName = None) -> FewShotResponse:
    """The chat model's answer and label probabilities for one text after k examples, for each k asked."""
    slot = in_process_chat(models, model)
    results = await measure(runner, _attempts, slot.checkpoint, body)
    task = get_task(body.task)
    return FewShotResponse(
        model=slot.name,
        task=task.name,
        instruction=task.instruction,
        labels=list(task.labels),
        attempts=[
            Attempt(
                k=r.k, prompt=r.prompt, prompt_tokens=len(r.prompt_ids), answer=r.answer, predicted=r.predicted,
                label_mass=round(r.label_mass, lab.DECIMALS),
                labels=[LabelProbability(label=s.label, probability=round(s.probability, lab.DECIMALS),
                                         logprob=_finite(s.logprob)) for s in r.scores],
            )
            for r in results
        ],
    )
