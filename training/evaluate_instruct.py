"""Evaluating an instruction-tuned model (the book's chapter 7.7-7.8).

``scratchgpt evaluate instruct --checkpoint DIR --data PATH --out RESPONSES.json
[--judge-url URL --judge-model NAME]``

A response is generated (greedy) for every entry of the file and compared
with the reference by ROUGE-L F1 (Lin, 2004): the longest common subsequence
of the two token sequences, as precision against the response length and
recall against the reference length. It rewards getting the content in the
right order without demanding exact wording, and needs no model.

The book scores responses with a larger model (Llama 3 through ollama); with
``--judge-url`` any OpenAI-compatible endpoint (ollama serves one at
``http://localhost:11434/v1``) scores each response from 0 to 100 with the
book's prompt.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from core.generation.chat_template import ALPACA, ChatTemplate
from core.weights.checkpoint import load_checkpoint
from core.generation.generate import GenerationConfig, generate
from core.generation.sampling import SamplingConfig
from core.device import resolve_device
from training.instruct_data import InstructExample, encode_prompt, read_instruct_file, split_instruct
from training.instruct_measure import DIALOGUES, Dialogue, answer_key, dialogue_correct, is_correct, read_dialogues, summarise

log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or answered something unusable."""


# -- ROUGE-L ---------------------------------------------------------------------


def rouge_tokens(text: str, case_sensitive: bool = False) -> list[str]:
    """Alphanumeric runs, lower-cased unless ``case_sensitive``: punctuation and spacing do not count (as in
    rouge-score, which lower-cases; case-sensitive, "The Book Is On The Table" differs from the unchanged sentence)."""
    return re.findall(r"[A-Za-z0-9]+", text) if case_sensitive else re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming in O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(response: str, reference: str, case_sensitive: bool = False) -> dict[str, float]:
    """ROUGE-L precision, recall and F1 of ``response`` against ``reference``."""
    hyp, ref = rouge_tokens(response, case_sensitive), rouge_tokens(reference, case_sensitive)
    if not hyp or not ref:
        # Two empty texts agree perfectly; one empty text shares nothing.
        score = 1.0 if hyp == ref else 0.0
        return {"precision": score, "recall": score, "f1": score}
    lcs = lcs_length(hyp, ref)
    precision, recall = lcs / len(hyp), lcs / len(ref)
    f1 = 2 * precision * recall / (precision + recall) if lcs else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# -- generation ---------------------------------------------------------------------


def stop_token_ids(tokenizer, template: ChatTemplate) -> tuple[int, ...]:
    """End-of-sequence plus any stop string that is a single special token (ChatML's <|im_end|>)."""
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    specials = getattr(tokenizer, "special_tokens", {}) or {}
    ids |= {specials[s] for s in template.stop if s in specials}
    return tuple(sorted(ids))


def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut].strip()


@torch.inference_mode()
def generate_responses(
    model, tokenizer, template: ChatTemplate, examples: list[InstructExample], *,
    max_new_tokens: int = 256, batch_size: int = 8, sampling: SamplingConfig | None = None,
) -> list[str]:
    """The response to each example's prompt messages (batched, length-sorted to limit padding); greedy
    unless ``sampling`` says otherwise."""
    model.eval()
    prompts = [encode_prompt(e.prompt_messages, template, tokenizer) for e in examples]
    limit = model.cfg.context_length
    cfg = GenerationConfig(**vars(sampling or SamplingConfig()), max_new_tokens=max_new_tokens,
                           stop_token_ids=stop_token_ids(tokenizer, template))
    responses: list[str] = [""] * len(examples)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        # Keep the end of an over-long prompt (the question), leaving room to answer.
        batch = [prompts[i][-(limit - max_new_tokens):] if len(prompts[i]) > limit - max_new_tokens else prompts[i] for i in rows]
        for i, ids in zip(rows, generate(model, batch, cfg)):
            responses[i] = cut_at_stop(tokenizer.decode(ids), template.stop)
        log.info("generated %d/%d responses", min(s + batch_size, len(order)), len(order))
    return responses


