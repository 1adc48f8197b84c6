"""Instruction data: both formats, errors with lines, template rendering and the collate masks."""

import json

import pytest

from core.generation.chat_template import ALPACA, CHATML
from core.tokenizer.gpt2 import gpt2_tokenizer
from training.instruct_data import (
    IGNORE_INDEX, EncodedExample, InstructDataError, collate, encode_example, read_instruct_file, render_segments,
    split_instruct,
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


def read_entries(directory, entries, template):
    (directory / "x.json").write_text(json.dumps(entries))
    return read_instruct_file(directory / "x.json", template)
