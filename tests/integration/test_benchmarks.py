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
