"""Runs at other layouts against one rank: the parameters a run saved last, loaded into a one-rank model, and
the tolerance they must match within; and the MoE and step settings those comparisons share."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron.config import load_config
from megatron.parallel import DistInfo
from megatron.training import checkpoint as ckpt
from megatron.training.lm_task import LMTask
from megatron.training.optim import build_optimizer

ONE_RANK = DistInfo(0, 1, 0, torch.device("cpu"))
LORE = {"lore_num_experts": 4, "lore_rank": 4, "lore_loss_coeff": 0.01}  # the LoRE loss in the gradients too
STRUCT_L1 = {"moe_num_experts": 4, "moe_top_k": 1, "lore_top_k": 1, **LORE}
LR = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "min_lr": 1e-4}
STEPS = {"train_iters": 4, "checkpoint_factor": 100, "eval_interval": 0, **LR}


def final_parameters(config: Path) -> dict[str, torch.Tensor]:
    """The parameters a run saved last, loaded into a one-rank model (whatever layout wrote them)."""
    args = load_config([str(config)], ["--moe_expert_parallel_size", "1", "--zero_stage", "0"])
    task = LMTask(args, ONE_RANK)
    optimizer = build_optimizer(task.model, 1e-3, (0.9, 0.95), 1e-8, 0.0, torch.device("cpu"))
    ckpt.load_checkpoint(ckpt.resolve_checkpoint(args.save), task.model, optimizer, ONE_RANK)
    return {name: value.clone() for name, value in task.model.state_dict().items()}


def assert_same_parameters(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every parameter within 1e-5 of the one-rank run's.

    The runs use lr 1e-3: ranks sum gradients in another order, and AdamW divides each gradient by its
    own RMS, so the rounding of a gradient that nearly cancels (an expert with few rows) reaches the
    update at the scale of the learning rate (seen at lr 3e-3: 1 element of 20480 off by 1.2e-5).
    """
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
