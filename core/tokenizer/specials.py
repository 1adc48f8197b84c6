"""Special tokens and text clean-up shared by every tokenizer backend.

The rules follow tiktoken's ``Encoding.encode`` so both backends behave alike:

* a special token's string in the text raises ``DisallowedSpecialToken`` unless
  it is in ``allowed_special`` (``"all"`` allows every one); allowed ones encode
  to their id and the text between them is encoded as ordinary text;
* a string that is not valid UTF-8 (it holds surrogate code points) is repaired
  the way tiktoken repairs it: surrogate *pairs* are joined into the character
  they encode and *lone* surrogates become U+FFFD.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Literal, Union

import regex

from core.tokenizer.errors import DisallowedSpecialToken

AllowedSpecial = Union[Literal["all"], Iterable[str]]


def resolve_allowed(allowed_special: AllowedSpecial, special_tokens: Mapping[str, int]) -> frozenset[str]:
    """Turn ``allowed_special`` ("all", or a set of strings) into a frozenset of known specials."""
    if allowed_special == "all":
        return frozenset(special_tokens)
    if isinstance(allowed_special, str):
        # A bare string is almost always a mistake for {"<|endoftext|>"}.
        raise TypeError(
            f"allowed_special must be 'all' or a set of strings, got the string {allowed_special!r}; "
            f"did you mean {{{allowed_special!r}}}?"
        )
    return frozenset(allowed_special) & frozenset(special_tokens)


@functools.lru_cache(maxsize=64)
def special_regex(tokens: frozenset[str]) -> regex.Pattern[str]:
    """An alternation matching any of ``tokens``; longest first so no token shadows a longer one."""
    ordered = sorted(tokens, key=lambda t: (-len(t), t))
    return regex.compile("|".join(regex.escape(t) for t in ordered))


def check_disallowed(text: str, special_tokens: Mapping[str, int], allowed: frozenset[str]) -> None:
    """Raise ``DisallowedSpecialToken`` if ``text`` contains a special token not in ``allowed``."""
    disallowed = frozenset(special_tokens) - allowed
    if disallowed and (match := special_regex(disallowed).search(text)):
        raise DisallowedSpecialToken(match.group())


def split_on_specials(text: str, allowed: frozenset[str]) -> list[tuple[str, bool]]:
    """Split ``text`` into ``(chunk, is_special)`` pieces around the allowed special tokens."""
    if not allowed:
        return [(text, False)]
    pieces: list[tuple[str, bool]] = []
    start = 0
    for match in special_regex(allowed).finditer(text):
        if match.start() > start:
            pieces.append((text[start : match.start()], False))
        pieces.append((match.group(), True))
        start = match.end()
    if start < len(text):
        pieces.append((text[start:], False))
    return pieces


def repair_surrogates(text: str) -> str:
    """Return ``text`` as valid Unicode, exactly as tiktoken repairs it.

    Python strings may hold surrogate code points (from ``surrogateescape``, or a
    JSON ``"\\ud83d\\ude00"`` decoded by a lenient parser), which have no UTF-8
    form. A round trip through UTF-16 joins valid pairs into one character; the
    remaining lone surrogates become U+FFFD, the replacement character.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
