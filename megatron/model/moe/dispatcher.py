"""Token dispatchers: group token slots by expert, and put expert outputs back in token order.

Shape legend: T tokens, K slots per token, N = T*K sorted slots, D hidden, E experts.

The local dispatcher exchanges nothing: it is the baseline that expert-parallel (all-to-all) and
LSH-compressed dispatchers vary, behind the same `dispatch`/`combine` pair, so that the layer's
forward holds no parallelism code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchContext:
    token_of_row_N: torch.Tensor  # which token each sorted row came from
    weight_of_row_N: torch.Tensor  # its gate value
    num_tokens: int


class LocalDispatcher:
    def dispatch(
        self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """Returns the token rows sorted by expert (stable), the rows per expert, and how to undo it."""
        top_k = expert_ids_TK.shape[1]
        flat_ids_N = expert_ids_TK.flatten()
        order_N = torch.argsort(flat_ids_N, stable=True)
        token_of_row_N = order_N // top_k
        tokens_per_expert_E = torch.bincount(flat_ids_N, minlength=num_experts)
        ctx = DispatchContext(token_of_row_N, weights_TK.flatten()[order_N], x_TD.shape[0])
        return x_TD.index_select(0, token_of_row_N), tokens_per_expert_E, ctx

    def combine(self, y_ND: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """Weights every row by its gate value and sums each token's K rows."""
        weighted_ND = y_ND * ctx.weight_of_row_N.unsqueeze(1)
        out_TD = y_ND.new_zeros(ctx.num_tokens, y_ND.shape[1])
        return out_TD.index_add(0, ctx.token_of_row_N, weighted_ND)
