"""The benchmarks run end to end at toy shapes (their figures are measured by hand, not asserted here)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_remix_overhead_reports_every_ratio(tmp_path):
    plot = tmp_path / "overhead.png"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/remix_overhead.py"), "--depth", "1", "--hidden", "32", "--heads", "2",
         "--image-size", "4", "--batch", "4", "--experts", "4", "2", "--repeats", "1", "--warmup", "0",
         "--sample-steps", "2", "--sample-batch", "2", "--threads", "1", "--plot", str(plot)],
        capture_output=True, text=True, timeout=300, check=True)
    for n in (4, 2):
        step = re.search(rf"Remix K=4 N={n} / plain training step +([0-9.]+)", result.stdout)
        sampling = re.search(rf"Remix K=4 N={n} / plain sampling: runtime mix ([0-9.]+), exported ([0-9.]+)",
                             result.stdout)
        assert step and sampling, result.stdout
        assert float(step.group(1)) > 0 and float(sampling.group(2)) > 0
    assert plot.stat().st_size > 0


@pytest.mark.slow  # about 30 s: a model's export, warm-up and every local task under both
def test_lm_eval_speed_reports_both_models_and_the_training_steps(tmp_path):
    figures = tmp_path / "speed.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/lm_eval_speed.py"), "--configs", "tiny.yml", "--limit", "2",
         "--repeats", "1", "--train-steps", "1", "--threads", "1", "--json", str(figures)],
        capture_output=True, text=True, timeout=600, check=True, env=env)
    recorded = json.loads(figures.read_text())["results"][0]
    assert recorded["total"]["ours_tokens_per_s"] > 0 and recorded["total"]["hflm_tokens_per_s"] > 0
    assert recorded["training"]["evaluation_in_steps"] > 0 and "all four" in result.stdout


@pytest.mark.parametrize("transformers_too", [
    False, pytest.param(True, marks=pytest.mark.slow)],  # about 10 s more: the export and transformers' generate()
    ids=["ours", "with_transformers"])
def test_mla_cache_measures_the_latent_and_rope_key_per_token(tmp_path, transformers_too):
    figures = tmp_path / "mla_cache.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks/mla_cache.py"), "--batch", "2", "--prompt", "4", "--new-tokens", "3",
         "--dtype", "float32", "--json", str(figures), *([] if transformers_too else ["--skip-transformers"])],
        capture_output=True, text=True, timeout=600, check=True)
    recorded = json.loads(figures.read_text())
    tiny = recorded["tiny"]
    shape, ours = tiny["shape"], tiny["ours"]
    latent = (shape["kv_lora_rank"] + shape["qk_rope_head_dim"]) * shape["num_layers"] * 4  # fp32 numbers
    heads = shape["num_attention_heads"] * (shape["qk_nope_head_dim"] + shape["qk_rope_head_dim"] + shape["v_head_dim"])
    assert ours["tokens_held"] == 2 * (4 + 3 - 1)  # the last drawn token is never run
    assert ours["mla_bytes_per_token"] == latent and ours["full_kv_bytes_per_token"] == heads * shape["num_layers"] * 4
    if transformers_too:
        assert tiny["transformers"]["mla_bytes_per_token"] == latent
    else:
        assert tiny["transformers"] is None
