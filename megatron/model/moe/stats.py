"""Routing statistics for logging: how evenly experts, and LoREs within experts, share the tokens.

Shape legend: E experts, M LoREs per expert.

Everything here is computed from counts summed over the global batch (every micro-batch of the log interval, every
rank), never averaged from per-rank shares or entropies: the entropy of a sum is not the mean of the entropies, and
one rank with expert parallelism sees only its experts' rows. So a run logs the same statistics at any layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# exchange statistics a log interval reports as their maximum over its steps and the ranks, not their mean:
# a rank that received 4x its share at one step needed the memory at that step
PEAK_STATS = frozenset({"max_rank_rows_over_mean"})


def normalized_entropy(load: torch.Tensor) -> torch.Tensor:
    """Entropy of a load distribution over its last dim divided by log(n): 1 is perfectly balanced."""
    n = load.shape[-1]
    if n < 2:
        return torch.ones(load.shape[:-1])
    load = load if load.is_floating_point() else load.float()
    p = load / load.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
    return entropy / math.log(n)


def routing_stats(expert_slots: list[torch.Tensor], lore_slots: list[torch.Tensor | None]) -> dict[str, Any]:
    """Per MoE layer, from its global counts: the expert load (shares) and its entropy; the LoRE load [E][M]
    (each expert's row of shares) and its mean entropy over the experts that got rows.

    expert_slots[i]: layer i's token slots per expert [E]; lore_slots[i]: its slots per (expert, LoRE) [E, M],
    or None (no routed LoREs). Each table comes to the host once (one copy, one sync on a GPU)."""
    stats: dict[str, Any] = {}
    for i, (slots_E, lore_EM) in enumerate(zip(expert_slots, lore_slots)):
        slots_E = slots_E.detach().double().cpu()
        share_E = slots_E / slots_E.sum().clamp_min(1)
        stats[f"moe/layer{i}/expert_load_entropy"] = float(normalized_entropy(slots_E))
        stats[f"moe/layer{i}/expert_load"] = [round(v, 5) for v in share_E.tolist()]
        if lore_EM is not None and lore_EM.shape[-1] > 1:
            lore_EM = lore_EM.detach().double().cpu()
            share_EM = lore_EM / lore_EM.sum(dim=-1, keepdim=True).clamp_min(1)  # an expert with no rows: zeros
            stats[f"moe/layer{i}/lore_load"] = [[round(v, 4) for v in row] for row in share_EM.tolist()]
            used = lore_EM.sum(dim=-1) > 0  # experts that received tokens
            if used.any():
                stats[f"moe/layer{i}/lore_load_entropy"] = float(normalized_entropy(lore_EM[used]).mean())
    return stats
