"""Token routers: top-k (Switch load-balancing loss, ST-MoE z-loss) and Sinkhorn (GPT-NeoX's default).

Shape legend: T tokens, B sequences, S tokens per sequence, D hidden, E experts, K experts per token, X rows,
G expert groups, P experts per group.

Both are a linear D -> E (`gate`; without bias unless `bias`, gpt-oss's router has one) and hand the layer a
`Routing`; `build_router` picks one by `moe_router_type`. Jitter (multiplicative input noise in training),
renormalising the chosen gates and scaling them by a constant (DeepSeek-V3's routed_scaling_factor) are options
of either; GPT-NeoX has jitter on its top-k router only and renormalises neither.

The top-k router also has what MoE models are trained with today (`Balancing`, shared with the LoRE router):
- scores: a softmax over all experts, or a sigmoid per expert with the chosen k gates normalised to sum to 1
  (DeepSeek-V3);
- auxiliary-loss-free balancing (DeepSeek-V3): a bias b_e added to the scores to *choose* the top-k only (the
  gates stay unbiased); after each optimizer step b_e += rate * sign(mean load - load_e) over the global batch
  (`update_bias`, called by the trainer's `BalanceTracker`); no gradient;
- the Switch loss's load fractions f_e over a micro-batch (as in Switch), per sequence (a sequence-level loss,
  DeepSeek-V3's complementary one) or over the global batch (all data-parallel ranks and the micro-batches of
  the step so far; Qwen's global-batch balancing), its gradient always through this micro-batch's P_e;
- group-limited choice (DeepSeek-V3): the E experts form G contiguous groups; a token keeps the `group_top_k`
  groups whose two best choice scores (bias included) sum highest, and chooses its top-k among their experts.
  Laid out one group per expert-parallel rank, it bounds the ranks a token is sent to by `group_top_k`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

LBL_SCOPES = ("micro_batch", "sequence", "global_batch")


@dataclass(frozen=True)
class Balancing:
    """How a router (of experts, or an expert's LoREs) is kept balanced besides the loss's coefficient."""

    bias: bool = False  # auxiliary-loss-free balancing: a choice-only bias, updated after each optimizer step
    bias_update_rate: float = 1e-3
    lbl_scope: str = "micro_batch"  # over what the Switch loss's load fractions are counted (LBL_SCOPES)

    def __post_init__(self):
        if self.lbl_scope not in LBL_SCOPES:
            raise ValueError(f"load-balancing scope {self.lbl_scope!r} is not one of {', '.join(LBL_SCOPES)}")
        if self.bias_update_rate < 0:
            raise ValueError(f"bias update rate {self.bias_update_rate} must be >= 0")


@dataclass
class Routing:
    expert_ids_TK: torch.Tensor  # long
    weights_TK: torch.Tensor  # gate values the expert outputs are scaled by
    probs_TE: torch.Tensor  # full softmax (sigmoid scores: normalised over experts), fp32
    tokens_per_expert_E: torch.Tensor  # token slots routed to each expert (long)
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    global_counts_E: torch.Tensor | None = None  # lbl_scope global_batch: this micro-batch's slots over all ranks
    balance_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. bias_changed_fraction:
    # [part, whole] pairs (choose_top_k)


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


def sequence_balancing_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, num_sequences: int
                            ) -> torch.Tensor:
    """The Switch loss of each of the B sequences (its own f_e and P_e), averaged over sequences."""
    B, E = num_sequences, probs_TE.shape[-1]
    ids_BX = expert_ids_TK.reshape(B, -1)
    sequence_of_slot = torch.arange(B, device=ids_BX.device).unsqueeze(1) * E
    fraction_BE = count_ids(sequence_of_slot + ids_BX, B * E).view(B, E).to(probs_TE.dtype) / ids_BX.shape[1]
    return E * (fraction_BE * probs_TE.reshape(B, -1, E).mean(dim=1)).sum(dim=1).mean()


@torch.compiler.disable  # a collective: kept out of a compiled router's graph
def sum_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    """Counts summed over every rank (each routes tokens of its own); unchanged outside a distributed run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    counts = counts.clone()
    dist.all_reduce(counts)
    return counts


def limit_to_groups(choice_XE: torch.Tensor, num_groups: int, group_top_k: int) -> torch.Tensor:
    """DeepSeek-V3's group-limited choice: the experts outside each row's `group_top_k` best groups set to -inf.

    Experts form `num_groups` contiguous groups; a group's score is the sum of its two best choice scores (its one
    score when a group holds one expert), as DeepSeek-V3 ranks groups."""
    if num_groups == 1:
        return choice_XE
    X, E = choice_XE.shape
    grouped_XGP = choice_XE.view(X, num_groups, E // num_groups)
    group_score_XG = grouped_XGP.topk(min(2, E // num_groups), dim=-1).values.sum(dim=-1)
    kept_XG = torch.zeros_like(group_score_XG, dtype=torch.bool).scatter_(
        1, group_score_XG.topk(group_top_k, dim=-1).indices, True)
    return grouped_XGP.masked_fill(~kept_XG.unsqueeze(-1), float("-inf")).view(X, E)


def choose_top_k(scores_XE: torch.Tensor, k: int, bias: torch.Tensor | None, num_groups: int = 1,
                 group_top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(gates, ids) of the top-k of `scores + bias` (bias may be [E] or per-row [X, E]), among the experts of each
    row's `group_top_k` best groups when `num_groups` > 1 (`limit_to_groups`); the gates are the unbiased scores.
    With a bias, also the share of rows whose set of choices the bias changed, as the pair [rows changed, rows]:
    pairs sum over micro-batches and ranks, so the logged share is the global batch's (not a mean of means)."""
    if bias is None and num_groups == 1:
        return *torch.topk(scores_XE, k, dim=-1), {}
    limit = lambda choice_XE: limit_to_groups(choice_XE, num_groups, group_top_k)
    if bias is None:
        ids_XK = torch.topk(limit(scores_XE), k, dim=-1).indices
        return scores_XE.gather(-1, ids_XK), ids_XK, {}
    ids_XK = torch.topk(limit(scores_XE + bias), k, dim=-1).indices
    unbiased_XK = torch.topk(limit(scores_XE), k, dim=-1).indices
    changed_X = (ids_XK.sort(dim=-1).values != unbiased_XK.sort(dim=-1).values).any(dim=-1)
    changed_of_rows = torch.stack([changed_X.sum(), changed_X.new_tensor(changed_X.numel(), dtype=torch.long)])
    return scores_XE.gather(-1, ids_XK), ids_XK, {"bias_changed_fraction": changed_of_rows.detach()}


def bias_step(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's update: each bias moves by `rate` towards balance, `rate * sign(mean load - load)`, the mean
    over the last dim (the experts, or one expert's LoREs). A row with no load at all (an expert that got no
    rows) is left alone."""
    counts = counts.to(bias.dtype)
    return bias + rate * torch.sign(counts.mean(dim=-1, keepdim=True) - counts)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: `mean_t (logsumexp_e logits_te)^2`, keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def check_groups(num_experts: int, top_k: int, num_groups: int, group_top_k: int) -> None:
    """Group-limited routing's settings: one line naming the keys for any that cannot be built."""
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"moe_router_num_groups {num_groups} must divide moe_num_experts {num_experts}")
    if not 1 <= group_top_k <= num_groups:
        raise ValueError(f"moe_router_group_top_k {group_top_k} must be between 1 and moe_router_num_groups "
                         f"{num_groups}")
    reachable = group_top_k * (num_experts // num_groups)
    if num_groups > 1 and top_k > reachable:
        raise ValueError(f"moe_top_k {top_k} exceeds the experts of the groups a token keeps: moe_router_group_top_k "
                         f"{group_top_k} x {num_experts // num_groups} experts per group = {reachable}")


class Router(nn.Module):
    """The parts both routers share: the gate, the settings, and the jittered logits in fp32."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, jitter_eps: float | None = None,
                 renormalize: bool = False, lbl_in_fp32: bool = False, init_std: float = 0.02,
                 score_function: str = "softmax", balancing: Balancing | None = None, num_groups: int = 1,
                 group_top_k: int = 1, scaling_factor: float = 1.0, bias: bool = False):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe_top_k {top_k} must be between 1 and moe_num_experts {num_experts}")
        check_groups(num_experts, top_k, num_groups, group_top_k)
        if scaling_factor <= 0:
            raise ValueError(f"moe_router_scaling_factor {scaling_factor} must be > 0")
        if score_function not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_router_score_function: {score_function!r} is not softmax or sigmoid")
        if score_function == "sigmoid" and top_k == 1:
            raise ValueError("moe_router_score_function: sigmoid with moe_top_k 1: the normalised top-1 gate is "
                             "always 1, so the router would learn from the balancing loss only (use k >= 2)")
        self.gate = nn.Linear(hidden_size, num_experts, bias=bias)  # gate.bias [E]: gpt-oss's router bias
        nn.init.normal_(self.gate.weight, std=init_std)
        if bias:
            nn.init.zeros_(self.gate.bias)
        self.top_k, self.jitter_eps = top_k, jitter_eps
        self.num_groups, self.group_top_k, self.scaling_factor = num_groups, group_top_k, scaling_factor
        self.renormalize, self.lbl_in_fp32 = renormalize or score_function == "sigmoid", lbl_in_fp32
        self.score_function, self.balancing = score_function, balancing or Balancing()
        if self.balancing.bias:  # part of the model's state: checkpointed, equal on every rank
            self.register_buffer("expert_bias_E", torch.zeros(num_experts))
        if self.balancing.lbl_scope == "global_batch":  # the step's earlier micro-batches (set by the trainer)
            self.register_buffer("counts_before_E", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_eps:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return self.gate(x_TD).float()  # softmax and Sinkhorn in fp32 whatever the autocast dtype

    def chosen_gates(self, weights_TK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if self.scaling_factor != 1.0:
            weights_TK = weights_TK * self.scaling_factor
        return weights_TK.to(dtype)

    def balancing_loss(self, probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, counts_E: torch.Tensor,
                       num_sequences: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Switch loss over this router's lbl_scope, and (global_batch) this micro-batch's global counts.
        Outside training every scope is the micro-batch's: evaluation runs no collective and keeps no state."""
        scope = self.balancing.lbl_scope if self.training else "micro_batch"
        if scope == "sequence":
            return sequence_balancing_loss(probs_TE, expert_ids_TK, num_sequences), None
        if scope == "global_batch":
            global_counts_E = sum_over_ranks(counts_E)
            seen_E = self.counts_before_E + global_counts_E
            fraction_E = seen_E.to(probs_TE.dtype) / seen_E.sum().clamp_min(1)
            return probs_TE.shape[-1] * torch.sum(fraction_E * probs_TE.mean(dim=0)), global_counts_E
        return load_balancing_loss(probs_TE, expert_ids_TK, counts_E), None

    @torch.no_grad()
    def update_bias(self, global_counts_E: torch.Tensor) -> None:
        """One loss-free balancing step from the global batch's counts (every rank passes the same)."""
        self.expert_bias_E.copy_(bias_step(self.expert_bias_E, global_counts_E, self.balancing.bias_update_rate))


class TopKRouter(Router):
    def forward(self, x_TD: torch.Tensor, num_sequences: int = 1) -> Routing:
        logits_TE = self.logits(x_TD)
        if self.score_function == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)  # the loss's and the statistics' P
        else:
            scores_TE = probs_TE = F.softmax(logits_TE, dim=-1)
        bias_E = self.expert_bias_E if self.balancing.bias else None
        weights_TK, expert_ids_TK, balance_stats = choose_top_k(scores_TE, self.top_k, bias_E, self.num_groups,
                                                                self.group_top_k)
        lbl_probs = probs_TE if self.lbl_in_fp32 else probs_TE.to(x_TD.dtype)
        counts_E = count_ids(expert_ids_TK, probs_TE.shape[-1])
        lbl, global_counts_E = self.balancing_loss(lbl_probs, expert_ids_TK, counts_E, num_sequences)
        return Routing(
            expert_ids_TK=expert_ids_TK,
            weights_TK=self.chosen_gates(weights_TK, x_TD.dtype),
            probs_TE=probs_TE,
            tokens_per_expert_E=counts_E,
            load_balancing_loss=lbl.float(),
            z_loss=z_loss(logits_TE),
            global_counts_E=global_counts_E,
            balance_stats=balance_stats,
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

    def forward(self, x_TD: torch.Tensor, num_sequences: int = 1) -> Routing:
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
    router = ROUTERS[router_type](*args, **kwargs)
    if router_type == "sinkhorn" and (router.balancing != Balancing() or router.score_function != "softmax"
                                      or router.num_groups != 1):
        raise ValueError("moe_router_type sinkhorn balances by itself: the expert bias, the load-balancing scope, "
                         "sigmoid scores and expert groups are options of the topk router")
    return router
