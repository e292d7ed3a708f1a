"""Token dispatchers: group token slots by expert, and put expert outputs back in token order.

Shape legend: T tokens, K slots per token, N = T*K sorted rows, D hidden, E experts.

A dispatch is two steps kept apart on purpose: a *permutation* (sort the T*K token slots by expert, a
stable argsort, so rows of one expert are contiguous and keep token order) and an *exchange* (move the
rows to the rank that owns their expert). The local dispatcher's exchange is the identity; expert-parallel
(all-to-all) and LSH-compressed dispatchers override only the exchange, so the layer's forward holds no
parallelism code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.model.moe.router import Routing


@dataclass
class DispatchContext:
    """What `combine` needs to undo `dispatch`."""

    token_of_row_N: torch.Tensor  # which token each sorted row came from
    weight_of_row_N: torch.Tensor  # that slot's gate value
    num_tokens: int


def sort_by_expert(
    expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, DispatchContext]:
    """The permutation step: token of each expert-sorted row, its gate, and the rows per expert."""
    top_k = expert_ids_TK.shape[1]
    flat_ids_N = expert_ids_TK.flatten()
    order_N = torch.argsort(flat_ids_N, stable=True)
    tokens_per_expert_E = torch.bincount(flat_ids_N, minlength=num_experts)
    ctx = DispatchContext(order_N // top_k, weights_TK.flatten()[order_N], expert_ids_TK.shape[0])
    return tokens_per_expert_E, ctx


class TokenDispatcher:
    """Base: permute locally, then exchange. Subclasses change the exchange, never the experts."""

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """Returns the rows sorted by expert, the rows per expert [E], and the context for `combine`."""
        num_experts = routing.probs_TE.shape[-1]
        tokens_per_expert_E, ctx = sort_by_expert(routing.expert_ids_TK, routing.weights_TK, num_experts)
        x_ND = x_TD.index_select(0, ctx.token_of_row_N)
        return (*self.exchange(x_ND, tokens_per_expert_E), ctx)

    def combine(self, y_ND: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """Brings rows back, weights each by its gate and sums every token's K rows: [T, D]."""
        y_ND = self.exchange_back(y_ND)
        weighted_ND = y_ND * ctx.weight_of_row_N.unsqueeze(1)
        return y_ND.new_zeros(ctx.num_tokens, y_ND.shape[1]).index_add(0, ctx.token_of_row_N, weighted_ND)

    def exchange(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def exchange_back(self, y_ND: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LocalDispatcher(TokenDispatcher):
    """No exchange: every expert lives in this process (the baseline the parallel variants vary)."""

    def exchange(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_ND, tokens_per_expert_E

    def exchange_back(self, y_ND: torch.Tensor) -> torch.Tensor:
        return y_ND
