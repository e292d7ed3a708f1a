"""Plain-loop references the kernel tests compare against."""

from __future__ import annotations

import torch


def per_group_reference(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Row block g of x (counts[g] rows, in order) times w[g], one matmul per group."""
    blocks, start = [], 0
    for g, n in enumerate(counts):
        blocks.append(x[start:start + n] @ w[g])
        start += n
    return torch.cat(blocks)
