"""Instruction data: reading, splitting, formatting and batching (the book's chapter 7.2-7.3).

Two formats are accepted, in a JSON list (``.json``) or one object per line
(``.jsonl``):

* the book's ``{"instruction", "input", "output"}`` entries (``input`` may be empty);
* conversations, ``{"messages": [{"role", "content"}, ...]}`` (or a bare list of
  messages) ending with an assistant turn, so the chat service has a
  multi-turn format that was actually trained.

Every entry becomes a list of messages and is rendered by the checkpoint's chat
template (Alpaca for GPT-2 bases as in the book, ChatML for SmolLM2), so what
the model is trained on is exactly what the service will send it.

Batching follows the book's ``custom_collate_fn``: every sequence gets one
end-of-text token, rows are padded with end-of-text, targets are the inputs
shifted by one, and every padding target except the first is -100 (ignored by
the loss), so the model learns to stop but not to babble padding. Optionally
the prompt tokens are masked from the loss too (the book's exercise 7.2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.generation.chat_template import ChatTemplate, alpaca_user_content
from core.model.loss import IGNORE_INDEX

SEED = 123


class InstructDataError(ValueError):
    """An instruction data file that cannot be used (bad JSON, a bad entry, an empty split)."""


@dataclass
class InstructExample:
    messages: list[dict[str, str]]  # the conversation, ending with the reference assistant turn
    entry: dict[str, Any]  # the entry as read, for the responses file
    line: int  # line of the file where the entry starts

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]


# -- reading --------------------------------------------------------------------


def _entries_with_lines(text: str, path: Path) -> list[tuple[Any, int]]:
    """Decode a JSON list or JSON Lines text, keeping the line where each entry starts."""
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    entries: list[tuple[Any, int]] = []

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def fail(e: json.JSONDecodeError) -> InstructDataError:
        return InstructDataError(f"{path}, line {e.lineno}: invalid JSON ({e.msg}, column {e.colno})")

    if stripped.startswith("["):
        pos = len(text) - len(stripped) + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text) and text[pos] == "]":
                break
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise fail(e) from None
            entries.append((value, line_of(pos)))
            pos = end
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text) and text[pos] == ",":
                pos += 1
            elif pos >= len(text) or text[pos] != "]":
                raise InstructDataError(f"{path}, line {line_of(pos)}: expected ',' or ']' after entry {len(entries)}")
        return entries
    # JSON Lines: one entry per non-blank line.
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                entries.append((json.loads(line), number))
            except json.JSONDecodeError as e:
                raise InstructDataError(f"{path}, line {number}: invalid JSON ({e.msg}, column {e.colno})") from None
    return entries


def user_content(instruction: str, input_text: str, template: ChatTemplate) -> str:
    """The user turn of a book entry: Alpaca's ``### Input:`` section, or a blank line for chat templates."""
    if template.name == "alpaca":
        return alpaca_user_content(instruction, input_text)
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def entry_messages(entry: Any, template: ChatTemplate, where: str) -> list[dict[str, str]]:
    """One entry of either format as a message list; InstructDataError (naming ``where``) if malformed."""
    if isinstance(entry, dict) and "instruction" in entry:
        for key in ("instruction", "output"):
            if not isinstance(entry.get(key), str):
                raise InstructDataError(f"{where}: \"{key}\" must be a string")
        if not isinstance(entry.get("input", ""), str):
            raise InstructDataError(f"{where}: \"input\" must be a string")
        return [
            {"role": "user", "content": user_content(entry["instruction"], entry.get("input", ""), template)},
            {"role": "assistant", "content": entry["output"]},
        ]
    messages = entry.get("messages") if isinstance(entry, dict) else entry
    if not isinstance(messages, list) or not messages:
        raise InstructDataError(
            f"{where}: expected {{\"instruction\", \"input\", \"output\"}} or {{\"messages\": [...]}}, "
            f"got {str(entry)[:60]!r}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InstructDataError(f"{where}: message {i} needs a role of system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise InstructDataError(f"{where}: message {i} needs a string content")
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
        raise InstructDataError(f"{where}: a conversation needs a user turn and must end with an assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_instruct_file(path: str | Path, template: ChatTemplate) -> list[InstructExample]:
    """Every entry of an instruction file as messages for ``template``."""
    path = Path(path)
    if not path.is_file():
        raise InstructDataError(f"instruction data file {path} does not exist; pass --data PATH")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InstructDataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    examples = [
        InstructExample(entry_messages(entry, template, f"{path}, line {line} (entry {i})"), entry, line)
        for i, (entry, line) in enumerate(_entries_with_lines(text, path))
    ]
    if not examples:
        raise InstructDataError(f"instruction data file {path} has no entries")
    return examples


@dataclass
class InstructSplits:
    train: list[InstructExample]
    val: list[InstructExample]
    test: list[InstructExample]


def split_instruct(
    examples: list[InstructExample], train_frac: float = 0.85, test_frac: float = 0.10, seed: int = SEED, source: str = "data"
) -> InstructSplits:
    """Seeded shuffle, then the book's cut: 85% train, 10% test, the remaining 5% validation."""
    order = np.random.RandomState(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    train_end = int(len(shuffled) * train_frac)
    test_end = train_end + int(len(shuffled) * test_frac)
    splits = InstructSplits(train=shuffled[:train_end], val=shuffled[test_end:], test=shuffled[train_end:test_end])
    for name in ("train", "val", "test"):
        if not getattr(splits, name):
            raise InstructDataError(
                f"{source}: {len(examples)} entries leave the {name} split empty "
                f"(85/5/10 needs at least 20 entries)"
            )
    return splits


# -- chaining examples into conversations -------------------------------------------

_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"")
# Follow-up phrasings, several so the model learns the pattern rather than one sentence.
_SAME_INPUT = ("Now this one: {}", "And this one: {}", "Do the same for: {}", "Same again: {}")
_SAME_QUOTED = ("And {}?", "What about {}?", "Now {}.", "And for {}?")


def _quoted(text: str) -> list[str]:
    return [a or b for a, b in _QUOTED.findall(text)]


def task_key(instruction: str) -> str:
    """The instruction with quoted words and numbers blanked: entries with one key ask for the same task."""
    key = _QUOTED.sub("Q", instruction.lower())
    return " ".join(re.sub(r"\d+(?:[.,]\d+)*", "#", key).split())


def _follow_up(previous: dict[str, Any], entry: dict[str, Any], template: ChatTemplate, pick: int) -> str:
    """The user turn asking for ``entry`` after ``previous`` (the same task): elliptical where it can be."""
    instruction, input_text = entry["instruction"], entry.get("input", "")
    if instruction == previous["instruction"] and input_text:
        return _SAME_INPUT[pick % len(_SAME_INPUT)].format(input_text)
    words = _quoted(instruction)
    # An input that repeats the quoted word adds nothing to the short form.
    if words and (not input_text or input_text in instruction) and _QUOTED.sub("Q", instruction) == _QUOTED.sub("Q", previous["instruction"]):
        return _SAME_QUOTED[pick % len(_SAME_QUOTED)].format(", ".join(f"'{w}'" for w in words))
    return user_content(instruction, input_text, template)


def chain_conversations(
    examples: list[InstructExample], turns: int, template: ChatTemplate, seed: int = SEED
) -> list[InstructExample]:
    """Book entries chained into conversations of up to ``turns`` exchanges, so later turns see earlier ones.

    Entries that ask for the same task (same :func:`task_key`) are chained first
    and their later questions made elliptical ("And 'young'?", "Now this one:
    ..."), which the model can only answer by reading the earlier turn; the
    rest are chained in a seeded random order as unrelated questions, which
    teaches it to answer the last question rather than repeat the first answer.
    Each entry is used once; every assistant turn is a training target, so the
    first turns still teach single-turn answers. Conversation entries pass
    through unchanged.
    """
    if turns < 1:
        raise InstructDataError(f"turns must be >= 1, got {turns}")
    book = [e for e in examples if isinstance(e.entry, dict) and "instruction" in e.entry and len(e.messages) == 2]
    kept = [e for e in examples if not (isinstance(e.entry, dict) and "instruction" in e.entry and len(e.messages) == 2)]
    if turns == 1:
        return list(examples)
    rng = np.random.RandomState(seed)
    order = [book[i] for i in rng.permutation(len(book))]
    by_task: dict[str, list[InstructExample]] = {}
    for e in order:
        by_task.setdefault(task_key(e.entry["instruction"]), []).append(e)
    groups: list[list[InstructExample]] = []
    rest: list[InstructExample] = []
    for same in by_task.values():
        whole = len(same) - len(same) % turns if len(same) >= turns else 0
        groups += [same[i : i + turns] for i in range(0, whole, turns)]
        rest += same[whole:]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    unrelated = [rest[i : i + turns] for i in range(0, len(rest), turns)]
    chained: list[InstructExample] = []
    for group, same_task in [(g, True) for g in groups] + [(g, False) for g in unrelated]:
        messages = list(group[0].messages)
        for previous, e in zip(group, group[1:]):
            question = (_follow_up(previous.entry, e.entry, template, int(rng.randint(1 << 30))) if same_task
                        else e.messages[0]["content"])
            messages += [{"role": "user", "content": question}, e.messages[1]]
        chained.append(InstructExample(messages, {"messages": messages}, group[0].line))
    return kept + [chained[i] for i in rng.permutation(len(chained))]


# -- tokenizing -------------------------------------------------------------------


@dataclass
class EncodedExample:
    ids: list[int]
    # trainable[i]: token i belongs to an assistant turn (a response the model must learn to write)
    trainable: list[bool] = field(default_factory=list)


def render_segments(messages: list[dict[str, str]], template: ChatTemplate) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) pieces.

    Each assistant turn's text is what the template adds between the prompt that
    asks for it (``add_generation_prompt=True``) and the conversation that
    includes it, so the piece includes any end-of-turn marker (``<|im_end|>``)
    the model must learn to write.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        full = template.render(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise InstructDataError(
                f"chat template {template.name!r} does not render a conversation as a prefix of its continuation; "
                "it cannot be used to fine-tune on multi-turn data"
            )
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = template.render(messages, add_generation_prompt=False)[len(done):]
    if rest:
        pieces.append((rest, False))
    return [(text, trainable) for text, trainable in pieces if text]


def encode_example(messages: list[dict[str, str]], template: ChatTemplate, tokenizer) -> EncodedExample:
    ids: list[int] = []
    trainable: list[bool] = []
    for text, is_assistant in render_segments(messages, template):
        # The template's own control tokens (<|im_start|>, ...) must map to their
        # special ids; the data file is trusted training input.
        piece = tokenizer.encode(text, allowed_special="all")
        ids += piece
        trainable += [is_assistant] * len(piece)
    return EncodedExample(ids, trainable)


def encode_prompt(messages: list[dict[str, str]], template: ChatTemplate, tokenizer) -> list[int]:
    """Token ids of the prompt that asks for the next assistant turn (generation and evaluation)."""
    return tokenizer.encode(template.render(messages, add_generation_prompt=True), allowed_special="all")


def collate(
    batch: list[EncodedExample],
    pad_id: int,
    *,
    max_length: int | None = None,
    mask_prompt: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) and targets (B, T) for next-token prediction (the book's custom_collate_fn).

    Each sequence gets one end-of-text (``pad_id``) appended, which stays a
    target so the model learns to end its answer; further padding is
    ``ignore_index``. With ``mask_prompt``, targets that are prompt tokens are
    ``ignore_index`` too. Sequences longer than ``max_length`` inputs are cut
    at the end.
    """
    rows = []
    for example in batch:
        ids = example.ids + [pad_id]
        keep = (example.trainable or [True] * len(example.ids)) + [True]
        if max_length is not None:
            ids, keep = ids[: max_length + 1], keep[: max_length + 1]
        rows.append((ids, keep))
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), ignore_index, dtype=torch.long)
    for r, (ids, keep) in enumerate(rows):
        n = len(ids) - 1
        inputs[r, :n] = torch.tensor(ids[:-1])
        target = torch.tensor(ids[1:])
        if mask_prompt:
            target[~torch.tensor(keep[1:])] = ignore_index
        targets[r, :n] = target
    return inputs, targets
