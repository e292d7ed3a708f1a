"""StructMoE's low-rank experts (LoREs): M per expert, routed per row by a per-expert secondary router.

Shape legend: N rows (already grouped by expert), D hidden, F expert FFN width, U the experts' up-projection
width (F, or 2F for a gated activation), E experts, M LoREs per expert, R LoRE rank, L LoREs used per row
(top-l), G = E*M (expert, LoRE) groups, O LoRE output width (U entangled, D standalone).

Modes (parameters per layer in brackets):
- entangled (the method): H = x W_up[e] + sum_{i in top-l} pi_i (x A[e,i]) B[e,i], before the activation.
  A [E, M, D, R], B [E, M, R, U], LoRE router D -> E*M  [E*M*R*(D+U) + D*E*M].
- router_free (ablation): one always-on LoRE per expert of rank M*R, entangled the same way, no pi.
  A [E, 1, D, M*R], B [E, 1, M*R, U]  [E*M*R*(D+U)]: the same LoRE parameters, minus the router.
- standalone (ablation): LoREs are separate low-rank experts D -> R -> D, routed by the same secondary
  router; their pi-weighted output is added to the expert's *output*, after the down-projection.
  A [E, M, D, R], B [E, M, R, D], LoRE router D -> E*M  [E*M*R*2D + D*E*M].

Gated activations (swiglu, geglu): W_up[e] is [D, 2F], value then gate, and both halves are "before the
activation", so an entangled LoRE corrects both: B is [R, 2F] and A B is a rank-R change of the whole
[W_value, W_gate] (one x A feeds both halves). The LoRE's effective expert is then the expert with any rank-R
up-projection, as without gating; a value-only or gate-only term could only rescale what the expert's own
gate opens, or reweight the expert's own values (docs/moe.md).

Only the efficient form (the paper's Eq. 2) is computed: the effective weight W_up + sum pi A B (Eq. 1)
is never built, so the extra work is N*L*R*(D+O). With l = 1 the rows are regrouped by (expert, LoRE)
before the expert's own matmuls (still expert-major, so the expert sees the same groups); then the LoRE
term of a group lines up with rows of H and (x A) B is added straight into H, with no [N, F] scatter.
The (x A) B step dominates: with 16 rows per LoRE (4096 tokens, 8 experts, M = 32) it is bound by
reading B and writing its gradient, so it runs as a per-group addmm into H (`accumulate_grouped_matmul`).

pi is the softmax over the expert's M LoRE logits and is *not* renormalised over the chosen l by default:
with l = 1 a renormalised pi is identically 1 and the LoRE router would get no gradient (the reason Switch
keeps the raw gate for top-1). `renormalize=True` rescales the chosen l to sum to 1 (useful for l > 1).

Init: A ~ N(0, init_std^2) and B ~ N(0, (0.1 init_std)^2). B = 0 (LoRA's choice) would make the term's
gradients with respect to A and to the LoRE router exactly zero at step 0 (both pass through B), so the
router would start learning only after B moved; a B this small keeps the term ~0.1% of x W_up at init
while every part gets a gradient from the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.activations import up_width
from megatron.model.moe.dispatcher import RowSources
from megatron.model.moe.init import normal_init_slice
from megatron.model.moe.kernels import accumulate_grouped_matmul, grouped_matmul
from megatron.model.moe.router import Balancing, bias_step, choose_top_k, count_ids, sum_over_ranks

MODES = ("entangled", "router_free", "standalone")
B_INIT_SCALE = 0.1


@dataclass
class LoREConfig:
    """The LoRE settings an MoE layer takes (a plain dataclass, not the run's config)."""

    num_lores: int  # M
    rank: int  # R
    top_l: int = 1
    mode: str = "entangled"
    renormalize: bool = False
    balancing: Balancing = Balancing()  # the LoRE routers' bias and loss scope

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"lore_mode: {self.mode!r} is not one of {MODES}")
        if self.num_lores < 1 or self.rank < 1:
            raise ValueError(f"lore_num_experts {self.num_lores} and lore_rank {self.rank} must be >= 1")
        if not 1 <= self.top_l <= self.num_lores:
            raise ValueError(f"lore_top_k {self.top_l} must be between 1 and lore_num_experts {self.num_lores}")


