"""The small interface a model family implements to be trained by the one trainer loop."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn as nn


class Task(Protocol):
    """A model family (language modelling, diffusion, ...) as the trainer sees it.

    Batches are a pure function of (step, micro-batch index, rank), so resuming at a step needs no
    saved data iterator. `loss` returns the loss to back-propagate and named scalar metrics (the
    trainer averages them over micro-batches, ranks and the log interval).
    """

    model: nn.Module

    def train_batch(self, step: int, micro_batch: int) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def tokens_per_step(self) -> int:
        """Tokens (or samples) one optimizer step consumes over all ranks, for throughput."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (the same held-out batches every time), averaged over ranks."""
        ...

    def optimizer_stepped(self) -> None:
        """Called once after each optimizer step, on every rank (state that moves per step, not by gradient)."""
        ...

    def interval_metrics(self) -> dict[str, Any]:
        """Extra metrics gathered since the last call (e.g. routing statistics); may be empty. Called on every rank
        at the same steps; each metric is the global batch's (summed over ranks and micro-batches, not one rank's),
        so every layout of a run logs the same values."""
        ...

    def lr_scales(self) -> dict[str, float]:
        """Parameters (by name) that train at a multiple of the scheduled learning rate; usually none."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values to resume from (e.g. the windows behind windowed metrics): the same on every rank,
        since a run resumed at another world size loads rank 0's."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
