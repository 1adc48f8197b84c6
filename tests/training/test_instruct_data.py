"""Instruction data: both formats, errors with lines, template rendering and the collate masks."""

import json

import pytest

from core.generation.chat_template import ALPACA, CHATML
from core.tokenizer.gpt2 import gpt2_tokenizer
from training.instruct_data import (
    IGNORE_INDEX, EncodedExample, InstructDataError, chain_conversations, collate, encode_example, read_instruct_file,
    render_segments, split_instruct, task_key,
)

BOOK = [
    {"instruction": "Convert to passive voice.", "input": "The cat chased the mouse.", "output": "The mouse was chased by the cat."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
]
CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]}


def test_collate_pads_with_eot_and_keeps_only_the_first_as_target():
    batch = [EncodedExample([1, 2, 3, 4, 5]), EncodedExample([6, 7])]
    inputs, targets = collate(batch, pad_id=50256)
    # The book's worked example (section 7.3): inputs padded with 50256, targets
    # shifted by one with the first 50256 kept and the rest -100.
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, 50256, 50256, 50256]]
    assert targets.tolist() == [[2, 3, 4, 5, 50256], [7, 50256, -100, -100, -100]]


def test_collate_masks_by_position_not_by_value():
    # The end-of-text id inside the text (ChatML's <|im_end|> can be the eos id)
    # is a real target; only padding beyond the first is ignored.
    batch = [EncodedExample([1, 9, 2], [False, True, True]), EncodedExample([3])]
    inputs, targets = collate(batch, pad_id=9)
    assert targets.tolist() == [[9, 2, 9], [9, -100, -100]]


def test_collate_prompt_masking_and_truncation():
    example = EncodedExample([10, 11, 12, 20, 21], [False, False, False, True, True])
    _, targets = collate([example], pad_id=0, mask_prompt=True)
    # Targets are the next tokens; those that are prompt tokens (11, 12) are masked.
    assert targets.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 20, 21, 0]]
    inputs, targets = collate([example], pad_id=0, max_length=3)
    assert inputs.tolist() == [[10, 11, 12]] and targets.tolist() == [[11, 12, 20]]


def test_reads_book_and_conversation_formats(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(BOOK + [CHAT], indent=1))
    examples = read_instruct_file(path, ALPACA)
    assert examples[0].messages[0]["content"] == "Convert to passive voice.\n\n### Input:\nThe cat chased the mouse."
    assert examples[1].messages[0]["content"] == "Name a primary color."
    assert examples[2].reference == "4" and len(examples[2].prompt_messages) == 4
    assert [e.line for e in examples] == [2, 7, 12]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in BOOK) + "\n")
    assert [e.line for e in read_instruct_file(jsonl, CHATML)] == [1, 2]
    assert read_instruct_file(jsonl, CHATML)[0].messages[0]["content"] == "Convert to passive voice.\n\nThe cat chased the mouse."


@pytest.mark.parametrize("entry, message", [
    ({"instruction": "x"}, r'"output" must be a string'),
    ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "message 0 needs a role"),
    ({"prompt": "x"}, "expected"),
])
def test_bad_entry_names_file_and_line(tmp_path, entry, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(BOOK, indent=1)[:-2] + ",\n " + json.dumps(entry) + "\n]")
    with pytest.raises(InstructDataError, match=rf"bad.json, line 12 \(entry 2\): .*{message}"):
        read_instruct_file(path, ALPACA)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(InstructDataError, match="broken.json, line 3: invalid JSON"):
        read_instruct_file(path, ALPACA)


def test_split_sizes_and_empty_split(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(BOOK * 50))
    examples = read_instruct_file(path, ALPACA)
    splits = split_instruct(examples)
    assert (len(splits.train), len(splits.test), len(splits.val)) == (85, 10, 5)
    with pytest.raises(InstructDataError, match="3 entries leave the test split empty"):
        split_instruct(examples[:3], source="d.json")


