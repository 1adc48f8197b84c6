"""training/run_state.py's files go through core's atomic writer: old or new, never half, no debris."""

from __future__ import annotations

import json

import pytest
import torch

from training.run_state import STATE_VERSION, load_state, save_state, truncate_metrics


def test_save_state_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "training_state.pt"
    save_state(path, {"version": STATE_VERSION, "step": 3, "w": torch.arange(4)})
    state = load_state(path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_state.pt"]


def test_a_failed_save_keeps_the_previous_state(tmp_path):
    path = tmp_path / "training_state.pt"
    save_state(path, {"version": STATE_VERSION, "step": 1})
    with pytest.raises(Exception):
        save_state(path, {"version": STATE_VERSION, "step": 2, "bad": lambda: None})  # a lambda cannot be pickled
    assert load_state(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_state.pt"]


def test_truncate_metrics_rewrites_the_file_in_place(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "cut')
    truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
