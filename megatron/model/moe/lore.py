"""StructMoE's low-rank experts (LoREs): M per expert, routed per token by a per-expert secondary router.

Shape legend: N rows (already grouped by expert), D hidden, F expert FFN width, E experts, M LoREs per
expert, R LoRE rank, L LoREs used per row (top-l), G = E*M (expert, LoRE) groups.

Modes:
- entangled (the method): H = x W_up[e] + sum_{i in top-l} pi_i (x A[e,i]) B[e,i], before the activation.
  A [E, M, D, R], B [E, M, R, F], LoRE router D -> E*M.
- router_free (ablation): one always-on LoRE per expert of rank M*R, entangled the same way.
  A [E, 1, D, M*R], B [E, 1, M*R, F], no router: the same LoRE parameters minus the router.
- standalone (ablation): LoREs are separate low-rank experts d -> r -> d whose pi-weighted output is
  added to the expert's *output*. A [E, M, D, R], B [E, M, R, D], LoRE router D -> E*M.

Only the efficient form is computed (the paper's Eq. 2): two grouped matmuls over the rows' (expert,
LoRE) groups, so the extra work is N*L*R*(D+F). The effective weight W_up + sum pi A B (Eq. 1) is never
built. With l = 1 the rows are regrouped by (expert, LoRE) before the expert's own matmuls (still
expert-major, so the expert sees the same groups), which makes the LoRE term line up with the rows of H
and needs no scatter of an [N, F] tensor.

pi is the softmax over the expert's M LoRE logits, *not* renormalised over the chosen l by default: with
l = 1 a renormalised pi is always 1 and the LoRE router would get no gradient (the same reason Switch
keeps the raw gate for top-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.moe.experts import grouped_matmul

MODES = ("entangled", "router_free", "standalone")
B_INIT_SCALE = 0.1


@dataclass
class LoREConfig:
    num_lores: int  # M
    rank: int  # R
    top_l: int = 1
    mode: str = "entangled"
    renormalize: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"lore_mode: {self.mode!r} is not one of {MODES}")
        if not 1 <= self.top_l <= self.num_lores:
            raise ValueError(f"lore_top_k {self.top_l} must be between 1 and lore_num_experts {self.num_lores}")


@dataclass
class LoREPlan:
    """Where each row's LoRE work goes: filled by `LoREBank.plan`, used by `LoREBank.delta`."""

    row_order_N: torch.Tensor | None  # regrouping applied to the rows (l = 1), or None
    rows_per_group_G: torch.Tensor
    slot_rows: torch.Tensor | None  # for l > 1: the row of each (row, choice) slot, grouped
    pi_slots: torch.Tensor | None  # gate of each slot, in group order
    aux: dict


class LoREBank(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        config: LoREConfig,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.config, self.num_experts = config, num_experts
        self.entangled = config.mode != "standalone"
        self.routed = config.mode != "router_free"
        groups, rank = (config.num_lores, config.rank) if self.routed else (1, config.num_lores * config.rank)
        out_size = ffn_hidden_size if self.entangled else hidden_size
        self.lores_per_expert = groups
        self.A = nn.Parameter(torch.randn(num_experts, groups, hidden_size, rank) * init_std)
        # B starts small but not zero: a zero B would give A and the LoRE router no gradient at step 0.
        self.B = nn.Parameter(torch.randn(num_experts, groups, rank, out_size) * init_std * B_INIT_SCALE)
        if self.routed:
            # One linear D -> E*M holds every expert's LoRE router; row r of expert e reads slice e.
            self.router = nn.Linear(hidden_size, num_experts * config.num_lores, bias=False)
            nn.init.normal_(self.router.weight, std=init_std)

    def extra_repr(self) -> str:
        c = self.config
        return f"mode={c.mode}, experts={self.num_experts}, lores={c.num_lores}, rank={c.rank}, top_l={c.top_l}"

    def plan(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> LoREPlan:
        E, M, L = self.num_experts, self.lores_per_expert, self.config.top_l
        if not self.routed:
            zero = x_ND.new_zeros((), dtype=torch.float32)
            return LoREPlan(None, tokens_per_expert_E, None, None, {"lore_balancing_loss": zero, "lore_load_EM": None})
        # Each expert's router slice applied to that expert's rows only: a grouped matmul, N*D*M work.
        w_router_EDM = self.router.weight.view(E, M, -1).transpose(1, 2)
        logits_NM = grouped_matmul(x_ND, w_router_EDM, tokens_per_expert_E).float()
        probs_NM = F.softmax(logits_NM, dim=-1)
        pi_NL, lore_ids_NL = torch.topk(probs_NM, L, dim=-1)
        if self.config.renormalize:
            pi_NL = pi_NL / pi_NL.sum(dim=-1, keepdim=True)
        expert_of_row_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), tokens_per_expert_E)
        group_NL = expert_of_row_N.unsqueeze(1) * M + lore_ids_NL
        rows_per_group_G = torch.bincount(group_NL.flatten(), minlength=E * M)
        aux = self._aux(probs_NM, expert_of_row_N, rows_per_group_G, tokens_per_expert_E)
        pi_NL = pi_NL.to(x_ND.dtype)
        if L == 1:
            row_order_N = torch.argsort(group_NL.squeeze(1), stable=True)
            return LoREPlan(row_order_N, rows_per_group_G, None, pi_NL.squeeze(1)[row_order_N], aux)
        slot_order = torch.argsort(group_NL.flatten(), stable=True)
        return LoREPlan(None, rows_per_group_G, slot_order // L, pi_NL.flatten()[slot_order], aux)

    def _aux(self, probs_NM, expert_of_row_N, rows_per_group_G, tokens_per_expert_E) -> dict:
        """LoRE load per expert, and the Switch balancing loss within each expert, weighted by its rows."""
        E, M, L = self.num_experts, self.lores_per_expert, self.config.top_l
        rows_E = tokens_per_expert_E.float()
        load_EM = rows_per_group_G.view(E, M).float() / (rows_E * L).clamp_min(1).unsqueeze(1)
        mean_prob_EM = probs_NM.new_zeros(E, M).index_add(0, expert_of_row_N, probs_NM) / rows_E.clamp_min(1)[:, None]
        per_expert = M * (load_EM * mean_prob_EM).sum(dim=1)
        loss = (per_expert * rows_E).sum() / rows_E.sum().clamp_min(1)
        return {"lore_balancing_loss": loss, "lore_load_EM": load_EM.detach()}

    def delta(self, x_ND: torch.Tensor, plan: LoREPlan) -> torch.Tensor:
        """sum_i pi_i (x A_i) B_i per row: [N, F] (entangled) or [N, D] (standalone)."""
        A_GDR = self.A.flatten(0, 1)
        B_GRO = self.B.flatten(0, 1)
        if plan.slot_rows is None:  # one LoRE per row, rows already grouped
            xa_NR = grouped_matmul(x_ND, A_GDR, plan.rows_per_group_G)
            if plan.pi_slots is not None:
                xa_NR = xa_NR * plan.pi_slots.unsqueeze(1)
            return grouped_matmul(xa_NR, B_GRO, plan.rows_per_group_G)
        xa_SR = grouped_matmul(x_ND.index_select(0, plan.slot_rows), A_GDR, plan.rows_per_group_G)
        out_SO = grouped_matmul(xa_SR * plan.pi_slots.unsqueeze(1), B_GRO, plan.rows_per_group_G)
        return out_SO.new_zeros(x_ND.shape[0], out_SO.shape[1]).index_add(0, plan.slot_rows, out_SO)
