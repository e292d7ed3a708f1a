"""The routing balance state kept between micro-batches and optimizer steps (moe/router.py has the formulas).

Shape legend: E experts, M LoREs per expert.

Two remedies need more than one micro-batch's forward:
- auxiliary-loss-free balancing moves each router's bias after the optimizer step, from the step's loads over
  the global batch (every micro-batch, every rank);
- the global-batch balancing loss counts the loads of the step's earlier micro-batches too.

The layers hand their counts back in `MoEAux.balance` (nothing is kept inside a forward: a checkpointed block
runs its forward twice), and this tracker owns the rest. It writes the routers' `counts_before` buffers only
between micro-batches, before the next forward, so a recomputed forward (activation checkpointing) sees what
the first one saw. The biases are model buffers: checkpointed with the weights, equal on every rank (all
ranks apply the same update to the same all-reduced counts), and independent of the layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from megatron.model.moe import LoREBank, MoEAux, MoELayer


class BalanceTracker:
    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.expert_slots: list[torch.Tensor | None] = [None] * len(self.layers)
        self.lore_slots: list[torch.Tensor | None] = [None] * len(self.layers)
        self.pending: list[MoEAux] = []

    @property
    def active(self) -> bool:
        """Whether any router here has a bias or a global-batch loss (else every call is a no-op)."""
        return any(has_bias(layer.router) or hasattr(layer.router, "counts_before_E") or
                   (layer.lore is not None and (has_bias(layer.lore) or hasattr(layer.lore, "slots_before_EM")))
                   for layer in self.layers)

    def before_forward(self) -> None:
        """Adds the previous micro-batch's global counts to the global-batch losses' running totals."""
        for layer, aux in zip(self.layers, self.pending):
            if aux.balance.global_expert_slots_E is not None:
                layer.router.counts_before_E += aux.balance.global_expert_slots_E
            if aux.balance.global_lore_slots_EM is not None:
                layer.lore.slots_before_EM += aux.balance.global_lore_slots_EM
        self.pending = []

    def record(self, moe_aux: list[MoEAux]) -> None:
        """One micro-batch's counts: summed for the bias update, kept for the next `before_forward`."""
        if not moe_aux or moe_aux[0].balance is None:
            return
        self.pending = list(moe_aux)
        for i, (layer, aux) in enumerate(zip(self.layers, moe_aux)):
            if has_bias(layer.router):
                self.expert_slots[i] = _add(self.expert_slots[i], aux.balance.expert_slots_E)
            if layer.lore is not None and has_bias(layer.lore):
                self.lore_slots[i] = _add(self.lore_slots[i], aux.balance.lore_slots_EM)

    @torch.no_grad()
    def optimizer_stepped(self) -> None:
        """The loss-free bias update from the step's global loads (one all-reduce for every router), and a clean
        slate for the next step's global-batch losses."""
        self.pending = []
        for layer in self.layers:
            if hasattr(layer.router, "counts_before_E"):
                layer.router.counts_before_E.zero_()
            if layer.lore is not None and hasattr(layer.lore, "slots_before_EM"):
                layer.lore.slots_before_EM.zero_()
        tables = []  # (router or LoRE bank, its count table: for LoREs padded to every expert, so a rank adds
        # only its own experts' rows)
        for layer, experts, lores in zip(self.layers, self.expert_slots, self.lore_slots):
            if experts is not None:
                tables.append((layer.router, experts))
            if lores is not None:
                tables.append((layer.lore, layer.lore.to_all_experts(lores)))
        self.expert_slots = [None] * len(self.layers)
        self.lore_slots = [None] * len(self.layers)
        if not tables:
            return
        flat = torch.cat([counts.flatten() for _, counts in tables])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        offset = 0
        for module, counts in tables:
            global_counts = flat[offset:offset + counts.numel()].view_as(counts)
            offset += counts.numel()
            module.update_bias(module.own_rows(global_counts) if isinstance(module, LoREBank) else global_counts)


def has_bias(module: nn.Module) -> bool:
    return hasattr(module, "expert_bias_E") or hasattr(module, "lore_bias_EM")


def _add(total: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
    return counts.clone() if total is None else total + counts


def bias_spreads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per MoE layer, how far the biases have spread (max - min; for LoREs the mean over the experts), each as a
    [sum of spreads, rows] pair: summed over ranks it is the mean over every expert, whichever rank holds it
    (with expert parallelism a rank holds only its experts' LoRE biases; replicas count each row equally often)."""
    pairs = {}
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, MoELayer)):
        if hasattr(layer.router, "expert_bias_E"):
            bias_E = layer.router.expert_bias_E.double()
            pairs[f"moe/layer{i}/expert_bias_spread"] = torch.stack([bias_E.max() - bias_E.min(), bias_E.new_ones(())])
        if layer.lore is not None and hasattr(layer.lore, "lore_bias_EM"):
            bias_EM = layer.lore.lore_bias_EM.double()
            spread_E = bias_EM.max(-1).values - bias_EM.min(-1).values
            pairs[f"moe/layer{i}/lore_bias_spread"] = torch.stack([spread_E.sum(), bias_EM.new_tensor(len(spread_E))])
    return pairs
