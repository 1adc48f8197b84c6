"""core.weights.download: a known model's name to our checkpoint (catalogue, fetch, convert), and
OpenAI's TensorFlow release through --from-tf-dir. No test here touches the internet."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from core.weights import download
from core.weights.checkpoint import load_checkpoint
from core.weights.convert import convert_to_checkpoint
from core.weights.download import download_model
from core.weights.fetch import DownloadError
from core.weights.openai_tf import OpenAIWeightsError, TensorFlowRequiredError

HPARAMS_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}


@pytest.mark.slow
def test_download_smollm2_ends_in_a_checkpoint(smollm2_gguf, tmp_path, monkeypatch):
    """download_model = fetch (here: the cached GGUF) + convert to models/<name>/; a second call reuses it."""
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / smollm2_gguf.name).symlink_to(smollm2_gguf)
    out = download_model("smollm2-135m-instruct")
    assert out == tmp_path / "models" / "smollm2-135m-instruct"
    # The second call neither fetches nor converts, and leaves every file as it was.
    files = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    calls = []
    for name in ("fetch_model", "convert_to_checkpoint"):
        real = getattr(download, name)
        monkeypatch.setattr(download, name, lambda *a, _name=name, _real=real, **kw: calls.append(_name) or _real(*a, **kw))
    assert download_model("smollm2") == out and calls == []
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == files
    # The two-step form (fetch, then convert) lands in the same place.
    assert convert_to_checkpoint(out, "smollm2-135m-instruct") == out
    ckpt = load_checkpoint(out)
    prompt = ckpt.chat_template.render([{"role": "user", "content": "What is the capital of France?"}])
    ids = ckpt.tokenizer.encode(prompt, allowed_special="all")
    assert ids[:3] == [1, 9690, 198] and len(ids) == 37
    assert ckpt.chat_template.stop == ["<|im_end|>"]
    with torch.no_grad():
        assert int(ckpt.model(torch.tensor([ids]))[0, -1].argmax()) == 504  # "The"


@pytest.fixture
def tf_dir(tmp_path, monkeypatch):
    """A folder laid out as OpenAI's GPT-2 124M release (hparams.json; the model.ckpt.* files are never read)."""
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path / "home"))
    folder = tmp_path / "124M"
    folder.mkdir()
    (folder / "hparams.json").write_text(json.dumps(HPARAMS_124M))
    return folder


def test_from_tf_dir_checks_the_folder_before_reading_it(tf_dir, tmp_path):
    with pytest.raises(DownloadError, match="smollm2-135m-instruct is not GPT-2"):
        download_model("smollm2", from_tf_dir=tf_dir)
    with pytest.raises(DownloadError, match="--from-tf-dir .*nope: no such directory"):
        download_model("gpt2", from_tf_dir=tmp_path / "nope")
    with pytest.raises(DownloadError, match="only one of --from-dir, --from-file and --from-tf-dir"):
        download_model("gpt2", from_dir=tf_dir, from_tf_dir=tf_dir)
    with pytest.raises(DownloadError, match="hparams.json describes 12 layers, width 768.*gpt2-355m has 24 layers"):
        download_model("gpt2", size="355M", from_tf_dir=tf_dir)
    (tf_dir / "hparams.json").write_text("[12, 768]")
    with pytest.raises(OpenAIWeightsError, match="hparams.json: not the JSON object OpenAI's release holds"):
        download_model("gpt2", from_tf_dir=tf_dir)
    (tf_dir / "config.json").write_text("{}")
    with pytest.raises(DownloadError, match="a Hugging Face folder with config.json goes to --from-dir"):
        download_model("gpt2", from_tf_dir=tf_dir)
    assert not (tmp_path / "home" / "models").exists()


def test_from_tf_dir_without_tensorflow_names_the_flag_and_the_extra(tf_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as on a machine without the optional extra
    with pytest.raises(TensorFlowRequiredError) as err:
        download_model("gpt2", size="124M", from_tf_dir=tf_dir)
    assert str(err.value).startswith(f"--from-tf-dir {tf_dir}: ")
    assert "pip install -e '.[tensorflow]'" in str(err.value)
    assert not (tmp_path / "home" / "models").exists()


def test_from_dir_on_a_tf_folder_points_at_from_tf_dir(tf_dir):
    with pytest.raises(DownloadError, match="OpenAI's TensorFlow release, which --from-tf-dir reads"):
        download_model("gpt2", from_dir=tf_dir)
