"""Chat templates: how a conversation becomes one prompt string.

A template is data stored in each checkpoint (``config.json``), so every
caller (the CLI chat, the fine-tuning jobs, the web service) renders any
conversation for any model the same way. Templates are Jinja2, the format
Hugging Face and GGUF files use; they are rendered in Jinja's sandbox because
a template read from a downloaded file is untrusted input.
"""

from __future__ import annotations

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

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "template": self.template, "stop": list(self.stop), "default_system": self.default_system}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChatTemplate":
        return cls(data["name"], data["template"], list(data.get("stop", [])), data.get("default_system"))


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
