"""A pretraining run directory and the state that lets it resume exactly.

    RUN_DIR/
      run.json                      the job config and a format marker
      metrics.jsonl                 one JSON object per step, eval and sample
      loss.png                      train and validation loss against tokens seen
      checkpoints/step-000500/      core checkpoint format (model.safetensors, config.json)
                  training_state.pt optimizer, schedule, step, data position, RNG states

A checkpoint counts only once its ``training_state.pt`` exists. Both parts are
written atomically (temporary name, fsync, rename), the state after the
weights, and old checkpoints are pruned only after the new one is complete, so
a run killed at any moment leaves the previous checkpoint usable.

The state file is a ``torch.save`` of tensors, numbers, strings, lists and
dicts only, and it is read back with ``torch.load(weights_only=True)``: a run
directory from elsewhere cannot run code when resumed. RNG states are stored
as tensors for that reason.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.weights.checkpoint import atomic_file, atomic_write_bytes

RUN_FORMAT = "scratchgpt-pretrain-run"
STATE_FILE = "training_state.pt"
STATE_VERSION = 1
CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
# Test hook: "STEP:SECONDS" sleeps inside the save of that step's checkpoint,
# after the weights and a temporary state file are written and before the
# state file is renamed into place, so a test can SIGKILL the job mid-save.
SAVE_PAUSE_ENV = "SCRATCHGPT_TEST_PAUSE_IN_SAVE"


class RunDirError(ValueError):
    """A run directory that cannot be created or resumed (exists, not a run, no complete checkpoint)."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def write_run_json(run_dir: Path, config: dict[str, Any], extra: dict[str, Any]) -> None:
    data = {"format": RUN_FORMAT, "version": 1, "config": config, **extra}
    atomic_write_bytes(run_dir / "run.json", json.dumps(data, indent=2).encode())


def read_run_json(run_dir: Path) -> dict[str, Any]:
    """The run's saved config; RunDirError when ``run_dir`` is not a pretraining run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"--resume {run_dir}: no such directory")
    marker = run_dir / "run.json"
    if not marker.is_file():
        raise RunDirError(f"--resume {run_dir}: not a pretraining run directory (it has no run.json)")
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"--resume {run_dir}: run.json is corrupt ({e})") from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT or not isinstance(data.get("config"), dict):
        raise RunDirError(f"--resume {run_dir}: run.json is not a scratchgpt pretraining run ({RUN_FORMAT!r} marker missing)")
    return data


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (weights, config and training state), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = CHECKPOINT_RE.match(d.name)
        if m and d.is_dir() and all((d / f).is_file() for f in ("config.json", "model.safetensors", STATE_FILE)):
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise RunDirError(
            f"--resume {run_dir}: the run has no complete checkpoint to resume from "
            f"(none under {Path(run_dir) / 'checkpoints'} has {STATE_FILE})"
        )
    return found[-1][1]


def clean_partial_saves(run_dir: Path) -> list[Path]:
    """Remove what a killed save left: temporary dirs and checkpoints without their state file."""
    root = Path(run_dir) / "checkpoints"
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    complete = {p for _, p in list_checkpoints(run_dir)}
    for d in root.iterdir():
        if d.name.startswith(".") or (CHECKPOINT_RE.match(d.name) and d not in complete):
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            removed.append(d)
    return removed


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (keep <= 0 keeps all)."""
    found = list_checkpoints(run_dir)
    if keep <= 0 or len(found) <= keep:
        return []
    doomed = [p for _, p in found[:-keep]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# -- atomic files ----------------------------------------------------------------


def save_state(path: Path, state: dict[str, Any], step: int | None = None) -> None:
    """``torch.save`` to a temporary name, fsync, rename (with the test pause before the rename)."""
    with atomic_file(path) as f:
        torch.save(state, f)
        _maybe_pause(step)


def _maybe_pause(step: int | None) -> None:
    spec = os.environ.get(SAVE_PAUSE_ENV)
    if not spec or step is None:
        return
    at, _, seconds = spec.partition(":")
    if int(at) == step:
        time.sleep(float(seconds or 60))


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state file with ``weights_only=True`` (no pickled code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle with code, wrong format
        raise RunDirError(f"{path} cannot be read as a training state: {e}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise RunDirError(f"{path} is not a version-{STATE_VERSION} scratchgpt training state")
    return state


# -- RNG states as tensors (so weights_only loading accepts them) ------------------


def capture_rng() -> dict[str, Any]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))


# -- metrics ---------------------------------------------------------------------


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step``: a resumed run redoes those steps and logs them again."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
