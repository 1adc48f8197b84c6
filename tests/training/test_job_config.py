"""training.job_config: files, overrides, unknown keys and type checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from training.job_config import JobConfigError, config_to_dict, field_help, load_job_config
from training.plots import plot_curves


@dataclass
class ToyConfig:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "optimizer steps"})
    out: Path | None = field(default=None, metadata={"help": "output directory"})
    precision: str = field(default="fp32", metadata={"help": "numeric precision", "choices": ("fp32", "bf16")})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    prompts: list[str] = field(default_factory=list, metadata={"help": "sample prompts"})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    # YAML 1.1 reads 4e-4 (no dot) as a string; the loader must still make it a float.
    path.write_text("lr: 4e-4\nsteps: 3\nout: runs/x\ncompile: true\nprompts: [a, b]\n")
    cfg = load_job_config(ToyConfig, path, {"steps": 7, "precision": None})
    assert cfg.lr == pytest.approx(4e-4) and isinstance(cfg.lr, float)
    assert cfg.steps == 7  # the override wins; None means "not given"
    assert cfg.out == Path("runs/x") and cfg.compile is True and cfg.prompts == ["a", "b"]
    assert cfg.precision == "fp32"


def test_toml_and_dashed_keys(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('lr = 0.5\nprecision = "bf16"\n')
    cfg = load_job_config(ToyConfig, path, {"steps": "12"})
    assert (cfg.lr, cfg.precision, cfg.steps) == (0.5, "bf16", 12)


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 0.1\nlearning_rat: 3\n")
    with pytest.raises(JobConfigError, match=r"learning_rat.*") as info:
        load_job_config(ToyConfig, path, {})
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps": "many"}, "expected an integer"),
        ({"steps": 2.5}, "expected an integer"),
        ({"lr": True}, "expected a number"),
        ({"precision": "fp8"}, "not one of"),
        ({"compile": "maybe"}, "true or false"),
        ({"steps": 0}, "steps must be >= 1"),
    ],
)
def test_bad_values(overrides: dict, message: str) -> None:
    with pytest.raises(JobConfigError, match=message):
        load_job_config(ToyConfig, None, overrides)


def test_unparsable_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1, 2\n")
    with pytest.raises(JobConfigError, match="cannot be parsed"):
        load_job_config(ToyConfig, broken, {})
    with pytest.raises(JobConfigError, match="does not exist"):
        load_job_config(ToyConfig, tmp_path / "nope.toml", {})
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(JobConfigError, match="mapping"):
        load_job_config(ToyConfig, listing, {})


def test_help_and_dict() -> None:
    assert field_help(ToyConfig)["lr"] == "learning rate"
    d = config_to_dict(ToyConfig(out=Path("/tmp/x")))
    assert d["out"] == "/tmp/x" and d["steps"] == 10


def test_plot_curves_writes_png(tmp_path: Path) -> None:
    out = plot_curves(tmp_path / "sub" / "loss.png", {"train": ([0, 1, 2], [3.0, 2.0, 1.5]), "val": ([2], [2.5])}, "tokens", "loss", "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="2 x values"):
        plot_curves(tmp_path / "x.png", {"a": ([0, 1], [1.0])}, "x", "y")
