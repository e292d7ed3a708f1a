"""LSH-MoE: cross-polytope hashing of the rows bound for each expert, bucket centroids, and compensation.

Shape legend: N rows (sorted by expert), C centroids, D hidden, H hashes, R rotation dims, E experts.

A hash is cross-polytope LSH: rotate x by a random Gaussian matrix R [D, R] (seeded, so every rank draws
the same one) and take the index of the largest-magnitude coordinate of xR with its sign, one of 2R
buckets. H independent hashes combine into one bucket key (2R)^H-ary. Rows of the same expert with the
same key are replaced by their mean, the centroid; only centroids cross the exchange and meet the expert.

Each row gets back its centroid's output, and with error compensation its own residual:

    y_row = E(c) + (x_row - c)

which is the form this project's mission states (the residual never leaves the source rank). It is exact
when the expert is the identity plus a constant; for a general expert E(x) - E(c) = J (x - c) + ..., so
whether adding x - c lowers the error depends on how close J is to I: a question for measurements, not
an assumption (the calibration on a trained small model found it raises the layer-output error).

Hashing is invariant to positive scaling of x (the argmax and sign of |xR| do not change), and close
vectors share buckets with high probability. Gradients flow through the centroid means (each row gets
its centroid's gradient divided by the bucket size) and through the compensation. Measuring the error this
compression makes is lsh_probes.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.model.moe.router import count_ids


@dataclass(frozen=True)
class LSHConfig:
    num_hashes: int = 2
    hash_dim: int = 16  # R: 2R buckets per hash; larger is finer (more centroids, less error)
    error_compensation: bool = True
    seed: int = 0
    rotation_refresh_interval: int = 0  # draw a new rotation every N training steps; 0: one for the whole run

    def __post_init__(self):
        if self.num_hashes < 1 or self.hash_dim < 1:
            raise ValueError(f"lsh_num_hashes {self.num_hashes} and lsh_hash_dim {self.hash_dim} must be >= 1")
        if (2 * self.hash_dim) ** self.num_hashes >= 2**40:
            raise ValueError(f"lsh: (2 x lsh_hash_dim)^lsh_num_hashes = (2 x {self.hash_dim})^{self.num_hashes} "
                             "buckets do not fit a 40-bit key; use fewer hashes or dims")

    @property
    def num_buckets(self) -> int:
        return (2 * self.hash_dim) ** self.num_hashes


class CrossPolytopeHash:
    """Bucket keys in [0, (2R)^H) for rows of width D.

    The rotation is a function of `seed` and the refresh period the training step is in (`at_step`), so
    every rank draws the same one and a resumed run hashes exactly as an uninterrupted one.
    """

    def __init__(self, hidden_size: int, config: LSHConfig):
        self.config, self.hidden_size = config, hidden_size
        self.period = 0
        self.rotation_DK = self._draw(0)

    def _draw(self, period: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed + period * 1_000_003)  # apart from layer seeds
        return torch.randn(self.hidden_size, self.config.num_hashes * self.config.hash_dim, generator=generator,
                           dtype=torch.float32, device="cpu")  # fp32 on the generator's device, whatever the defaults

    def at_step(self, step: int) -> None:
        """Use the rotation of the refresh period `step` falls in (a no-op without refreshing)."""
        interval = self.config.rotation_refresh_interval
        period = step // interval if interval else 0
        if period != self.period:
            self.period = period
            self.rotation_DK = self._draw(period).to(self.rotation_DK.device)

    def __call__(self, x_ND: torch.Tensor) -> torch.Tensor:
        if self.rotation_DK.device != x_ND.device:
            self.rotation_DK = self.rotation_DK.to(x_ND.device)
        H, R = self.config.num_hashes, self.config.hash_dim
        with torch.autocast(x_ND.device.type, enabled=False):  # fp32 buckets under bf16 autocast too
            rotated_NHR = (x_ND.detach().float() @ self.rotation_DK).view(-1, H, R)
        index_NH = rotated_NHR.abs().argmax(dim=-1)
        negative_NH = rotated_NHR.gather(-1, index_NH.unsqueeze(-1)).squeeze(-1) < 0
        code_NH = index_NH * 2 + negative_NH.long()  # one of 2R buckets per hash
        place_H = (2 * R) ** torch.arange(H, device=x_ND.device)
        return (code_NH * place_H).sum(dim=-1)


@dataclass
class Compression:
    """What decompressing needs: each row's centroid, and (for the compensation) the rows' residuals."""

    centroid_of_row_N: torch.Tensor
    residual_ND: torch.Tensor | None  # x - c per row, kept on the source rank; None without compensation


def compress(
    x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, hasher: CrossPolytopeHash, keep_residual: bool
) -> tuple[torch.Tensor, torch.Tensor, Compression]:
    """Rows sorted by expert -> centroids sorted by expert, centroids per expert, and what to undo it with.

    An expert's rows never mix with another's. Centroids are in the order of their first row, so with no
    collisions the centroids are the rows themselves, in order, and every sum downstream is the same.
    """
    num_experts = tokens_per_expert_E.numel()
    expert_of_row_N = torch.repeat_interleave(torch.arange(num_experts, device=x_ND.device), tokens_per_expert_E,
                                              output_size=x_ND.shape[0])
    key_N = expert_of_row_N * hasher.config.num_buckets + hasher(x_ND)
    keys_C, centroid_of_row_N, rows_per_centroid_C = torch.unique(key_N, return_inverse=True, return_counts=True)
    rows = torch.arange(x_ND.shape[0], device=x_ND.device)
    first_row_C = torch.full_like(keys_C, x_ND.shape[0]).scatter_reduce(0, centroid_of_row_N, rows, "amin")
    order_C = torch.argsort(first_row_C)  # expert-major too, as the rows are
    new_index_C = torch.empty_like(order_C).index_copy_(0, order_C, torch.arange(order_C.numel(), device=x_ND.device))
    keys_C, rows_per_centroid_C, centroid_of_row_N = keys_C[order_C], rows_per_centroid_C[order_C], new_index_C[
        centroid_of_row_N]
    sums_CD = x_ND.new_zeros(keys_C.shape[0], x_ND.shape[1]).index_add(0, centroid_of_row_N, x_ND)
    centroids_CD = sums_CD / rows_per_centroid_C.unsqueeze(1).to(x_ND.dtype)
    centroids_per_expert_E = count_ids(keys_C // hasher.config.num_buckets, num_experts)
    residual_ND = None
    if keep_residual:
        # a row alone in its bucket has x - c = 0; masking it keeps the gradient a + 0, not (a + g) - g,
        # so without collisions the layer is the exact layer bit for bit
        shared_N = (rows_per_centroid_C > 1).index_select(0, centroid_of_row_N).unsqueeze(1)
        residual_ND = torch.where(shared_N, x_ND - centroids_CD.index_select(0, centroid_of_row_N), 0.0)
    return centroids_CD, centroids_per_expert_E, Compression(centroid_of_row_N, residual_ND)


def decompress(y_CD: torch.Tensor, compression: Compression) -> torch.Tensor:
    """Each row's output: its centroid's, plus its own residual x - c with error compensation."""
    y_ND = y_CD.index_select(0, compression.centroid_of_row_N)
    if compression.residual_ND is not None:
        y_ND = y_ND + compression.residual_ND.to(y_ND.dtype)
    return y_ND

