"""The development measure for instruction tuning: answers that can be checked, and conversations.

ROUGE-L rewards a response for sharing the reference's words, so a fine-tune
that copies the reference's sentence frame and fills it with the wrong fact
("45 kilograms is approximately 9921 pounds", "The past tense of 'fly' is
'fly'") scores well. This measure looks only at the fact:

* **checkable items.** Of the validation and test entries, those whose
  reference holds an answer that can be checked mechanically: a number (with
  its unit when the reference gives one), a single word (antonym, synonym,
  plural, past tense, ...), a capital or other short named fact, a chemical
  formula (case-sensitive: CO is not Co), a label chosen from the options the
  instruction lists, or a deterministic rewrite (passive voice, capitalising
  each word: case-sensitive). :func:`answer_key` picks them from the
  instruction and the reference; :func:`is_correct` judges a response by a
  normalised exact or contains match, so the right answer in another sentence
  frame counts and a wrong fact in the reference's frame does not.
* **conversations** (``instruct_dialogues.json``, written for this project):
  two- and three-turn chats whose last question can only be answered from an
  earlier turn ("And in Fahrenheit?"), each with the strings the last reply
  must contain. The earlier assistant turns are given (teacher forcing); only
  the last reply is generated.

``scratchgpt evaluate instruct --measure`` reports both beside ROUGE-L, which
is computed case-sensitively there (the lower-cased score gives an unchanged
sentence 1.0 on "capitalize each word").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DIALOGUES = Path(__file__).with_name("instruct_dialogues.json")

# A number: thousands groups ("299,792") or plain digits, with an optional sign and decimals;
# not glued to a letter (the 2 of H2O is part of a formula, not a quantity).
_NUMBER = re.compile(r"(?<![A-Za-z0-9.,])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![A-Za-z0-9])")
_TIME = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*([AaPp])\.?\s?[Mm]\b\.?")
_UNIT = re.compile(r"\s*(°\s*[CcFf]\b|degrees?\s+(?:celsius|fahrenheit|centigrade)\b|(?:square|cubic)\s+[a-z]+|[a-z]+)",
                   re.IGNORECASE)
_UNITS = {
    "kilometer": "km", "km": "km", "meter": "m", "m": "m", "centimeter": "cm", "cm": "cm", "millimeter": "mm",
    "mm": "mm", "mile": "mi", "mi": "mi", "foot": "ft", "feet": "ft", "ft": "ft", "inch": "in", "inche": "in",
    "yard": "yd", "kilogram": "kg", "kg": "kg", "gram": "g", "g": "g", "milligram": "mg", "mg": "mg",
    "pound": "lb", "lb": "lb", "ounce": "oz", "oz": "oz", "liter": "l", "litre": "l", "l": "l",
    "milliliter": "ml", "millilitre": "ml", "ml": "ml", "gallon": "gal", "second": "s", "minute": "min",
    "hour": "h", "day": "day", "week": "week", "year": "year", "celsius": "C", "c": "C", "centigrade": "C",
    "fahrenheit": "F", "f": "F", "kelvin": "K", "percent": "%", "unit": "unit", "cent": "cent", "dollar": "$",
}
_CHEMICAL = re.compile(r"(?:[A-Z][a-z]?\d*|\([A-Za-z0-9]+\)\d*)+")
# A single-quoted phrase may hold an apostrophe between letters ('they're').
_QUOTED = re.compile(r"(?<!\w)'((?:[^'\n]|(?<=\w)'(?=\w))+)'(?!\w)|\"([^\"]+)\"|\u2018([^\u2019]+)\u2019|\u201c([^\u201d]+)\u201d")
_WORD_TASK = re.compile(r"\b(opposite|antonym|synonym|past tense|plural|contraction|abbreviation|past participle"
                        r"|comparative|superlative)\b", re.IGNORECASE)
_REWRITE_TASK = re.compile(r"passive voice|active voice|into passive|to passive|correct (?:any )?grammar|grammatical error"
                           r"|capitalize|alphabetical order|(?:past|present|future) (?:perfect|continuous) tense",
                           re.IGNORECASE)
_FACT_TASK = re.compile(r"^(?:what is the capital of|name the (?:device|process|instrument|author|largest|smallest)"
                        r"|what type of|identify the (?:protagonist|main verb|preposition|main subject|verb|noun|adjective"
                        r"|adverb|author)|pick out the (?:correct )?(?:verb|noun|adjective)|who (?:wrote|painted|discovered))",
                        re.IGNORECASE)
_NUMERIC_TASK = re.compile(r"^(?:convert|calculate|what is|what are|find|look up|how many|compute|solve|add|subtract"
                           r"|multiply|divide)\b", re.IGNORECASE)
_OPEN_ENDED = re.compile(r"\b(?:random|generate|example|name an?|name three|list|describe|explain|write|suggest)\b",
                         re.IGNORECASE)
SENTIMENTS = ("positive", "negative", "neutral")


@dataclass(frozen=True)
class AnswerKey:
    """What a correct response must contain. ``answers`` are alternatives, except for kind ``number`` with
    ``all_of`` (a list of numbers, every one needed)."""

    kind: str  # number, time, word, fact, formula, label, rewrite
    answers: tuple[str, ...]
    case_sensitive: bool = False
    asked: str = ""  # the word the question is about (removed from a word answer before matching)
    echo: str = ""  # the entry's input: repeating it is no answer ("She danced gracefully." names no verb)
    labels: tuple[str, ...] = ()  # every option of a label task: a correct response names only the right one
    all_of: bool = False
    units: tuple[str | None, ...] = field(default=())  # per number answer, its normalised unit or None


# -- normalising ---------------------------------------------------------------------


def normalise(text: str, case_sensitive: bool = False) -> str:
    """Curly quotes and dashes made plain, punctuation other than apostrophes made space, spacing collapsed."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text if case_sensitive else text.lower()
    text = re.sub(r"(?<![A-Za-z])'|'(?![A-Za-z])", " ", text)  # quotes, not the apostrophe of they're
    text = re.sub(r"[^\w'\s]", " ", text)
    return " ".join(text.split())


