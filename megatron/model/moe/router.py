"""Token routers: top-k (Switch load-balancing loss, ST-MoE z-loss) and Sinkhorn (GPT-NeoX's default).

Shape legend: T tokens, D hidden, E experts, K experts per token.

Both are a linear D -> E without bias (`gate`) and hand the layer a `Routing`; `build_router` picks one by
`moe_router_type`. Jitter (multiplicative input noise in training) and renormalising the chosen gates are
options of either; GPT-NeoX has jitter on its top-k router only and renormalises neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Routing:
    expert_ids_TK: torch.Tensor  # long
    weights_TK: torch.Tensor  # gate values the expert outputs are scaled by
    probs_TE: torch.Tensor  # full softmax, fp32
    tokens_per_expert_E: torch.Tensor  # token slots routed to each expert (long)
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor


def count_ids(ids: torch.Tensor, size: int) -> torch.Tensor:
    """How often each of 0 .. size-1 occurs in `ids`: long [size].

    Not torch.bincount: on CUDA it reads the ids' maximum on the host to size its output, a host sync per
    call (and a graph break under torch.compile); a scatter-add into a tensor of known size needs neither.
    """
    flat = ids.flatten()
    return torch.zeros(size, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(
    probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, counts_E: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer: `E * sum_e f_e * P_e`.

    f_e is the share of the T*K token-to-expert assignments that went to e (not differentiable) and
    P_e the mean router probability of e; the loss is 1 when both are uniform and grows with imbalance.
    """
    num_experts = probs_TE.shape[-1]
    if counts_E is None:
        counts_E = count_ids(expert_ids_TK, num_experts)
    fraction_E = counts_E.to(probs_TE.dtype) / expert_ids_TK.numel()
    return num_experts * torch.sum(fraction_E * probs_TE.mean(dim=0))


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: `mean_t (logsumexp_e logits_te)^2`, keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class Router(nn.Module):
    """The parts both routers share: the gate, the settings, and the jittered logits in fp32."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, jitter_eps: float | None = None,
                 renormalize: bool = False, lbl_in_fp32: bool = False, init_std: float = 0.02):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe_top_k {top_k} must be between 1 and moe_num_experts {num_experts}")
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=init_std)
        self.top_k, self.jitter_eps = top_k, jitter_eps
        self.renormalize, self.lbl_in_fp32 = renormalize, lbl_in_fp32

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_eps:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return self.gate(x_TD).float()  # softmax and Sinkhorn in fp32 whatever the autocast dtype

    def chosen_gates(self, weights_TK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK.to(dtype)


class TopKRouter(Router):
    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = F.softmax(logits_TE, dim=-1)
        weights_TK, expert_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        lbl_probs = probs_TE if self.lbl_in_fp32 else probs_TE.to(x_TD.dtype)
        counts_E = count_ids(expert_ids_TK, probs_TE.shape[-1])
        return Routing(
            expert_ids_TK=expert_ids_TK,
            weights_TK=self.chosen_gates(weights_TK, x_TD.dtype),
            probs_TE=probs_TE,
            tokens_per_expert_E=counts_E,
            load_balancing_loss=load_balancing_loss(lbl_probs, expert_ids_TK, counts_E).float(),
            z_loss=z_loss(logits_TE),
        )


def sinkhorn(logits_TE: torch.Tensor, tol: float = 1e-4, max_iter: int = 3, eps: float = 1e-8) -> torch.Tensor:
    """GPT-NeoX's (and Megatron-LM's) Sinkhorn balancing of exp(logits) towards rows summing to 1/T and
    columns to 1/E, by alternately rescaling rows (d0) and columns (d1).

    Starts from d1 = 1 / (E * column sums); each iteration sets d0 then d1, so the columns end exact (up to
    eps) and the rows approximate. It stops after `max_iter` iterations or once mean |d1 - d1_before| < tol.
    That test is absolute on d1 ~ 1 / (E * sum_t exp(logit)), which for a few thousand tokens is below
    1e-4 from the start, so in practice NeoX runs one iteration; both are kept as NeoX has them.
    """
    cost_TE = torch.exp(logits_TE)
    T, E = cost_TE.shape
    d0_T = torch.ones(T, device=cost_TE.device, dtype=cost_TE.dtype)
    d1_E = 1.0 / (E * cost_TE.sum(dim=0))
    for _ in range(max_iter):
        d1_before = d1_E
        d0_T = 1.0 / (T * ((cost_TE * d1_E).sum(dim=1) + eps))
        d1_E = 1.0 / (E * ((cost_TE * d0_T.unsqueeze(1)).sum(dim=0) + eps))
        if torch.mean(torch.abs(d1_before - d1_E)) < tol:  # a host sync per iteration, as in NeoX
            break
    return cost_TE * d1_E * d0_T.unsqueeze(1)


class SinkhornRouter(Router):
    """GPT-NeoX's `SinkhornRouter` (megatron/model/router.py there), as a `Routing`.

    Training: the experts are the top-k of the Sinkhorn-balanced exp(logits), computed without gradient;
    evaluation: the top-k of the gate scores themselves (Sinkhorn needs the whole batch, generation has one
    token). The chosen expert's output is scaled by its gate score, sigmoid(logit) for top-1 and the full
    softmax's probability for top-k > 1 (not renormalised), which is what the router learns through.
    No balancing loss: Sinkhorn balances by construction, so `load_balancing_loss` is 0 and moe_loss_coeff
    has no effect; the z-loss is still computed (ours, off unless moe_zloss_coeff is set). With expert
    parallelism every rank balances its own tokens (NeoX broadcasts rank 0's routing over its model-parallel
    group, whose ranks share their tokens; our EP ranks each route a batch of their own).
    """

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = F.softmax(logits_TE, dim=-1)
        scores_TE = torch.sigmoid(logits_TE) if self.top_k == 1 else probs_TE
        if self.training:
            with torch.no_grad():
                expert_ids_TK = torch.topk(sinkhorn(logits_TE), self.top_k, dim=-1).indices
            weights_TK = scores_TE.gather(1, expert_ids_TK)
        else:
            weights_TK, expert_ids_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        return Routing(
            expert_ids_TK=expert_ids_TK,
            weights_TK=self.chosen_gates(weights_TK, x_TD.dtype),
            probs_TE=probs_TE,
            tokens_per_expert_E=count_ids(expert_ids_TK, logits_TE.shape[-1]),
            load_balancing_loss=logits_TE.new_zeros(()),
            z_loss=z_loss(logits_TE),
        )


ROUTERS: dict[str, type[Router]] = {"topk": TopKRouter, "sinkhorn": SinkhornRouter}


def build_router(router_type: str, *args, **kwargs) -> Router:
    if router_type not in ROUTERS:
        raise ValueError(f"moe_router_type: {router_type!r} is not one of {', '.join(ROUTERS)}")
    return ROUTERS[router_type](*args, **kwargs)
