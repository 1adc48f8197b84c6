"""Prompt building with the real GPT-2 tokenizer and Alpaca template: context fitting and special tokens."""

from __future__ import annotations

import pytest

from app.services.prompts import MIN_ANSWER_TOKENS, PromptTooLong, encode_prompt, generation_config, plan_prompt


@pytest.fixture(scope="module")
def short_ckpt(short_chat_checkpoint):
    from core.weights.checkpoint import load_checkpoint

    return load_checkpoint(short_chat_checkpoint)


def turns(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"question {i} about apples"},
                {"role": "assistant", "content": f"answer {i} about pears"}]
    return out + [{"role": "user", "content": "final question"}]


def test_short_conversation_is_kept_whole(short_ckpt):
    plan = plan_prompt(short_ckpt, "Be brief.", turns(0), max_new_tokens=16)
    assert plan.dropped_messages == 0 and plan.max_new_tokens == 16
    text = short_ckpt.tokenizer.decode(plan.prompt_ids)
    assert text.startswith("Be brief.") and "final question" in text
    assert text.endswith("### Response:\n")


def test_oldest_turns_go_first_and_the_system_prompt_stays(short_ckpt):
    history = turns(6)
    plan = plan_prompt(short_ckpt, "SYSTEM RULES", history, max_new_tokens=16)
    assert plan.dropped_messages > 0 and plan.dropped_messages % 2 == 0  # whole turns, cut at a user message
    assert len(plan.prompt_ids) + plan.max_new_tokens <= short_ckpt.config.context_length
    text = short_ckpt.tokenizer.decode(plan.prompt_ids)
    assert text.startswith("SYSTEM RULES")
    assert "final question" in text
    assert "question 0 " not in text  # the oldest went first
    # The cut is the earliest that fits: keeping one more turn would not fit.
    longer = encode_prompt(short_ckpt, [{"role": "system", "content": "SYSTEM RULES"}, *history[plan.dropped_messages - 2:]])
    assert len(longer) + 16 > short_ckpt.config.context_length


def test_answer_budget_shrinks_when_only_the_last_message_is_left(short_ckpt):
    message = [{"role": "user", "content": "word " * 30}]
    plan = plan_prompt(short_ckpt, "", message, max_new_tokens=90)
    assert MIN_ANSWER_TOKENS <= plan.max_new_tokens < 90
    assert len(plan.prompt_ids) + plan.max_new_tokens == short_ckpt.config.context_length


def test_message_longer_than_the_window_is_refused(short_ckpt):
    with pytest.raises(PromptTooLong, match="context"):
        plan_prompt(short_ckpt, "", [{"role": "user", "content": "word " * 200}], max_new_tokens=16)
    with pytest.raises(PromptTooLong):
        plan_prompt(short_ckpt, "", [{"role": "user", "content": "word " * 200}], max_new_tokens=16, allow_drop=False)


def test_special_tokens_typed_by_a_user_stay_text(short_ckpt):
    eot = short_ckpt.tokenizer.eos_id
    ids = encode_prompt(short_ckpt, [{"role": "user", "content": "hi <|endoftext|> there"}])
    assert eot not in ids
    assert "endoftext" in short_ckpt.tokenizer.decode(ids)


def test_generation_config_stops_on_eos_and_template_stops(short_ckpt):
    config = generation_config(short_ckpt, temperature=0.0, top_k=None, top_p=1.0, max_new_tokens=5, extra_stop=["END"])
    assert short_ckpt.tokenizer.eos_id in config.stop_token_ids
    assert "\n\n### Instruction:" in config.stop_strings and "END" in config.stop_strings
    assert config.top_p is None  # top_p = 1 is no filter