def contains(response: str, answer: str, case_sensitive: bool = False) -> bool:
    """Whether ``answer`` occurs in ``response`` as whole words, after :func:`normalise`."""
    needle = normalise(answer, case_sensitive)
    if not needle:
        return False
    return re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", normalise(response, case_sensitive)) is not None


def _unit(name: str) -> str | None:
    name = " ".join(name.lower().replace("°", " ").split())
    prefix = ""
    for lead in ("square ", "cubic "):
        if name.startswith(lead):
            prefix, name = lead.strip() + " ", name[len(lead):]
    name = name.removeprefix("degrees ").removeprefix("degree ")
    if name not in _UNITS and name.endswith("s"):
        name = name[:-1]
    return prefix + _UNITS[name] if name in _UNITS else None


def quantities(text: str) -> list[tuple[float, str | None]]:
    """Every number in ``text`` with the unit written after it (normalised: km, lb, C, square m...) or None."""
    found = []
    for m in _NUMBER.finditer(text):
        if _TIME.match(text, m.start()):
            continue
        value = float(m.group().replace(",", "").replace("\u2212", "-"))
        after = _UNIT.match(text, m.end())
        found.append((value, _unit(after.group(1)) if after else None))
    return found


def times(text: str) -> list[tuple[int, int]]:
    """Clock times as (hour 0-23, minute): "3:00 PM", "3 pm"."""
    out = []
    for m in _TIME.finditer(text):
        hour, minute = int(m.group(1)) % 12, int(m.group(2) or 0)
        out.append((hour + (12 if m.group(3).lower() == "p" else 0), minute))
    return out


def same_number(a: float, b: float, rel: float = 0.02) -> bool:
    """Equal within 2 % (the references round: 'approximately 99.21 pounds')."""
    return abs(a - b) <= rel * max(abs(a), abs(b)) or abs(a - b) < 1e-9


def _quoted(text: str) -> list[str]:
    return [next(g for g in groups if g) for groups in _QUOTED.findall(text)]


def _strip_word(text: str) -> str:
    return text.strip().strip(".,;:!?\"'").strip()


# -- which items can be checked -------------------------------------------------------


def _number_key(question: str, reference: str) -> AnswerKey | None:
    if "\n" in reference.strip() and re.search(r"^\s*\d+\.", reference, re.MULTILINE):
        return None  # an enumerated list: its numbers are positions
    clock = times(reference)
    if clock and not times(question):
        return AnswerKey("time", tuple(f"{h}:{m:02d}" for h, m in clock))
    asked = [v for v, _ in quantities(question)]
    answers = [(v, u) for v, u in quantities(reference) if not any(same_number(v, a, 1e-9) for a in asked)]
    if not answers:
        return None
    return AnswerKey("number", tuple(f"{v:g}" for v, _ in answers), all_of=len(answers) > 2,
                     units=tuple(u for _, u in answers))


