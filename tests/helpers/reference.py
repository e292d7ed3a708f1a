"""Plain-loop references the kernel and MoE layer tests compare against."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F

from megatron.model.moe import MoELayer


def per_group_reference(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Row block g of x (counts[g] rows, in order) times w[g], one matmul per group."""
    blocks, start = [], 0
    for g, n in enumerate(counts):
        blocks.append(x[start:start + n] @ w[g])
        start += n
    return torch.cat(blocks)


GATE_FNS = {"swiglu": F.silu, "geglu": F.gelu}  # value * fn(gate), the value being the first half


def reference_act(name: str, h: torch.Tensor) -> torch.Tensor:
    if name in GATE_FNS:
        width = h.shape[-1] // 2
        return h[..., :width] * GATE_FNS[name](h[..., width:])
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[name](h)


def reference_routing(layer: MoELayer, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K], expert ids [T, K]) of the softmax top-k router."""
    probs = F.softmax(x_TD @ layer.router.gate.weight.T, dim=-1)
    return torch.topk(probs, layer.router.top_k, dim=-1)


def reference_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float, min_capacity: int) -> int:
    """GPT-NeoX's (DeepSpeed's) capacity, in exact arithmetic: max(ceil(T * K * factor / E), min_capacity)."""
    slots = Fraction(num_tokens * top_k) * Fraction(str(factor)) / num_experts
    return max(math.ceil(slots), min_capacity)


def reference_kept(weights: torch.Tensor, ids: torch.Tensor, num_experts: int, capacity: int,
                   policy: str = "position") -> list[list[bool]]:
    """Per (token, slot), whether its expert serves it: each expert queues its slots in token order (slot order
    within a token), or by gate, highest first and ties in token order ("probs"), and serves the first `capacity`."""
    queues: list[list[tuple[int, int]]] = [[] for _ in range(num_experts)]
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            queues[int(ids[t, k])].append((t, k))
    kept = [[False] * ids.shape[1] for _ in range(ids.shape[0])]
    for queue in queues:
        if policy == "probs":
            queue = sorted(queue, key=lambda tk: -float(weights[tk].detach()))  # stable: ties keep token order
        for t, k in queue[:capacity]:
            kept[t][k] = True
    return kept


def reference_moe(layer: MoELayer, x_TD: torch.Tensor, activation: str = "gelu", routing=None,
                  kept: list[list[bool]] | None = None) -> torch.Tensor:
    """Token by token: route, run each chosen expert's MLP, add its LoRE term, weight, sum; add the shared
    experts' MLP. `routing`: (weights [T, K], expert ids [T, K]) when not the softmax top-k. `kept`: which slots
    their expert serves (token dropping); a slot not kept adds nothing, its expert and LoREs never run."""
    weights, ids = reference_routing(layer, x_TD) if routing is None else routing
    w_up, w_down = layer.experts.w_up_EDF, layer.experts.w_down_EFD
    assert w_up.shape[-1] == (2 if activation in GATE_FNS else 1) * w_down.shape[1]
    lore = layer.lore
    out = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        y = torch.zeros_like(x)
        for k in range(ids.shape[1]):
            if kept is not None and not kept[t][k]:
                continue
            e = int(ids[t, k])
            h = x @ w_up[e]
            extra_out = 0
            if lore is not None:
                if lore.routed:
                    M = lore.lores_per_expert
                    lore_logits = x @ lore.router.weight[e * M:(e + 1) * M].T
                    pi = F.softmax(lore_logits, dim=-1)
                    pis, chosen = torch.topk(pi, lore.config.top_l)
                    if lore.config.renormalize:
                        pis = pis / pis.sum()
                    term = sum(pis[j] * (x @ lore.A[e, int(i)]) @ lore.B[e, int(i)] for j, i in enumerate(chosen))
                else:
                    term = (x @ lore.A[e, 0]) @ lore.B[e, 0]
                if lore.entangled:
                    h = h + term
                else:
                    extra_out = term
            y = y + weights[t, k] * (reference_act(activation, h) @ w_down[e] + extra_out)
        shared = layer.shared_experts
        if shared is not None:
            y = y + reference_act(activation, x @ shared.up.weight.T) @ shared.down.weight.T
        out.append(y)
    return torch.stack(out)
