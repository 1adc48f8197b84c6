"""core.paths: one cache root that follows $SCRATCHGPT_HOME."""

from __future__ import annotations

from pathlib import Path

from core.paths import cache_dir, downloads_dir, models_dir


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home"
    assert downloads_dir() == tmp_path / "home" / "downloads"
    assert models_dir() == tmp_path / "home" / "models"
    monkeypatch.delenv("SCRATCHGPT_HOME")
    assert cache_dir() == Path.home() / ".cache" / "scratchgpt"
