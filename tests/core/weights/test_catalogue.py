"""core.weights.catalogue: the names scratchgpt knows, their aliases and sizes."""

from __future__ import annotations

import pytest

from core.weights.catalogue import DATASETS, MODELS, CatalogueError, resolve_dataset, resolve_model_name


def test_registry_names():
    assert resolve_model_name("gpt2", size="355M").name == "gpt2-355m"
    assert resolve_model_name("gpt2-xl").name == "gpt2-1558m"
    assert resolve_model_name("SmolLM2").name == "smollm2-135m-instruct"
    assert {"gpt2-124m", "gpt2-355m", "gpt2-774m", "gpt2-1558m", "smollm2-135m-instruct"} <= set(MODELS)
    assert {"sms-spam", "instruction-data"} <= set(DATASETS)
    for source in MODELS.values():
        assert all(f.url.startswith("https://") for f in source.files)
    with pytest.raises(CatalogueError, match="unknown model"):
        resolve_model_name("gpt5")


def test_datasets_by_name():
    assert resolve_dataset("sms-spam").filename == "sms_spam_collection.zip"
    with pytest.raises(CatalogueError, match="unknown dataset 'imdb'; known datasets: sms-spam, instruction-data"):
        resolve_dataset("imdb")