@dataclass
class LoREPlan:
    """Where each row's LoRE work goes: made by `LoREBank.plan`, used by `LoREBank.add_term`."""

    row_order_N: torch.Tensor | None  # regrouping applied to the rows (l = 1), or None
    rows_per_group_G: torch.Tensor  # rows (l = 1) or slots (l > 1) per (expert, LoRE) group
    slot_rows: torch.Tensor | None  # l > 1: the row of each (row, choice) slot, in group order
    pi_slots: torch.Tensor | None  # gate of each row (l = 1) or slot (l > 1), in group order
    aux: dict


class LoREBank(nn.Module):
    def __init__(
        self,
        num_experts: int,
        num_lores: int,
        rank: int,
        hidden_size: int,
        ffn_hidden_size: int,
        top_l: int = 1,
        mode: str = "entangled",
        renormalize: bool = False,
        init_std: float = 0.02,
        b_init_std: float | None = None,
        local_experts: range | None = None,
        gmm: Callable | None = None,
        activation: str = "gelu",
        balancing: Balancing | None = None,
    ):
        """`num_experts` is the layer's global count; the bank holds the LoREs of `local_experts` only.
        `activation` is the experts': a gated one makes the entangled term as wide as the up-projection (2F).
        gmm: grouped_gemm's kernel for the B term on CUDA (the experts' one); None: torch's grouped_mm.
        `balancing`: the LoRE routers' (a bias per LoRE of each expert; the within-expert loss's scope)."""
        super().__init__()
        self.gmm = gmm
        self.config = LoREConfig(num_lores, rank, top_l, mode, renormalize)
        local = range(num_experts) if local_experts is None else local_experts
        self.num_experts, self.total_experts, self.first_expert = len(local), num_experts, local.start
        self.balancing = balancing or Balancing()
        if self.balancing.lbl_scope == "sequence":
            raise ValueError("lore_lbl_scope: sequence (an expert's rows are not sequences; expected micro_batch "
                             "or global_batch)")
        self.entangled = mode != "standalone"
        self.routed = mode != "router_free"
        groups, group_rank = (num_lores, rank) if self.routed else (1, num_lores * rank)
        out_size = up_width(activation, ffn_hidden_size) if self.entangled else hidden_size
        self.lores_per_expert = groups
        b_std = init_std * B_INIT_SCALE if b_init_std is None else b_init_std
        self.A = nn.Parameter(normal_init_slice((num_experts, groups, hidden_size, group_rank), init_std, local))
        self.B = nn.Parameter(normal_init_slice((num_experts, groups, group_rank, out_size), b_std, local))
        if self.routed:
            # One linear D -> E*M holds every (local) expert's LoRE router; a row of expert e reads slice e.
            # made on meta, then given its weight: Linear's own init would draw a layout-dependent amount
            # from the random stream
            self.router = nn.Linear(hidden_size, self.num_experts * num_lores, bias=False, device="meta")
            weight = normal_init_slice((num_experts, num_lores, hidden_size), init_std, local)
            self.router.weight = nn.Parameter(weight.flatten(0, 1))
            if self.balancing.bias:  # per local expert, saved per expert like the LoREs' weights
                self.register_buffer("lore_bias_EM", torch.zeros(self.num_experts, num_lores))
            if self.balancing.lbl_scope == "global_batch":  # the step's earlier micro-batches (set by the trainer)
                self.register_buffer("slots_before_EM", torch.zeros(self.num_experts, num_lores, dtype=torch.long),
                                     persistent=False)

    @classmethod
    def from_config(cls, num_experts: int, hidden_size: int, ffn_hidden_size: int, config: LoREConfig,
                    init_std: float = 0.02, local_experts: range | None = None,
                    gmm: Callable | None = None, activation: str = "gelu") -> LoREBank:
        c = config
        return cls(num_experts, c.num_lores, c.rank, hidden_size, ffn_hidden_size, c.top_l, c.mode,
                   c.renormalize, init_std, local_experts=local_experts, gmm=gmm, activation=activation,
                   balancing=c.balancing)

    @torch.no_grad()
    def update_bias(self, global_slots_EM: torch.Tensor) -> None:
        """One loss-free balancing step per local expert, from its rows' LoRE choices over the global batch."""
        self.lore_bias_EM.copy_(bias_step(self.lore_bias_EM, global_slots_EM, self.balancing.bias_update_rate))

    def to_all_experts(self, table_LM: torch.Tensor) -> torch.Tensor:
        """A per-local-expert table placed in the layer's [E, ...] table (zero rows for other ranks' experts)."""
        before = self.first_expert
        return F.pad(table_LM, (0, 0, before, self.total_experts - before - self.num_experts))

    def own_rows(self, table_EM: torch.Tensor) -> torch.Tensor:
        """This rank's experts' rows of an [E, ...] table (the inverse of `to_all_experts`)."""
        return table_EM[self.first_expert:self.first_expert + self.num_experts]

    def global_fraction(self, slots_EM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F [E, M]: each local expert's LoRE shares over every rank's rows of the step so far, this
        micro-batch's global slots [E, M]). The count table is padded to all experts before the sum, so a
        rank adds only the experts it holds; every row is counted once, on the rank that ran it."""
        global_EM = self.own_rows(sum_over_ranks(self.to_all_experts(slots_EM)))
        seen_EM = self.slots_before_EM + global_EM
        return seen_EM.float() / seen_EM.sum(dim=-1, keepdim=True).clamp_min(1).float(), global_EM

    def extra_repr(self) -> str:
        c = self.config
        return f"mode={c.mode}, experts={self.num_experts}, lores={c.num_lores}, rank={c.rank}, top_l={c.top_l}"

    def forward(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, up: Callable, act: Callable, down: Callable,
        sources: RowSources | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The expert MLP `down(act(up(x)))` with the LoRE term hooked in; rows keep their order."""
        plan = self.plan(x_ND, tokens_per_expert_E, sources)
        if plan.row_order_N is not None:  # rows regrouped by (expert, LoRE); still expert-major
            x_ND = x_ND.index_select(0, plan.row_order_N)
        h_NU = up(x_ND)
        if self.entangled:
            h_NU = self.add_term(h_NU, x_ND, plan)  # before the activation
        y_ND = down(act(h_NU))
        if not self.entangled:
            y_ND = self.add_term(y_ND, x_ND, plan)  # standalone low-rank experts add to the output
        if plan.row_order_N is not None:
            y_ND = torch.empty_like(y_ND).index_copy(0, plan.row_order_N, y_ND)
        return y_ND, plan.aux

    def plan(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, sources: RowSources | None = None
    ) -> LoREPlan:
        """Secondary routing: each row's top-l LoREs among its expert's M, their pi, and the aux."""
        E, M, L = self.num_experts, self.lores_per_expert, self.config.top_l
        if not self.routed:
            zero = x_ND.new_zeros((), dtype=torch.float32)
            aux = {"lore_balancing_loss": zero, "lore_load_EM": None, "lore_slots_EM": None,
                   "lore_global_slots_EM": None, "balance_stats": {}}
            return LoREPlan(None, tokens_per_expert_E, None, None, aux)
        # Each expert's router slice applied to that expert's rows only: a grouped matmul, N*D*M work.
        w_router_EDM = self.router.weight.view(E, M, -1).transpose(1, 2)
        logits_NM = grouped_matmul(x_ND, w_router_EDM, tokens_per_expert_E).float()
        probs_NM = F.softmax(logits_NM, dim=-1)
        expert_of_row_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), tokens_per_expert_E,
                                                  output_size=x_ND.shape[0])
        bias_NM = self.lore_bias_EM[expert_of_row_N] if self.balancing.bias else None
        pi_NL, lore_ids_NL, balance_stats = choose_top_k(probs_NM, L, bias_NM)
        if self.config.renormalize:
            pi_NL = pi_NL / pi_NL.sum(dim=-1, keepdim=True)
        group_NL = expert_of_row_N.unsqueeze(1) * M + lore_ids_NL
        rows_per_group_G = count_ids(group_NL, E * M)
        if sources is None:  # every row from this rank's batch
            sources = RowSources(tokens_per_expert_E.unsqueeze(0), tokens_per_expert_E.sum().unsqueeze(0))
        fraction_EM = global_EM = None
        if self.training and self.balancing.lbl_scope == "global_batch":
            fraction_EM, global_EM = self.global_fraction(rows_per_group_G.view(E, M))
        aux = lore_aux(probs_NM, lore_ids_NL, sources.rows_SL, sources.total_rows_S, rows_per_group_G.view(E, M),
                       fraction_EM)
        aux |= {"lore_global_slots_EM": global_EM, "balance_stats": balance_stats}
        pi_NL = pi_NL.to(x_ND.dtype)
        if L == 1:
            row_order_N = torch.argsort(group_NL.squeeze(1), stable=True)
            return LoREPlan(row_order_N, rows_per_group_G, None, pi_NL.squeeze(1)[row_order_N], aux)
        slot_order = torch.argsort(group_NL.flatten(), stable=True)
        return LoREPlan(None, rows_per_group_G, slot_order // L, pi_NL.flatten()[slot_order], aux)

    def add_term(self, out_NO: torch.Tensor, x_ND: torch.Tensor, plan: LoREPlan) -> torch.Tensor:
        """out + sum_i pi_i (x A_i) B_i per row; out is [N, U] (entangled) or [N, D] (standalone)."""
        A_GDR = self.A.flatten(0, 1)
        B_GRO = self.B.flatten(0, 1)
        if plan.slot_rows is None:  # one LoRE per row, rows already grouped
            xa_NR = grouped_matmul(x_ND, A_GDR, plan.rows_per_group_G)
            if plan.pi_slots is not None:
                xa_NR = xa_NR * plan.pi_slots.unsqueeze(1)
            # one grouped call on CUDA (gmm where the layer was given it), the in-place addmm loop on CPU
            return accumulate_grouped_matmul(out_NO, xa_NR, B_GRO, plan.rows_per_group_G, gmm=self.gmm)
        xa_SR = grouped_matmul(x_ND.index_select(0, plan.slot_rows), A_GDR, plan.rows_per_group_G)
        term_SO = grouped_matmul(xa_SR * plan.pi_slots.unsqueeze(1), B_GRO, plan.rows_per_group_G)
        return out_NO.index_add(0, plan.slot_rows, term_SO)


def lore_aux(
    probs_NM: torch.Tensor,
    lore_ids_NL: torch.Tensor,
    rows_SE: torch.Tensor,
    total_rows_S: torch.Tensor,
    slots_per_group_EM: torch.Tensor,
    fraction_EM: torch.Tensor | None = None,
) -> dict:
    """The Switch balancing loss within each expert, per source batch, and each expert's LoRE load.

    Rows are grouped by expert, then by source batch: segment g = (e, s) holds the n_g = rows_SE[s, e] rows
    expert e got from batch s, which routed N_s = total_rows_S[s] rows in all. With f_gi = (slots of g
    choosing LoRE i) / (n_g l) and P_gi = the mean of pi_i over g's rows, loss_g = M sum_i f_gi P_gi, and

        loss = sum_g n_g loss_g / N_s.

    One rank has one source and N = sum_e n_e: the within-expert loss weighted by rows. With expert
    parallelism each EP rank adds its experts' share of every source batch's loss, so the sum over ranks
    is the sum of the per-batch losses one rank would compute, which is what the trainer's mean over
    ranks and micro-batches sees. `fraction_EM` (global-batch balancing) replaces every f_gi by expert e's
    share F_ei over the global batch: loss = M sum_g sum_i F_ei (n_g P_gi) / N_s.
    """
    M, top_l = probs_NM.shape[-1], lore_ids_NL.shape[-1]
    S, E = rows_SE.shape
    rows_G = rows_SE.T.flatten()  # g = e * S + s: the rows' order
    segment_N = torch.repeat_interleave(torch.arange(E * S, device=probs_NM.device), rows_G,
                                        output_size=probs_NM.shape[0])
    sum_prob_GM = probs_NM.new_zeros(E * S, M).index_add(0, segment_N, probs_NM)
    if fraction_EM is None:
        slots_GM = count_ids(segment_N.unsqueeze(1) * M + lore_ids_NL, E * S * M).view(E * S, M)
        denominators_G = (rows_G * total_rows_S.repeat(E)).to(probs_NM.dtype).clamp_min(1)
        loss = (M / top_l) * ((slots_GM * sum_prob_GM).sum(dim=1) / denominators_G).sum()
    else:
        fraction_GM = fraction_EM.to(probs_NM.dtype).repeat_interleave(S, dim=0)
        sources_G = total_rows_S.repeat(E).to(probs_NM.dtype).clamp_min(1)
        loss = M * ((fraction_GM * sum_prob_GM).sum(dim=1) / sources_G).sum()
    rows_E = rows_SE.sum(dim=0).float()
    load_EM = slots_per_group_EM.float() / (rows_E * top_l).clamp_min(1).unsqueeze(1)
    return {"lore_balancing_loss": loss, "lore_load_EM": load_EM.detach(), "lore_slots_EM": slots_per_group_EM}
