"""Top-k token router with the Switch load-balancing loss and the ST-MoE router z-loss.

Shape legend: T tokens, D hidden, E experts, K experts per token.
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


def load_balancing_loss(
    probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, counts_E: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer: `E * sum_e f_e * P_e`.

    f_e is the share of the T*K token-to-expert assignments that went to e (not differentiable) and
    P_e the mean router probability of e; the loss is 1 when both are uniform and grows with imbalance.
    """
    num_experts = probs_TE.shape[-1]
    if counts_E is None:
        counts_E = torch.bincount(expert_ids_TK.flatten(), minlength=num_experts)
    fraction_E = counts_E.to(probs_TE.dtype) / expert_ids_TK.numel()
    return num_experts * torch.sum(fraction_E * probs_TE.mean(dim=0))


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: `mean_t (logsumexp_e logits_te)^2`, keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class TopKRouter(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        jitter_eps: float | None = None,
        renormalize: bool = False,
        lbl_in_fp32: bool = False,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=init_std)
        self.top_k, self.jitter_eps = top_k, jitter_eps
        self.renormalize, self.lbl_in_fp32 = renormalize, lbl_in_fp32

    def forward(self, x_TD: torch.Tensor) -> Routing:
        if self.training and self.jitter_eps:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x_TD = x_TD * noise
        logits_TE = self.gate(x_TD).float()  # softmax in fp32 whatever the autocast dtype
        probs_TE = F.softmax(logits_TE, dim=-1)
        weights_TK, expert_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        lbl_probs = probs_TE if self.lbl_in_fp32 else probs_TE.to(x_TD.dtype)
        counts_E = torch.bincount(expert_ids_TK.flatten(), minlength=probs_TE.shape[-1])
        return Routing(
            expert_ids_TK=expert_ids_TK,
            weights_TK=weights_TK.to(x_TD.dtype),
            probs_TE=probs_TE,
            tokens_per_expert_E=counts_E,
            load_balancing_loss=load_balancing_loss(lbl_probs, expert_ids_TK, counts_E).float(),
            z_loss=z_loss(logits_TE),
        )
