"""Chat templates: how a conversation becomes one prompt string.

A template is data stored in each checkpoint (``config.json``), so every
caller (the CLI chat, the fine-tuning jobs, the web service) renders any
conversation for any model the same way. Templates are Jinja2, the format
Hugging Face and GGUF files use; they are rendered in Jinja's sandbox because
a template read from a downloaded file is untrusted input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    pass


@dataclass
class ChatTemplate:
    name: str
    template: str
    # Text that ends an assistant turn when the model writes it instead of
    # (or before) its end-of-sequence token.
    stop: list[str] = field(default_factory=list)
    default_system: str | None = None

    @cached_property
    def _compiled(self):
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
        return env.from_string(self.template)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        for i, message in enumerate(messages):
            if message.get("role") not in ("system", "user", "assistant"):
                raise ChatTemplateError(f"message {i} has role {message.get('role')!r}; use system, user or assistant")
            if not isinstance(message.get("content"), str):
                raise ChatTemplateError(f"message {i} has no text content")
        return self._compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, default_system=self.default_system
        )

    def portable(self) -> str:
        """This template as Jinja text that renders the same in other programs.

        Hugging Face (``tokenizer_config.json``'s ``chat_template``, which vLLM
        and TGI use too) and llama.cpp (``tokenizer.chat_template`` in a GGUF
        file) render with ``trim_blocks`` and ``lstrip_blocks``, which eat the
        newline after a ``{% ... %}`` tag and the indentation before one; we
        render without. The newline and the indentation are therefore written
        as ``{{ '...' }}`` expressions, which no setting trims, and
        ``default_system``, a variable only we pass, is set inside the text.
        """
        text = self.template
        if "default_system" in text:
            value = "none" if self.default_system is None else json.dumps(self.default_system, ensure_ascii=False)
            text = f"{{% set default_system = {value} %}}" + text
        return _untrimmable(text)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "template": self.template, "stop": list(self.stop), "default_system": self.default_system}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChatTemplate":
        return cls(data["name"], data["template"], list(data.get("stop", [])), data.get("default_system"))


_TAG_ENDS = ("block_end", "comment_end", "raw_end")
_TAG_BEGINS = ("block_begin", "comment_begin", "raw_begin")


def _literal(text: str) -> str:
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _untrimmable(template: str) -> str:
    """``template`` with the text that ``trim_blocks``/``lstrip_blocks`` would remove moved into expressions."""
    tokens = [(kind, value) for _, kind, value in ImmutableSandboxedEnvironment(keep_trailing_newline=True).lex(template)]
    out = []
    for i, (kind, value) in enumerate(tokens):
        before = tokens[i - 1][0] if i else None
        # Text inside {% raw %} is left as it is (no template we know of has one).
        if kind != "data" or before == "raw_begin":
            out.append(value)
            continue
        text, head, tail = value, "", ""
        if before in _TAG_ENDS and text.startswith("\n"):
            head, text = _literal("\n"), text[1:]
        after_kind, after_value = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        # "{%-" strips anyway and "{%+" keeps; only a plain opening is lstripped.
        if after_kind in _TAG_BEGINS and after_value[2:3] not in ("-", "+"):
            line_start = value.rfind("\n") + 1
            indent = value[line_start:]
            if indent and not indent.strip(" \t") and (line_start > 0 or i == 0):
                text, tail = text[: len(text) - len(indent)], _literal(indent)
        if i == len(tokens) - 1 and text.endswith("\n"):  # Jinja drops one final newline by default
            text, tail = text[:-1], _literal("\n")
        out.append(head + text + tail)
    return "".join(out)


# ChatML (OpenAI; used by SmolLM2): every turn framed by <|im_start|>role ... <|im_end|>.
CHATML = ChatTemplate(
    name="chatml",
    template=(
        "{% if default_system and messages[0]['role'] != 'system' %}"
        "<|im_start|>system\n{{ default_system }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    stop=["<|im_end|>"],
)

# The Alpaca format (Taori et al., 2023) the book's chapter 7 fine-tunes GPT-2 with.
# A single user turn renders exactly as the book's format_input() + "\n\n### Response:\n";
# further turns repeat the Instruction/Response pair.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA = ChatTemplate(
    name="alpaca",
    template=(
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% else %}{{ default_system }}{% endif %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}\n\n### Instruction:\n{{ m['content'] }}"
        "{% elif m['role'] == 'assistant' %}\n\n### Response:\n{{ m['content'] }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}\n\n### Response:\n{% endif %}"
    ),
    stop=["\n\n### Instruction:", "\n\n### Input:", "\n\n### Response:"],
    default_system=ALPACA_PREAMBLE,
)

BUILTIN = {t.name: t for t in (CHATML, ALPACA)}


def alpaca_user_content(instruction: str, input_text: str = "") -> str:
    """The user turn for one entry of the book's instruction data (instruction + optional input)."""
    return f"{instruction}\n\n### Input:\n{input_text}" if input_text else instruction
