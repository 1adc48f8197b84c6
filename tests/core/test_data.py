import numpy as np
import pytest
import torch

from core.data import DataError, SlidingWindowDataset, TokenFile, TokenFileDataset, create_dataloader, write_token_file


def test_windows_and_shifted_targets_as_in_the_book():
    ds = SlidingWindowDataset(list(range(10)), max_length=4, stride=2)
    assert len(ds) == 3
    x, y = ds[1]
    assert x.tolist() == [2, 3, 4, 5] and y.tolist() == [3, 4, 5, 6]


def test_dataloader_batches():
    loader = create_dataloader(list(range(100)), batch_size=4, max_length=8, stride=8, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])


def test_too_short_data_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one window"):
        SlidingWindowDataset([1, 2, 3], max_length=4, stride=1)


def test_token_file_round_trip(tmp_path):
    ids = np.arange(1000) % 50257
    path = write_token_file(tmp_path / "train.bin", ids, {"tokenizer": "gpt2"})
    tf = TokenFile(path)
    assert len(tf) == 1000 and tf.header["tokenizer"] == "gpt2"
    ds = TokenFileDataset(tf, max_length=16, stride=16)
    x, y = ds[2]
    assert x.tolist() == list(range(32, 48)) and y.tolist() == list(range(33, 49))


def test_truncated_token_file_is_detected(tmp_path):
    path = write_token_file(tmp_path / "t.bin", np.arange(100), {})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match="header promises"):
        TokenFile(path)
