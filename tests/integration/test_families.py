"""The model families users start from, written the way they are described: the published parameter totals of
Llama-3-8B and Mixtral-8x7B, and the tiny Llama- and Mixtral-shaped configs training on the bundled corpus."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import count_params  # noqa: E402

import train  # noqa: E402


@pytest.mark.parametrize("config, total, active", [
    ("families/llama3_8b.yml", 8_030_261_248, 8_030_261_248),  # Meta's model card
    ("families/mixtral_8x7b.yml", 46_702_792_704, 12_879_925_248),  # Mistral AI: 46.7B total, 12.9B active
])
def test_published_totals(config, total, active, capsys):
    count_params.main([str(REPO / "configs" / config)])
    printed = capsys.readouterr().out
    assert any(line.split()[:2] == ["total", f"{total:,}"] for line in printed.splitlines()), printed
    assert any(line.split()[:2] == ["active", f"{active:,}"] for line in printed.splitlines()), printed


@pytest.mark.parametrize("config", ["tiny_llama.yml", "tiny_mixtral.yml", "tiny_qwen3_moe.yml"])
def test_tiny_family_configs_train(config, tmp_path, data_prefix):
    run = str(tmp_path / "run")
    result = train.run([str(REPO / "configs" / config), "--train_iters", "3", "--train_micro_batch_size_per_gpu", "2",
                        "--seq_length", "32", "--eval_interval", "0", "--prepare_data", "null",
                        "--data_path", data_prefix, "--save", run, "--load", run, "--log_dir", f"{run}/logs",
                        "--tensorboard_dir", "null", "--checkpoint_factor", "3"])
    assert result.final_step == 3 and all(math.isfinite(loss) for loss in result.losses)
