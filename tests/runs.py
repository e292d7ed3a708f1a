"""Shared pieces of the end-to-end tests: a tiny config writer and the metrics reader."""

from __future__ import annotations

import json
from pathlib import Path

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
