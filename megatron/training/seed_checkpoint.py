"""A step-0 checkpoint from a model built outside training (converted, upcycled), for `train.py --load`.

It is what the trainer itself writes (checkpoint.py's layout, DCP tensors, config.yml), with an
optimizer built as the trainer builds it (the same parameter groups, no state yet), so a run resumes
from it at step 0 with the schedule's warmup and fresh AdamW moments.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from megatron.config import NeoXArgs
from megatron.parallel import DistInfo
from megatron.training import checkpoint as ckpt
from megatron.training.optim import build_optimizer
from megatron.training.trainer import capture_rng_state


def write_step0_checkpoint(args: NeoXArgs, model: nn.Module, save_dir: str | Path) -> Path:
    """SAVE/global_step0 + SAVE/latest holding `model`'s weights and `args` as config.yml."""
    cpu = torch.device("cpu")
    opt = args.optimizer.params
    optimizer = build_optimizer(model, opt.lr, tuple(opt.betas), opt.eps, args.weight_decay, cpu)
    state = {"step": 0, "task": {}, "rng": capture_rng_state(), "nonfinite_total": 0}
    return ckpt.save_checkpoint(save_dir, 0, model, optimizer, state, args.to_yaml(), DistInfo(0, 1, 0, cpu))
