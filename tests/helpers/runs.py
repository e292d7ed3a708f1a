"""Shared pieces of the end-to-end tests: a tiny config writer, the metrics reader, and train.py run in-process."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml


def write_config(tmp_path: Path, data_prefix: str, **overrides) -> Path:
    config = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "pos_emb": "rotary", "moe_router_type": "topk",
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95]}}, "min_lr": 3e-4, "warmup": 0.2,
        "weight_decay": 0.01, "lr_decay_style": "cosine",
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_iters": 8,
        "tokenizer_type": "CharLevelTokenizer", "data_path": data_prefix, "split": "90,10,0",
        "eval_interval": 4, "eval_iters": 2, "log_interval": 1, "checkpoint_factor": 4,
        "save": str(tmp_path / "ckpt"), "load": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "logs"),
        "seed": 7,
    }
    config.update(overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """`python train.py ARGV` in this process: its exit code and what it printed to stderr."""
    import train

    saved = sys.argv
    sys.argv = ["train.py", *argv]
    try:
        with pytest.raises(SystemExit) as stopped:
            train.main()
    finally:
        sys.argv = saved
    return stopped.value.code, capsys.readouterr().err


def assert_one_line(code: int, stderr: str, pattern: str) -> None:
    assert code not in (0, None), stderr
    errors = [line for line in stderr.splitlines() if line.startswith(("config error:", "error:"))]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    assert re.search(pattern, errors[0]), errors[0]


def plain_dit_without_remix_keys(config: dict) -> dict:
    """A DiT config as given, except that a plain DiT (remix_num_basis 0) keeps no Remix keys: they cannot act
    there, and the config rule refuses them."""
    if config.get("remix_num_basis"):
        return config
    return {key: value for key, value in config.items() if not key.startswith("remix_")}
