"""From a conversation to prompt token ids: chat template, context-window fitting, sampling settings.

A conversation is rendered through the checkpoint's chat template (as in the book's
chapter 7, where the Alpaca format is the fine-tuning prompt). When it outgrows the
context window, whole turns are dropped from the oldest end until prompt plus answer
fit; the system prompt always stays, and the caller is told how many messages went.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.db.models import STATUS_ERROR, Message
from core.generation.chat_template import ALPACA, ChatTemplate
from core.generation.generate import GenerationConfig

# Below this many tokens of room for the answer a reply is not worth starting.
MIN_ANSWER_TOKENS = 8
# A checkpoint without a chat template (a base model) is driven with the Alpaca format.
FALLBACK_TEMPLATE = ALPACA
ZERO_WIDTH_SPACE = "\u200b"


class PromptTooLong(ValueError):
    """Even the newest message alone does not fit the model's context window."""


@dataclass
class PromptPlan:
    prompt_ids: list[int]
    dropped_messages: int  # how many of the oldest messages were left out
    max_new_tokens: int  # the answer budget after fitting (may be below what was asked)
    # The kept turns (system prompt first) and the answer's written start: what a model served
    # elsewhere is sent instead of ids, since it applies its own template (app.services.remote_chat).
    messages: list[dict[str, str]] = field(default_factory=list)
    answer_prefix: str = ""


def neutralize_specials(text: str, special_tokens: Any) -> str:
    """Break up special-token strings in user text so "<|im_end|>" typed by a user stays text.

    The rendered prompt is encoded with the template's special tokens allowed; without this a
    user could close their own turn and forge a system or assistant turn.
    """
    for special in special_tokens or ():
        if special in text:
            text = text.replace(special, special[0] + ZERO_WIDTH_SPACE + special[1:])
    return text


def template_of(checkpoint: Any) -> ChatTemplate:
    return checkpoint.chat_template or FALLBACK_TEMPLATE


def encode_prompt(checkpoint: Any, messages: list[dict[str, str]], answer_prefix: str = "") -> list[int]:
    """The template's prompt for ``messages`` and the assistant's turn opened; ``answer_prefix``
    is written into that turn without closing it, so the model goes on from it (continuing a cut answer)."""
    tokenizer = checkpoint.tokenizer
    specials = getattr(tokenizer, "special_tokens", {}) or {}
    clean = [{"role": m["role"], "content": neutralize_specials(m["content"], specials)} for m in messages]
    text = template_of(checkpoint).render(clean, add_generation_prompt=True)
    text += neutralize_specials(answer_prefix, specials)
    return tokenizer.encode(text, allowed_special=frozenset(specials))


def conversation_turns(messages: list[Message]) -> list[dict[str, str]]:
    """The turns the model sees of stored messages: user messages and answers with text (partial answers included)."""
    return [
        {"role": m.role, "content": m.content}
        for m in messages
        if m.role == "user" or (m.role == "assistant" and m.status != STATUS_ERROR and m.content)
    ]


def with_system(system_prompt: str, turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """``turns`` under the system prompt, if there is one."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + turns


def plan_prompt(
    checkpoint: Any,
    system_prompt: str,
    turns: list[dict[str, str]],
    max_new_tokens: int,
    allow_drop: bool = True,
    answer_prefix: str = "",
) -> PromptPlan:
    """Fit ``system_prompt`` + ``turns`` (oldest first, ending with the user's message) into the window.

    Drops turns from the oldest end, always at a user message so the kept history starts with a
    question, until ``prompt + max_new_tokens`` fits; if even the last user message alone leaves
    less room than asked, the answer budget shrinks, down to ``MIN_ANSWER_TOKENS``.
    ``answer_prefix``: the start of the answer, already written (see :func:`encode_prompt`).
    """
    context = checkpoint.config.context_length

    def encode(start: int) -> list[int]:
        return encode_prompt(checkpoint, with_system(system_prompt, turns[start:]), answer_prefix)

    def planned(ids: list[int], start: int, budget: int) -> PromptPlan:
        return PromptPlan(ids, start, budget, with_system(system_prompt, turns[start:]), answer_prefix)

    if not allow_drop:
        ids = encode(0)
        budget = context - len(ids)
        if budget < MIN_ANSWER_TOKENS:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens and the model's context window is {context}; "
                "shorten the messages"
            )
        return planned(ids, 0, min(max_new_tokens, budget))
    # Candidate cut points: each user message; dropping everything before it keeps a clean history.
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"] or [0]
    ids = encode(starts[0])
    if len(ids) + max_new_tokens <= context:
        return planned(ids, starts[0], max_new_tokens)
    # The prompt length shrinks as the cut moves later, so binary-search the earliest cut that fits.
    lo, hi = 0, len(starts) - 1
    fitting: tuple[int, list[int]] | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = encode(starts[mid])
        if len(candidate) + max_new_tokens <= context:
            fitting, hi = (starts[mid], candidate), mid - 1
        else:
            lo = mid + 1
    if fitting is not None:
        return planned(fitting[1], fitting[0], max_new_tokens)
    last = starts[-1]
    ids = encode(last)
    budget = context - len(ids)
    if budget < MIN_ANSWER_TOKENS:
        raise PromptTooLong(
            f"the message is too long for the model: the prompt needs {len(ids)} tokens and the context "
            f"window is {context}, leaving no room for an answer; shorten the message or the system prompt"
        )
    return planned(ids, last, budget)


def sent_messages(plan: PromptPlan) -> list[dict[str, str]]:
    """The plan as messages, for a model served elsewhere: an answer being continued is the last turn."""
    if plan.answer_prefix:
        return [*plan.messages, {"role": "assistant", "content": plan.answer_prefix}]
    return plan.messages


def generation_config(
    checkpoint: Any,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    max_new_tokens: int,
    seed: int | None = None,
    extra_stop: list[str] | None = None,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> GenerationConfig:
    """Sampling settings plus the stop conditions the checkpoint's template and tokenizer define."""
    template = template_of(checkpoint)
    tokenizer = checkpoint.tokenizer
    specials = getattr(tokenizer, "special_tokens", {}) or {}
    stop_ids = set(checkpoint.stop_token_ids)
    stop_strings = []
    for stop in [*template.stop, *(extra_stop or [])]:
        if stop in specials:
            stop_ids.add(specials[stop])  # a stop that is one token ends on the token itself
        else:
            stop_strings.append(stop)
    return GenerationConfig(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p if top_p is not None and top_p < 1.0 else None,
        seed=seed,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        max_new_tokens=max_new_tokens,
        stop_token_ids=tuple(sorted(stop_ids)),
        stop_strings=tuple(stop_strings),
    )
