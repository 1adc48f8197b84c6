"""Zero-shot and few-shot prompting: a task described in the prompt instead of trained into the weights.

Brown et al. (2020, "Language Models are Few-Shot Learners") showed that a
language model can do a task it was never fine-tuned for when the prompt
states it (zero-shot) and, better, shows k solved examples first (few-shot,
"in-context learning"). Here a task is an instruction, two or more label words
and a pool of solved examples; ``few_shot_prompt`` builds the prompt for k
examples, and ``classify_few_shot`` asks a model for its answer two ways: the
words it writes (greedy), and the probability it gives each label word as the
continuation, which shows how sure it is and how much of its probability goes
to the labels at all.

Two prompt layouts: plain text for a base model (the completion format of the
GPT-3 paper), or, for a chat model, the instruction as a system turn and each
example as a user turn answered by an assistant turn, rendered by the model's
own chat template.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from core.generation.chat_template import ChatTemplate
from core.generation.generate import GenerationConfig, generate_text
from core.model import GPTModel, KVCache


class FewShotError(ValueError):
    """A few-shot request that cannot be built (unknown task, too many examples, empty text)."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class FewShotTask:
    """A classification task told in words: the instruction, the field names, the labels and solved examples.

    ``examples`` is the pool demonstrations are taken from, in order, so k = 1
    always shows the first; keep labels alternating there so small k sees both.
    """

    name: str
    instruction: str
    input_name: str  # what precedes each text, e.g. "Review"
    answer_name: str  # what precedes each label, e.g. "Sentiment"
    labels: tuple[str, ...]
    examples: tuple[Example, ...]

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise FewShotError(f"task {self.name!r} needs at least two labels")
        stray = [e.label for e in self.examples if e.label not in self.labels]
        if stray:
            raise FewShotError(f"task {self.name!r}: example label {stray[0]!r} is not one of {self.labels}")

    def demonstrations(self, k: int) -> list[Example]:
        if not 0 <= k <= len(self.examples):
            raise FewShotError(f"k={k}: task {self.name!r} has {len(self.examples)} examples to show (0 to that)")
        return list(self.examples[:k])


# Short texts of our own writing, so the Lab and the notebooks need no data set.
SENTIMENT = FewShotTask(
    name="sentiment",
    instruction="Classify the sentiment of each movie review as positive or negative.",
    input_name="Review",
    answer_name="Sentiment",
    labels=("positive", "negative"),
    examples=(
        Example("A warm, funny film with a cast that clearly had a great time.", "positive"),
        Example("Two hours I will never get back; the plot makes no sense.", "negative"),
        Example("The music alone is worth the ticket, and the ending is perfect.", "positive"),
        Example("Flat acting, a dull script and jokes that never land.", "negative"),
        Example("I laughed, I cried, and I want to see it again.", "positive"),
        Example("Boring from the first scene to the last.", "negative"),
    ),
)
SPAM = FewShotTask(
    name="spam",
    instruction="Label each text message as spam (unwanted advertising or scams) or ham (a normal message).",
    input_name="Message",
    answer_name="Label",
    labels=("spam", "ham"),
    examples=(
        Example("WINNER!! You have won a 1000 pound prize. Call 0906 123 4567 now to claim.", "spam"),
        Example("Are we still meeting at the station at six?", "ham"),
        Example("URGENT: your account is locked. Reply with your PIN to unlock it.", "spam"),
        Example("Thanks for dinner yesterday, it was lovely to see you.", "ham"),
        Example("Free ringtones! Text TONE to 80088 now, 3 pounds per week.", "spam"),
        Example("I'll be late, the bus broke down. Start without me.", "ham"),
    ),
)
TASKS = {task.name: task for task in (SENTIMENT, SPAM)}


def get_task(name: str) -> FewShotTask:
    if name not in TASKS:
        raise FewShotError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def _check_text(text: str) -> str:
    text = " ".join(text.split())  # one line: a newline would end the example early
    if not text:
        raise FewShotError("the text to classify is empty; type a review or a message")
    return text