def response_record(example: InstructExample, response: str) -> dict[str, Any]:
    """One entry of the responses file: the book's format, or the conversation for multi-turn data."""
    entry = example.entry
    if isinstance(entry, dict) and "instruction" in entry:
        return {"instruction": entry["instruction"], "input": entry.get("input", ""), "output": entry["output"],
                "model_response": response}
    return {"messages": example.prompt_messages, "output": example.reference, "model_response": response}


# -- the judge ------------------------------------------------------------------------


def judge_prompt(record: dict[str, Any]) -> str:
    """The book's scoring prompt (chapter 7.8)."""
    if "instruction" in record:
        asked = (f"{ALPACA.default_system}\n\n### Instruction:\n{record['instruction']}"
                 + (f"\n\n### Input:\n{record['input']}" if record.get("input") else ""))
    else:
        asked = "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    return (
        f"Given the input `{asked}` and correct output `{record['output']}`, "
        f"score the model response `{record['model_response']}` on a scale from 0 to 100, "
        "where 100 is the best score. Respond with the integer number only."
    )


def judge_score(record: dict[str, Any], url: str, model: str, timeout: float = 120.0) -> int | None:
    """0-100 from an OpenAI-compatible chat endpoint; None when the answer holds no number."""
    import httpx

    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    headers = {}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    body = {"model": model, "messages": [{"role": "user", "content": judge_prompt(record)}],
            "temperature": 0, "seed": 123, "stream": False}
    try:
        resp = httpx.post(endpoint, json=body, headers=headers, timeout=timeout)
        resp.raise_for_status()
        content = resp.json()["choices"][0]["message"]["content"]
    except httpx.HTTPError as e:
        raise JudgeError(f"--judge-url {url}: request to {endpoint} failed: {e}") from None
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise JudgeError(f"--judge-url {url}: {endpoint} did not answer like an OpenAI chat completion ({e})") from None
    match = re.search(r"\d+", content or "")
    return min(100, int(match.group())) if match else None


# -- the command ---------------------------------------------------------------------


