"""Nothing pickled is ever loaded from a file a user did not write: a pickle with code is refused, not run.

Our own formats hold no pickle (safetensors, JSON, GGUF); the two places that read torch's
pickle format (a downloaded ``pytorch_model.bin``, a training state) use ``weights_only=True``.
The first tests plant a file whose unpickling would run code and check it is refused with a
clear error and the code never ran; the last one reads the sources, so a new ``pickle.load``
or a ``torch.load`` without ``weights_only=True`` fails here before it ships.
Truncated and corrupt files: tests/core/test_checkpoint.py, test_gguf_weights.py.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "training", "app", "scratchgpt", "bench")


class Exploit:
    """Unpickling this calls os.system, which would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "payload": Exploit(marker)}, path)


def test_a_downloaded_pytorch_model_bin_with_code_is_refused(tmp_path):
    from core.weights.hf import HFWeightsError, read_hf_tensors

    marker = tmp_path / "pwned"
    plant(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(HFWeightsError, match=r"pytorch_model\.bin: cannot be read as a plain tensor state dict"):
        read_hf_tensors(tmp_path)
    assert not marker.exists()


def test_a_training_state_with_code_is_refused(tmp_path):
    from training.run_state import RunDirError, load_state

    marker = tmp_path / "pwned"
    plant(tmp_path / "state.pt", marker)
    with pytest.raises(RunDirError, match="cannot be read as a training state"):
        load_state(tmp_path / "state.pt")
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def test_no_source_unpickles_without_weights_only():
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node, owner, name in _calls(tree):
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                keywords = {k.arg: k.value for k in node.keywords}
                if owner in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") and name in ("load", "loads"):
                    offenders.append(f"{where} {owner}.{name}")
                elif owner == "torch" and name == "load":
                    safe = keywords.get("weights_only")
                    if not (isinstance(safe, ast.Constant) and safe.value is True):
                        offenders.append(f"{where} torch.load without weights_only=True")
                elif name == "load" and owner in ("np", "numpy"):
                    allow = keywords.get("allow_pickle")
                    if isinstance(allow, ast.Constant) and allow.value is True:
                        offenders.append(f"{where} numpy load with allow_pickle=True")
    assert offenders == []
