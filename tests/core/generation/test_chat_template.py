import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.generation.chat_template import ALPACA, CHATML, ChatTemplate, ChatTemplateError, alpaca_user_content


def test_alpaca_single_turn_is_the_books_prompt():
    entry = {"instruction": "Rewrite the sentence.", "input": "The cake was eaten by me."}
    book = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cake was eaten by me.\n\n### Response:\n"
    )
    messages = [{"role": "user", "content": alpaca_user_content(entry["instruction"], entry["input"])}]
    assert ALPACA.render(messages) == book


def test_alpaca_multi_turn_and_system_prompt():
    text = ALPACA.render([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ])
    assert text == "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.\n\n### Instruction:\nName a colour.\n\n### Response:\n"


def test_chatml_renders_turns_and_generation_prompt():
    text = CHATML.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert not CHATML.render([{"role": "user", "content": "U"}], add_generation_prompt=False).endswith("assistant\n")


def test_templates_round_trip_and_reject_bad_messages():
    assert ChatTemplate.from_dict(ALPACA.to_dict()) == ALPACA
    with pytest.raises(ChatTemplateError, match="role"):
        CHATML.render([{"role": "wizard", "content": "x"}])


def test_templates_run_sandboxed():
    evil = ChatTemplate("evil", "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception):
        evil.render([{"role": "user", "content": "x"}])


TRIMMED = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # how transformers and llama.cpp render


@pytest.mark.parametrize("template", [
    CHATML,
    ALPACA,
    ChatTemplate("indented", "{% for m in messages %}\n  {% if m['role'] == 'user' %}\nUser: {{ m['content'] }}\n"
                 "    {%- else %}\n  Bot:\t{{ m['content'] }}  {# note #}\n{% endif %}\n   {% endfor %}\n"
                 "{%+ if add_generation_prompt +%}\nBot:{% endif %}\n", [], None),
    ChatTemplate("system", "{{ default_system }}|{% if messages %}\n{{ messages[0]['content'] }}{% endif %}\n", [],
                 'Say "hi" in café style.\nThen stop.'),
])
def test_portable_template_renders_the_same_when_blocks_are_trimmed(template):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi\nthere"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "x"}]
    for conversation in (messages, messages[1:2]):
        ours = template.render(conversation)
        portable = template.portable()
        assert TRIMMED.from_string(portable).render(messages=conversation, add_generation_prompt=True) == ours
        assert ChatTemplate("p", portable).render(conversation) == ours