def _label_key(instruction: str, input_text: str, reference: str) -> AnswerKey | None:
    if "\n" in reference.strip():
        return None  # several items, several labels
    options: list[str] = []
    bracket = re.search(r"\[([^\]]+)\]", instruction)
    either = re.search(r"\beither ([\w ,-]+?),? or ([\w-]+)", instruction)
    listed = re.search(r"(?:labels|topics|categories|classes|options)\s*:\s*([^.\n]+)", instruction, re.IGNORECASE)
    if bracket:
        options = bracket.group(1).split(",")
    elif either:
        options = either.group(1).split(",") + [either.group(2)]
    elif listed:
        options = re.split(r",|\bor\b", listed.group(1))
    elif re.search(r"sentiment", instruction, re.IGNORECASE):
        options = list(SENTIMENTS)
    options = [o.strip().strip(".").lower() for o in options if o.strip()]
    hits = [o for o in options if contains(reference, o)]
    if len(options) < 2 or len(hits) != 1:
        return None
    return AnswerKey("label", (hits[0],), labels=tuple(options), asked=input_text)


def answer_key(instruction: str, input_text: str, reference: str) -> AnswerKey | None:
    """The checkable answer in ``reference``, or None when the item is open-ended (a metaphor, a story...)."""
    question = f"{instruction}\n{input_text}"
    if re.search(r"\brandom", instruction, re.IGNORECASE):
        return None
    if re.search(r"chemical formula", instruction, re.IGNORECASE):
        formulas = [t for t in re.findall(r"[A-Za-z0-9()]+", reference)
                    if _CHEMICAL.fullmatch(t) and (re.search(r"\d", t) or len(re.findall(r"[A-Z]", t)) > 1)]
        return AnswerKey("formula", (formulas[-1],), case_sensitive=True) if formulas else None
    if re.search(r"classif|categori|sentiment", instruction, re.IGNORECASE):
        return _label_key(instruction, input_text, reference)
    if _REWRITE_TASK.search(instruction):
        sensitive = bool(re.search(r"capitali", instruction, re.IGNORECASE))
        return AnswerKey("rewrite", (reference.strip(),), case_sensitive=sensitive)
    if _WORD_TASK.search(instruction) and not re.match(r"rewrite|generate", instruction, re.IGNORECASE):
        asked = _quoted(instruction) or ([input_text.strip()] if input_text.strip() else [])
        words = [_strip_word(w) for w in _quoted(reference)]
        answers = [w for w in words if w and w.lower() not in {a.lower().strip(".") for a in asked}]
        if not answers and words:
            answers = words[-1:]  # the plural of 'sheep' is 'sheep'
        if not answers and len(reference.split()) <= 3:
            answers = [_strip_word(reference)]
        if answers and all(len(a.split()) <= 3 for a in answers):
            # Many words are a right synonym; the reference names one, so this kind is a lower bound.
            kind = "synonym" if re.search(r"synonym", instruction, re.IGNORECASE) else "word"
            return AnswerKey(kind, tuple(answers), asked=_strip_word(asked[0]) if asked else "")
        return None
    if re.search(r"spell", instruction, re.IGNORECASE) and input_text:
        fixed = [_strip_word(w) for w in _quoted(reference) if _strip_word(w) not in input_text]
        return AnswerKey("word", (fixed[0],)) if fixed else None
    if _FACT_TASK.search(instruction):
        tail = re.split(r"\b(?:is|are|was|were)\s+(?:called\s+)?", reference)[-1]
        quoted = [_strip_word(w) for w in _quoted(tail)]
        tail = quoted[-1] if quoted else tail
        tail = re.sub(r"^(?:an? type of|an? kind of|an?|the)\s+", "", _strip_word(tail), flags=re.IGNORECASE)
        return AnswerKey("fact", (tail,), echo=input_text.strip()) if tail and len(tail.split()) <= 4 else None
    if _NUMERIC_TASK.search(instruction) and "formula" not in instruction.lower():
        return _number_key(question, reference)
    if len(reference.split()) == 1 and not _OPEN_ENDED.search(instruction):
        return AnswerKey("word", (_strip_word(reference),))
    return None


# -- judging -------------------------------------------------------------------------------


