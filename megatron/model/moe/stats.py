"""Routing statistics for logging: how evenly experts, and LoREs within experts, share the tokens.

Shape legend: E experts, M LoREs per expert.
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
    p = load.float() / load.float().sum(dim=-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
    return entropy / math.log(n)


def routing_stats(aux_list: list) -> dict[str, Any]:
    """Per MoE layer: expert load and its entropy; LoRE load [E][M] and its mean entropy within experts.

    Each load table comes to the host once (one copy, one sync on a GPU), not element by element."""
    stats: dict[str, Any] = {}
    for i, aux in enumerate(aux_list):
        expert_load_E = aux.expert_load_E.detach().cpu()
        stats[f"moe/layer{i}/expert_load_entropy"] = float(normalized_entropy(expert_load_E))
        stats[f"moe/layer{i}/expert_load"] = [round(v, 5) for v in expert_load_E.tolist()]
        for key, value in aux.dispatch_stats.items():  # e.g. exchange_bytes_sent, dropped_fraction
            stats[f"moe/layer{i}/{key}"] = float(value)
        if aux.lore_load_EM is not None and aux.lore_load_EM.shape[-1] > 1:
            lore_load_EM = aux.lore_load_EM.detach().cpu()
            stats[f"moe/layer{i}/lore_load"] = [[round(v, 4) for v in row] for row in lore_load_EM.tolist()]
            used = lore_load_EM.sum(dim=-1) > 0  # experts that received tokens
            if used.any():
                stats[f"moe/layer{i}/lore_load_entropy"] = float(normalized_entropy(lore_load_EM[used]).mean())
    return stats
