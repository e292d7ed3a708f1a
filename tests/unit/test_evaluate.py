"""tools/evaluate.py against a hand loop over the same windows, read straight from the .bin file."""

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.hf_models import REPO, saved_model

sys.path.insert(0, str(REPO / "tools"))
import evaluate  # noqa: E402


def hand_loss(model, prefix: str, seq_length: int, windows: int) -> float:
    """Window by window, one at a time: the mean of per-window mean losses (all windows are equally long)."""
    stream = np.fromfile(f"{prefix}.bin", dtype=np.uint16).astype(np.int64)
    losses = []
    with torch.no_grad():
        for j in range(windows):
            window = torch.from_numpy(stream[j * seq_length:(j + 1) * seq_length + 1])[None]
            losses.append(float(F.cross_entropy(model(window[:, :-1])[0][0], window[0, 1:])))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("overrides", [{}, {"moe_num_experts": 4, "moe_top_k": 2}], ids=["dense", "moe"])
def test_loss_equals_a_hand_loop_over_the_same_windows(tmp_path, data_prefix, overrides):
    save, model = saved_model(tmp_path / "run", data_prefix, **overrides)
    result = evaluate.main([str(save), "--data", data_prefix, "--seq-length", "16", "--batches", "2",
                            "--batch-size", "3"])
    assert result["windows"] == 6 and result["tokens"] == 6 * 16
    assert result["loss"] == pytest.approx(hand_loss(model, data_prefix, 16, 6), abs=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))


def test_every_window_when_batches_is_omitted(tmp_path, data_prefix):
    save, model = saved_model(tmp_path / "run", data_prefix, max_position_embeddings=512)
    result = evaluate.main([str(save), "--data", data_prefix, "--seq-length", "512", "--batch-size", "8"])
    total = len(np.fromfile(f"{data_prefix}.bin", dtype=np.uint16))
    assert result["windows"] == (total - 1) // 512 > 8  # more than one batch, the last one short
    assert result["loss"] == pytest.approx(hand_loss(model, data_prefix, 512, result["windows"]), abs=1e-5)


def test_a_window_longer_than_the_model_is_one_error(tmp_path, data_prefix):
    save, _ = saved_model(tmp_path / "run", data_prefix, scramble=False)
    with pytest.raises(SystemExit, match="max_position_embeddings"):
        evaluate.main([str(save), "--data", data_prefix, "--seq-length", "4096"])