def evaluate_instruct(
    checkpoint: str | Path, data: str | Path, out: str | Path,
    judge_url: str | None = None, judge_model: str | None = None,
    max_new_tokens: int = 256, batch_size: int = 8, device: str = "auto",
) -> dict[str, Any]:
    """Generate for every entry of ``data``, write the responses to ``out``, return the scores."""
    if (judge_url is None) != (judge_model is None):
        raise JudgeError("--judge-url and --judge-model go together: give both or neither")
    ckpt = load_checkpoint(checkpoint, resolve_device(device))
    if ckpt.task != "causal-lm":
        raise ValueError(f"--checkpoint {checkpoint} is a {ckpt.task} checkpoint; instruction evaluation needs a causal-lm")
    template = ckpt.chat_template or ALPACA
    examples = read_instruct_file(data, template)
    responses = generate_responses(ckpt.model, ckpt.tokenizer, template, examples,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
    records = [response_record(e, r) for e, r in zip(examples, responses)]
    scores = [rouge_l(r["model_response"], r["output"])["f1"] for r in records]
    for record, score in zip(records, scores):
        record["rouge_l_f1"] = round(score, 4)
    result: dict[str, Any] = {"n": len(records), "rouge_l_f1": sum(scores) / len(scores)}
    if judge_url is not None:
        judged = [judge_score(r, judge_url, judge_model) for r in records]
        for record, score in zip(records, judged):
            record["judge_score"] = score
        valid = [s for s in judged if s is not None]
        result.update(judge_model=judge_model, judge_score=sum(valid) / len(valid) if valid else None,
                      judge_unscored=len(judged) - len(valid))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    result["responses"] = str(out)
    return result


# -- the development measure (training/instruct_measure.py) -----------------------------


def measure_responses(
    model, tokenizer, template: ChatTemplate, examples: list[InstructExample], dialogues: list[Dialogue], *,
    sampling: SamplingConfig | None = None, samples: int = 1, max_new_tokens: int = 256, batch_size: int = 8,
) -> dict[str, Any]:
    """Checkable-answer accuracy, conversation accuracy and case-sensitive ROUGE-L of one model and decoding.

    With sampling, each item is answered ``samples`` times (seeds ``seed``, ``seed + 1``, ...) and every
    answer counts, so a setting is judged by what a user would see on average.
    """
    chats = [InstructExample(d.messages + [{"role": "assistant", "content": d.expect[0]}], {"messages": d.messages}, 0)
             for d in dialogues]
    greedy = sampling is None or sampling.greedy
    runs = 1 if greedy else samples
    items, turns = [], []
    for run in range(runs):
        cfg = sampling if greedy else SamplingConfig(**{**vars(sampling), "seed": (sampling.seed or 0) + run})
        answers = generate_responses(model, tokenizer, template, examples + chats, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, sampling=cfg)
        for example, response in zip(examples, answers):
            record = response_record(example, response)
            record["rouge_l_f1"] = round(rouge_l(response, example.reference, case_sensitive=True)["f1"], 4)
            record["rouge_l_f1_lower"] = round(rouge_l(response, example.reference)["f1"], 4)
            entry = example.entry if isinstance(example.entry, dict) else {}
            key = answer_key(entry.get("instruction", ""), entry.get("input", ""), example.reference) \
                if "instruction" in entry else None
            if key is not None:
                record.update(kind=key.kind, answer=list(key.answers), correct=is_correct(key, response))
            items.append(record)
        for dialogue, response in zip(dialogues, answers[len(examples):]):
            turns.append({"id": dialogue.id, "messages": dialogue.messages, "expect": list(dialogue.expect),
                          "model_response": response, "kind": "conversation",
                          "correct": dialogue_correct(dialogue, response)})
    checked = [r for r in items if "correct" in r]
    return {
        "samples": runs,
        "checkable": summarise(checked),
        "conversations": summarise(turns),
        "rouge_l_f1": sum(r["rouge_l_f1"] for r in items) / len(items) if items else None,
        "rouge_l_f1_lower": sum(r["rouge_l_f1_lower"] for r in items) / len(items) if items else None,
        "n_items": len(items) // runs,
        "records": items,
        "conversation_records": turns,
    }


def measure_instruct(
    checkpoint: str | Path, data: str | Path, out: str | Path, *, split_seed: int = 123,
    dialogues: str | Path = DIALOGUES, sampling: SamplingConfig | None = None, samples: int = 1,
    max_new_tokens: int = 256, batch_size: int = 8, device: str = "auto", checkable_only: bool = False,
) -> dict[str, Any]:
    """``scratchgpt evaluate instruct --measure``: the development measure on the fine-tune job's own
    validation and test splits of ``data`` (the same seeded split), plus the conversations file."""
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    ckpt = load_checkpoint(checkpoint, resolve_device(device))
    if ckpt.task != "causal-lm":
        raise ValueError(f"--checkpoint {checkpoint} is a {ckpt.task} checkpoint; instruction evaluation needs a causal-lm")
    template = ckpt.chat_template or ALPACA
    splits = split_instruct(read_instruct_file(data, template), seed=split_seed, source=str(data))
    items = splits.val + splits.test
    if checkable_only:
        # Open-ended items only feed ROUGE-L; leaving them out makes a decoding sweep a third cheaper.
        items = [e for e in items if isinstance(e.entry, dict) and "instruction" in e.entry
                 and answer_key(e.entry["instruction"], e.entry.get("input", ""), e.reference) is not None]
    result = measure_responses(ckpt.model, ckpt.tokenizer, template, items, read_dialogues(dialogues),
                               sampling=sampling, samples=samples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plain = sampling is None or (sampling.greedy and not sampling.penalized)
    result["sampling"] = "greedy" if plain else vars(sampling)
    result["items"] = "checkable" if checkable_only else "all"
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    summary = {k: v for k, v in result.items() if k not in ("records", "conversation_records")}
    summary["responses"] = str(out)
    return summary
