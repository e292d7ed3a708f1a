"""Token dispatchers: group token slots by expert, and put expert outputs back in token order.

Shape legend: T tokens, K slots per token, N = T*K sorted rows, D hidden, E experts, L experts on this
rank, S source ranks.

A dispatch is two steps kept apart on purpose: a *permutation* (sort the T*K token slots by expert, a
stable argsort, so rows of one expert are contiguous and keep token order) and an *exchange* (move the
rows to the rank that owns their expert). The local dispatcher's exchange is the identity; expert-parallel
(all-to-all) and LSH-compressed dispatchers override only the exchange, so the layer's forward holds no
parallelism code.

With token dropping (capacity.py) the permutation leaves out the slots past their expert's capacity: they get
no row, so they are neither exchanged nor computed, and contribute nothing in `combine`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron.model.moe.capacity import Kept
from megatron.model.moe.kernels import compute_dtype
from megatron.model.moe.lsh import Compression, CrossPolytopeHash, LSHConfig, compress, decompress
from megatron.model.moe.router import Routing
from megatron.parallel.expert_parallel import (
    ExpertParallel,
    all_gather_counts,
    all_to_all,
    experts_per_rank,
    source_to_expert_major,
)


@dataclass
class RowSources:
    """Whose batch the rows an expert received came from, for a loss defined per batch (the LoRE
    balancing loss): rows of each local expert arrive ordered by source rank; rows_SL[s, l] came from
    source s, whose batch routed total_rows_S[s] rows (token slots) in all, over every expert."""

    rows_SL: torch.Tensor
    total_rows_S: torch.Tensor


@dataclass
class Exchanged:
    """What an exchange hands the experts (rows of this rank's experts, grouped by expert, and their
    counts), where the rows came from, the state `exchange_back` needs, and statistics to log."""

    rows_ND: torch.Tensor
    tokens_per_expert_L: torch.Tensor
    sources: RowSources | None = None  # None: every row is from this rank's batch
    state: Any = None
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class DispatchContext:
    """What `combine` needs to undo `dispatch`."""

    token_of_row_N: torch.Tensor  # which token each sorted row came from
    weight_of_row_N: torch.Tensor  # that slot's gate value
    num_tokens: int
    exchange: Any = None  # what the exchange needs to undo itself (kept here, not on the dispatcher,
    # so that activation checkpointing's recomputed forward pairs with its own combine)
    sources: RowSources | None = None  # None: every row is from this rank's batch
    stats: dict[str, float] = field(default_factory=dict)  # the exchange's, per layer (e.g. compression rate)


def sort_by_expert(expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, kept: Kept | None = None
                   ) -> DispatchContext:
    """The permutation step: the token of each expert-sorted row, and its gate. With `kept`, the dropped slots
    sort after every expert's (they keep token order within an expert either way) and are cut off."""
    top_k = expert_ids_TK.shape[1]
    ids_N = expert_ids_TK.flatten()
    if kept is not None:
        ids_N = ids_N.masked_fill(~kept.slots_TK.flatten(), torch.iinfo(ids_N.dtype).max)
    order_N = torch.argsort(ids_N, stable=True)
    if kept is not None:
        order_N = order_N[:kept.count]
    return DispatchContext(order_N // top_k, weights_TK.flatten()[order_N], expert_ids_TK.shape[0])


class TokenDispatcher:
    """Base: permute locally, then exchange. Subclasses change the exchange, never the experts."""

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing, kept: Kept | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """Returns the rows of this rank's experts grouped by expert, their counts [L], and the context.
        `kept`: the slots within capacity (token dropping); None: dropless, every routed slot gets a row."""
        ctx = sort_by_expert(routing.expert_ids_TK, routing.weights_TK, kept)
        x_ND = x_TD.index_select(0, ctx.token_of_row_N)
        exchanged = self.exchange(x_ND, routing.tokens_per_expert_E if kept is None else kept.per_expert_E)
        ctx.exchange, ctx.sources, ctx.stats = exchanged.state, exchanged.sources, exchanged.stats
        return exchanged.rows_ND, exchanged.tokens_per_expert_L, ctx

    def combine(self, y_ND: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """Brings rows back, weights each by its gate and sums every token's K rows: [T, D]."""
        y_ND = self.exchange_back(y_ND, ctx.exchange)
        weighted_ND = y_ND * ctx.weight_of_row_N.unsqueeze(1)  # under autocast: half rows x fp32 gates -> fp32
        return weighted_ND.new_zeros(ctx.num_tokens, y_ND.shape[1]).index_add(0, ctx.token_of_row_N, weighted_ND)

    def exchange(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> Exchanged:
        """Rows sorted by expert (and the rows per expert [E]) -> what this rank's experts get."""
        raise NotImplementedError

    def exchange_back(self, y_ND: torch.Tensor, state: Any) -> torch.Tensor:
        raise NotImplementedError


def in_compute_dtype(x_ND: torch.Tensor) -> torch.Tensor:
    """Rows in the dtype the experts' matmuls run in (bf16 under bf16 autocast): what the experts would cast
    them to anyway, done before the exchange so that it sends half the bytes. Every dispatcher's exchange
    does it, so the experts see the same rows whatever the layout."""
    return x_ND.to(compute_dtype(x_ND))


class LocalDispatcher(TokenDispatcher):
    """No exchange: every expert lives in this process (the baseline the parallel variants vary)."""

    def exchange(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> Exchanged:
        return Exchanged(in_compute_dtype(x_ND), tokens_per_expert_E)

    def exchange_back(self, y_ND: torch.Tensor, state: Any) -> torch.Tensor:
        return y_ND


@dataclass
class _AllToAllState:
    send_splits: list[int]  # rows this rank sends to each EP rank
    recv_splits: list[int]  # rows it receives from each
    expert_major_order: torch.Tensor  # received rows -> rows grouped by local expert


class AllToAllDispatcher(TokenDispatcher):
    """Expert parallelism: rows travel to the EP rank that holds their expert, and back after the experts.

    First the per-expert row counts are exchanged (one all-gather of E integers per rank), then the rows
    with one `all_to_all_single` of uneven splits, differentiable (its backward is the reverse exchange).
    Received rows arrive grouped by source rank and are regrouped by local expert, so the experts see
    exactly what the local dispatcher would give them. Every row the permutation made is sent (with token
    dropping, the slots past capacity were left out before: they never travel).

    Every rank gets every rank's counts, so each also reports how unevenly its EP group's ranks receive rows
    (`max_rank_rows_over_mean`: the most rows one rank received over the group's mean), which a dropless
    layer's memory follows; the routing health warns above `moe_receive_warning_factor`.

    Host syncs (on GPUs): the split sizes go to the host once per dispatch (`.tolist()`), because
    `all_to_all_single` takes its split sizes as Python integers; the counts for the experts stay on the device.
    """

    def __init__(self, expert_parallel: ExpertParallel, num_experts: int):
        self.group, self.ep_rank = expert_parallel.group, expert_parallel.rank
        self.local_experts = expert_parallel.local_experts(num_experts)
        self.experts_per_rank = experts_per_rank(num_experts, expert_parallel.size)
        # the collectives, per instance: a benchmark wraps them on this dispatcher, not on the module
        self.all_gather_counts, self.all_to_all = all_gather_counts, all_to_all

    def exchange(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> Exchanged:
        x_ND = in_compute_dtype(x_ND)
        counts_SE = self.all_gather_counts(tokens_per_expert_E, self.group)
        counts_SL = counts_SE[:, self.local_experts.start:self.local_experts.stop]
        rows_per_rank_P = self.per_rank(tokens_per_expert_E)
        received_by_rank_P = self.per_rank(counts_SE.sum(dim=0))  # what every rank of the group receives
        splits = torch.cat([rows_per_rank_P, counts_SL.sum(dim=1), received_by_rank_P]).tolist()  # the one host sync
        ranks = len(rows_per_rank_P)
        send_splits, recv_splits, received_by_rank = splits[:ranks], splits[ranks:2 * ranks], splits[2 * ranks:]
        received_ND = self.all_to_all(x_ND, recv_splits, send_splits, self.group)
        order = source_to_expert_major(counts_SL, total=sum(recv_splits))
        state = _AllToAllState(send_splits, recv_splits, order)
        sources = RowSources(counts_SL, counts_SE.sum(dim=1))
        crossing = sum(send_splits) - send_splits[self.ep_rank]
        stats = {"exchange_bytes_sent": float(crossing * x_ND.shape[1] * x_ND.element_size()),  # each way
                 "max_rank_rows_over_mean": max(received_by_rank) * ranks / max(sum(received_by_rank), 1)}
        return Exchanged(received_ND.index_select(0, order), counts_SL.sum(dim=0), sources, state, stats)

    def per_rank(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Per-expert counts summed over each EP rank's experts: [P]."""
        return torch.stack([chunk.sum() for chunk in counts_E.split(self.experts_per_rank)])

    def exchange_back(self, y_ND: torch.Tensor, state: _AllToAllState) -> torch.Tensor:
        received_order_ND = torch.empty_like(y_ND).index_copy(0, state.expert_major_order, y_ND)
        return self.all_to_all(received_order_ND, state.send_splits, state.recv_splits, self.group)


class LSHDispatcher(TokenDispatcher):
    """LSH-MoE: the rows bound for each expert are replaced by their bucket centroids before the exchange,
    and each row gets back its centroid's output (+ its residual, with compensation) after it.

    It wraps another dispatcher's exchange (local or all-to-all), so compression works the same with
    and without expert parallelism; the experts (and their LoRE routers) see centroids. See lsh.py.
    Host sync: `torch.unique` sizes its output on the host.
    """

    def __init__(self, inner: TokenDispatcher, hidden_size: int, config: LSHConfig):
        self.inner, self.config = inner, config
        self.hasher = CrossPolytopeHash(hidden_size, config)
        self.compress, self.decompress = compress, decompress  # per instance, as the collectives are

    def exchange(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> Exchanged:
        centroids_CD, centroids_per_expert_E, compression = self.compress(
            x_ND, tokens_per_expert_E, self.hasher, self.config.error_compensation)
        inner = self.inner.exchange(centroids_CD, centroids_per_expert_E)
        inner.state = (compression, inner.state)
        inner.stats["lsh_compression_rate"] = centroids_CD.shape[0] / max(x_ND.shape[0], 1)
        return inner

    def with_compensation(self, compensate: bool) -> LSHDispatcher:
        """The same buckets (the same rotation), with or without the residual compensation."""
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, error_compensation=compensate)
        return other

    def exchange_back(self, y_ND: torch.Tensor, state: tuple[Compression, Any]) -> torch.Tensor:
        compression, inner_state = state
        return self.decompress(self.inner.exchange_back(y_ND, inner_state), compression)


def build_dispatcher(
    expert_parallel: ExpertParallel | None, num_experts: int, hidden_size: int = 0, lsh: LSHConfig | None = None
) -> TokenDispatcher:
    if expert_parallel is None or expert_parallel.size == 1:
        dispatcher: TokenDispatcher = LocalDispatcher()
    else:
        dispatcher = AllToAllDispatcher(expert_parallel, num_experts)
    return dispatcher if lsh is None else LSHDispatcher(dispatcher, hidden_size, lsh)