def test_alpaca_rendering_matches_the_book(tmp_path):
    messages = read_entries(tmp_path, BOOK[:1], ALPACA)[0].messages
    pieces = render_segments(messages, ALPACA)
    prompt, response = pieces[0][0], pieces[1][0]
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nConvert to passive voice.\n\n### Input:\nThe cat chased the mouse.\n\n### Response:\n"
    )
    assert response == "The mouse was chased by the cat." and pieces[1][1] is True


def test_multi_turn_trains_every_assistant_turn(tmp_path):
    tok = gpt2_tokenizer()
    messages = read_entries(tmp_path, [CHAT], CHATML)[0].messages
    encoded = encode_example(messages, CHATML, tok)
    text = CHATML.render(messages, add_generation_prompt=False)
    assert tok.decode(encoded.ids) == text
    trained = tok.decode([t for t, keep in zip(encoded.ids, encoded.trainable) if keep])
    assert trained == "Hello!<|im_end|>\n4<|im_end|>\n"


SAME_TASK = [
    {"instruction": "What is the opposite of 'hot'?", "input": "", "output": "The opposite of 'hot' is 'cold'."},
    {"instruction": "What is the opposite of 'up'?", "input": "", "output": "The opposite of 'up' is 'down'."},
    {"instruction": "Convert to passive voice.", "input": "Tom ate it.", "output": "It was eaten by Tom."},
    {"instruction": "Convert to passive voice.", "input": "Ann saw us.", "output": "We were seen by Ann."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
]


def test_chained_conversations_make_later_turns_need_the_earlier_ones(tmp_path):
    examples = read_entries(tmp_path, SAME_TASK + [CHAT], CHATML)
    assert task_key("What is the opposite of 'hot'?") == task_key("What is the opposite of 'up'?") != task_key("Name it.")
    chained = chain_conversations(examples, 2, CHATML, seed=1)
    # Five book entries in pairs, the odd one alone; the conversation entry passes through as it was.
    assert sorted(len(e.messages) for e in chained) == [2, 4, 4, 5]
    assert any(e.messages is examples[-1].messages or e.messages == examples[-1].messages for e in chained)
    by_first = {e.messages[0]["content"]: e.messages for e in chained if len(e.messages) == 4}
    opposite = by_first.get("What is the opposite of 'hot'?") or by_first["What is the opposite of 'up'?"]
    passive = next(m for first, m in by_first.items() if first.startswith("Convert to passive voice."))
    # The same task asked again is asked elliptically: only the earlier turn says what to do.
    assert "opposite" not in opposite[2]["content"] and ("'up'" in opposite[2]["content"] or "'hot'" in opposite[2]["content"])
    assert "passive" not in passive[2]["content"] and passive[2]["content"].endswith(("Tom ate it.", "Ann saw us."))
    assert [m["role"] for m in opposite] == ["user", "assistant", "user", "assistant"]
    # Every entry is used exactly once, answers unchanged.
    answers = sorted(m["content"] for e in chained for m in e.messages if m["role"] == "assistant")
    assert answers == sorted([e["output"] for e in SAME_TASK] + ["Hello!", "4"])
    assert chain_conversations(examples, 1, CHATML) == examples
    with pytest.raises(InstructDataError, match="turns must be >= 1"):
        chain_conversations(examples, 0, CHATML)


def test_chained_conversations_train_every_answer_and_no_question(tmp_path):
    tok = gpt2_tokenizer()
    chained = chain_conversations(read_entries(tmp_path, SAME_TASK[:2], CHATML), 2, CHATML)
    encoded = encode_example(chained[0].messages, CHATML, tok)
    _, targets = collate([encoded], tok.eos_id, mask_prompt=True)
    trained = tok.decode([t for t in targets[0].tolist() if t != IGNORE_INDEX])
    first, second = (m["content"] for m in chained[0].messages if m["role"] == "assistant")
    # The loss sees both answers (each with its end-of-turn marker) and the end-of-text, nothing of the questions.
    assert trained == f"{first}<|im_end|>\n{second}<|im_end|>\n<|endoftext|>"


def read_entries(directory, entries, template):
    (directory / "x.json").write_text(json.dumps(entries))
    return read_instruct_file(directory / "x.json", template)
