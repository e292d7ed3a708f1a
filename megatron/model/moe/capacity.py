"""Bounded experts: a capacity per expert, and which token slots past it are dropped.

Shape legend: T tokens, K slots per token (top-k), N = T*K slots, E experts.

Dropless routing (the default) gives each expert every slot routed to it, so when routing piles tokens onto one
expert, that expert's rows, and the activation memory they take, grow with it: the usual way a dropless MoE
runs out of memory at scale. Token dropping (GPT-NeoX's `moe_token_dropping`, from DeepSpeed MoE; Megablocks'
`moe_capacity_factor`) bounds every expert at C slots per micro-batch:

    C = max(ceil(T * K * factor / E), min_capacity)

with factor `moe_train_capacity_factor` in training and `moe_eval_capacity_factor` in evaluation (the layer's
`training` flag), and min_capacity `moe_min_capacity`. This is DeepSpeed's `_capacity` for top-k gating
(ceil(T / E * K * factor), then raised to min_capacity), the formula GPT-NeoX's keys were passed to. The product
is rounded to 1e-6 before the ceiling so that float noise does not add a slot (1.1 x 10 is 11, not 12).

Which slots go past C (`policy`, our key `moe_token_drop_policy`):
- `position` (the default): an expert serves its slots in token order, first come first served; the slots of
  token t (its K choices in order) come before those of token t + 1. This is Megablocks' binned gather. It is
  the default because a token's fate then depends only on the tokens before it in the micro-batch, never on
  later tokens of its own sequence: with `probs`, whether token s is served depends on the gates of tokens
  after s, so a causal LM's output at s would depend on its future, which generation never sees.
- `probs`: an expert serves the C slots with the highest gates (DeepSpeed's `drop_policy="probs"`), ties in
  token order; the confident choices survive, at the price of the dependence above.

A dropped slot gets no row: no expert and no LoRE term. It contributes nothing to its token's output (the
block's residual passes the token on), and the token's other slots keep their gates as routed (they are not
renormalised, as in Megablocks). The router's statistics, balancing loss and bias update see every routed
slot, dropped or not: they are about the choices, which is what a balancing loss has to correct.

With expert parallelism the capacity is per source rank: every rank computes C from its own T and drops before
the exchange (as DeepSpeed MoE does, whose gates run on each rank's own tokens). Dropped rows never travel, no
collective is added, a rank receives at most (EP size) x (its experts) x C rows, and each rank's outputs are
the one-rank layer's on its own micro-batch. A capacity per expert over all ranks' slots would need every
rank's gates (probs) or an order across ranks before a row could be dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron.model.moe.router import count_ids

DROP_POLICIES = ("position", "probs")


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float, min_capacity: int) -> int:
    """C = max(ceil(T * K * factor / E), min_capacity): the slots one expert serves per micro-batch."""
    return max(math.ceil(round(num_tokens * top_k * factor / num_experts, 6)), min_capacity)


@dataclass(frozen=True)
class Capacity:
    """A layer's token-dropping settings (the run's, not the model's: a checkpoint resumes with or without)."""

    train_factor: float = 1.0
    eval_factor: float = 1.0
    min_capacity: int = 4
    policy: str = "position"

    def __post_init__(self):
        if self.policy not in DROP_POLICIES:
            raise ValueError(f"moe_token_drop_policy: {self.policy!r} is not one of {', '.join(DROP_POLICIES)}")
        if self.train_factor <= 0 or self.eval_factor <= 0 or self.min_capacity < 0:
            raise ValueError(f"capacity factors {self.train_factor}, {self.eval_factor} must be > 0 and "
                             f"moe_min_capacity {self.min_capacity} >= 0")

    def per_expert(self, num_tokens: int, top_k: int, num_experts: int, training: bool) -> int:
        factor = self.train_factor if training else self.eval_factor
        return expert_capacity(num_tokens, top_k, num_experts, factor, self.min_capacity)

    def keep(self, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, training: bool) -> Kept:
        """Which of the routed slots their experts serve this micro-batch."""
        capacity = self.per_expert(expert_ids_TK.shape[0], expert_ids_TK.shape[1], num_experts, training)
        return keep_within_capacity(expert_ids_TK, weights_TK, num_experts, capacity, self.policy)


@dataclass
class Kept:
    """The slots that survive the capacity cut, for the dispatcher."""

    slots_TK: torch.Tensor  # bool: served by its expert
    per_expert_E: torch.Tensor  # long: slots served per expert, each at most the capacity
    count: int  # slots served in all, on the host: it sizes the dispatched rows
    capacity: int

    @property
    def dropped_fraction(self) -> float:
        return 1.0 - self.count / max(self.slots_TK.numel(), 1)


def keep_within_capacity(expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity: int,
                         policy: str = "position") -> Kept:
    """Queue each expert's slots (token order, or highest gate first), and keep the first `capacity` of each queue.

    One host sync: the number of slots kept, which sizes the rows the dispatcher gathers.
    """
    ids_N = expert_ids_TK.flatten()
    num_slots = ids_N.numel()
    if policy == "probs":  # highest gate first, then (a stable sort) grouped by expert: ties stay in token order
        by_gate_N = torch.argsort(weights_TK.detach().flatten(), descending=True, stable=True)
        queue_N = by_gate_N[torch.argsort(ids_N[by_gate_N], stable=True)]
    else:
        queue_N = torch.argsort(ids_N, stable=True)
    routed_E = count_ids(ids_N, num_experts)
    queue_start_E = torch.cumsum(routed_E, 0) - routed_E
    place_in_queue_N = torch.arange(num_slots, device=ids_N.device) - queue_start_E[ids_N[queue_N]]
    kept_N = torch.empty(num_slots, dtype=torch.bool, device=ids_N.device).index_copy_(
        0, queue_N, place_in_queue_N < capacity)
    per_expert_E = routed_E.clamp_max(capacity)
    return Kept(kept_N.view_as(expert_ids_TK), per_expert_E, int(per_expert_E.sum()), capacity)