def _numbers_match(key: AnswerKey, response: str) -> bool:
    found = quantities(response)

    def hit(value: float, unit: str | None) -> bool:
        # A unit the reference gives must follow the number in the response too (18.64 miles, not 18.64 km).
        return any(same_number(value, v) and (unit is None or u == unit) for v, u in found)

    wanted = [(float(a), u) for a, u in zip(key.answers, key.units or (None,) * len(key.answers))]
    return all(hit(*w) for w in wanted) if key.all_of else any(hit(*w) for w in wanted)


def is_correct(key: AnswerKey, response: str) -> bool:
    """Whether ``response`` gives the answer of ``key`` (normalised exact or contains match)."""
    if key.echo:
        response = re.sub(re.escape(key.echo), " ", response, flags=re.IGNORECASE)
    if key.kind == "number":
        return _numbers_match(key, response)
    if key.kind == "time":
        return any((int(h), int(m)) in times(response) for h, m in (a.split(":") for a in key.answers))
    if key.kind == "formula":
        tokens = set(re.findall(r"[A-Za-z0-9()]+", response.translate(str.maketrans("₀₁₂₃₄₅₆₇₈₉", "0123456789"))))
        return any(a in tokens for a in key.answers)
    if key.kind == "label":
        # An echo of the input does not count (the topic 'music' may be a word of the sentence).
        said = response.replace(key.asked, " ") if key.asked else response
        said = _QUOTED.sub(" ", said)  # nor does a quoted paraphrase of it
        named = [label for label in key.labels if contains(said, label)]
        return named == [key.answers[0]]
    if key.kind in ("word", "synonym") and key.asked and not any(a.lower() == key.asked.lower() for a in key.answers):
        # The question's own word is no answer: "The opposite of 'hot' is 'hot'" must not pass on 'hot'.
        response = re.sub(rf"(?<!\w){re.escape(key.asked)}(?!\w)", " ", response, flags=re.IGNORECASE)
    elif key.kind in ("word", "synonym") and key.asked:
        # The answer is the asked word itself (the plural of 'sheep'): read what follows the last "is".
        response = re.split(r"\b(?:is|are|would be)\b|:", response)[-1]
    return any(contains(response, a, key.case_sensitive) for a in key.answers)


# -- the conversations ---------------------------------------------------------------------


class DialogueError(ValueError):
    """A conversations file that cannot be used."""


@dataclass
class Dialogue:
    id: str
    messages: list[dict[str, str]]  # ending with the user turn to answer
    expect: tuple[str, ...]  # the last reply must contain one of these
    case_sensitive: bool = False


def read_dialogues(path: str | Path = DIALOGUES) -> list[Dialogue]:
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DialogueError(f"conversations file {path}: {e}") from None
    dialogues = []
    for i, entry in enumerate(entries):
        where = f"{path}, entry {i}"
        messages, expect = entry.get("messages"), entry.get("expect")
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
            raise DialogueError(f"{where}: \"messages\" must be a list of turns ending with a user turn")
        if sum(1 for m in messages if m.get("role") == "user") < 2:
            raise DialogueError(f"{where}: a conversation needs at least two user turns")
        if not isinstance(expect, list) or not expect or not all(isinstance(e, str) and e for e in expect):
            raise DialogueError(f"{where}: \"expect\" must be a non-empty list of strings")
        dialogues.append(Dialogue(str(entry.get("id", i)), messages, tuple(expect), bool(entry.get("case_sensitive"))))
    return dialogues


def dialogue_correct(dialogue: Dialogue, response: str) -> bool:
    """The last reply holds one of the expected strings (numbers compared as numbers: 7,200 is 7200)."""
    for want in dialogue.expect:
        if _NUMBER.fullmatch(want):
            if any(same_number(float(want.replace(",", "")), v, 1e-9) for v, _ in quantities(response)):
                return True
        elif contains(response, want, dialogue.case_sensitive):
            return True
    return False


# -- the report ----------------------------------------------------------------------------


def summarise(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and per kind from records with ``kind`` and ``correct``."""
    by_kind: dict[str, list[bool]] = {}
    for item in items:
        by_kind.setdefault(item["kind"], []).append(item["correct"])
    n = len(items)
    return {
        "n": n,
        "correct": sum(i["correct"] for i in items),
        "accuracy": sum(i["correct"] for i in items) / n if n else None,
        "by_kind": {k: {"n": len(v), "correct": sum(v)} for k, v in sorted(by_kind.items())},
    }