def few_shot_prompt(task: FewShotTask, text: str, k: int, template: ChatTemplate | None = None) -> str:
    """The prompt for ``text`` after k demonstrations: plain text, or rendered by a chat ``template``."""
    text = _check_text(text)
    shots = task.demonstrations(k)
    if template is None:
        parts = [task.instruction, ""]
        for shot in shots:
            parts += [f"{task.input_name}: {shot.text}", f"{task.answer_name}: {shot.label}", ""]
        parts += [f"{task.input_name}: {text}", f"{task.answer_name}:"]
        return "\n".join(parts)
    # The label set is said in the system turn; each example is a question answered by its label.
    messages = [{"role": "system", "content": f"{task.instruction} Answer with one word: {' or '.join(task.labels)}."}]
    for shot in shots:
        messages += [{"role": "user", "content": f"{task.input_name}: {shot.text}"},
                     {"role": "assistant", "content": shot.label}]
    messages.append({"role": "user", "content": f"{task.input_name}: {text}"})
    return template.render(messages, add_generation_prompt=True)


@dataclass
class LabelScore:
    label: str
    logprob: float  # log P(label's tokens | prompt), summed over its tokens
    probability: float  # normalised over the task's labels


@dataclass
class FewShotResult:
    k: int
    prompt: str
    prompt_ids: list[int]
    answer: str  # what the model writes, greedily, up to the end of the line or turn
    scores: list[LabelScore]

    @property
    def predicted(self) -> str:
        """The label with the highest probability."""
        return max(self.scores, key=lambda s: s.logprob).label

    @property
    def label_mass(self) -> float:
        """How much of the model's probability goes to any label at all (1 = it answers only with labels)."""
        return sum(math.exp(s.logprob) for s in self.scores)


@torch.inference_mode()
def score_labels(model: GPTModel, tokenizer, prompt_ids: list[int], labels: Sequence[str], prefix: str) -> list[LabelScore]:
    """log P(prefix + label | prompt) per label, probabilities normalised over the labels.

    The prompt runs through the model once into a KV cache; each label's later
    tokens (if it has more than one) run on top of that cache, which is rewound
    between labels, so scoring costs one prompt pass instead of one per label.
    """
    label_ids = [tokenizer.encode_ordinary(prefix + label) for label in labels]
    weight = model.head_weight
    cache = KVCache(model.cfg, 1, max_len=len(prompt_ids) + max(map(len, label_ids)),
                    device=weight.device, dtype=weight.dtype)
    first = model(torch.tensor([prompt_ids], device=weight.device), cache=cache, last_only=True)
    first = first[0, -1].float().log_softmax(-1)
    prompt_length = cache.length
    logprobs = []
    for ids in label_ids:
        logprob = first[ids[0]].item()
        if len(ids) > 1:
            cache.length = prompt_length  # rewind: this label's keys overwrite the last one's
            rest = model(torch.tensor([ids[:-1]], device=weight.device), cache=cache)[0].float().log_softmax(-1)
            logprob += rest[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
        logprobs.append(logprob)
    top = max(logprobs)
    weights = [math.exp(lp - top) if top > -math.inf else 1.0 for lp in logprobs]
    total = sum(weights)
    return [LabelScore(label, lp, w / total) for label, lp, w in zip(labels, logprobs, weights)]


def classify_few_shot(
    model: GPTModel,
    tokenizer,
    task: FewShotTask,
    text: str,
    k: int,
    template: ChatTemplate | None = None,
    max_answer_tokens: int = 8,
) -> FewShotResult:
    """The model's answer to ``text`` after k demonstrations, and the probability of each label.

    After a plain prompt the label follows "Sentiment:" with a space, so
    " positive" is scored; in a chat the assistant's turn starts with the word
    itself. The prompt must fit the model's context window.
    """
    prompt = few_shot_prompt(task, text, k, template)
    if template is None:
        ids, prefix, stops = tokenizer.encode_ordinary(prompt), " ", ("\n",)
    else:
        # The template's own markers are special tokens; the texts were written by us or
        # neutralised by the caller, so allowing specials here only admits the template's.
        ids, prefix, stops = tokenizer.encode(prompt, allowed_special="all"), "", ("\n", *template.stop)
    context = model.cfg.context_length
    if len(ids) + max_answer_tokens > context:
        raise FewShotError(
            f"the prompt for k={k} is {len(ids)} tokens; with a {max_answer_tokens}-token answer it does not fit "
            f"the model's context of {context}: use fewer examples or a shorter text"
        )
    stop_ids = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    cfg = GenerationConfig(max_new_tokens=max_answer_tokens, temperature=0.0, stop_strings=stops, stop_token_ids=stop_ids)
    answer = generate_text(model, tokenizer, ids, cfg).strip()
    return FewShotResult(k, prompt, ids, answer, score_labels(model, tokenizer, ids, task.labels, prefix))
