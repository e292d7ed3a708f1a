"""Remix-DiT (Fang, Ma & Wang, NeurIPS 2024): N timestep experts mixed from K basis weights.

Shape legend: N experts, K basis models, O out features, I in features; B batch, R the rows of one expert.

Expert n serves the timesteps [floor(nT/N), floor((n+1)T/N)) and runs with W_n = sum_k c[n, k] W_k in every
remixed linear, where c is a learned [N, K] coefficient table. Mixing happens in weight space, so an expert's
forward costs one plain linear per layer (plus the mix). This module holds the layers and tables only; the
DiT uses them (model.py) and experts.py exports experts as plain DiTs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.dit.config import MIXERS, RemixConfig

RAW_PRIOR_EPS = 1e-6  # the raw mixer's prior loss reads -log(max(c, eps)): finite for c <= 0


def prior_basis(n: int, num_experts: int, num_basis: int) -> int:
    """Expert n's prior basis floor(nK/N): consecutive experts share a basis, in timestep order."""
    return n * num_basis // num_experts


class MixingCoefficients(nn.Module):
    """One [N, K] table of mixing coefficients.

    softmax: c = softmax(logits), logits initialised to `prior_strength` x the one-hot prior (3.0 gives
        0.87 on the prior basis for K = 4): each expert starts close to, but not exactly, its prior basis.
        This follows the authors' code (prior scaled by 3 x the std of a normal draw, plus that draw); the
        draw is left out here so the init is deterministic, and differing bases already break the symmetry.
    raw: c = the values as they are (unconstrained), initialised to the one-hot prior.
    oracle: c = the one-hot prior, fixed (no parameters): disjoint experts sharing bases by interval.
    """

    def __init__(self, num_experts: int, num_basis: int, mixer: str = "softmax", prior_strength: float = 3.0):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"remix mixer: {mixer!r} (expected one of {', '.join(MIXERS)})")
        self.mixer = mixer
        prior_N = torch.tensor([prior_basis(n, num_experts, num_basis) for n in range(num_experts)])
        self.register_buffer("prior_N", prior_N, persistent=False)
        self.register_buffer("prior_NK", F.one_hot(prior_N, num_basis).float(), persistent=False)
        self.logits = None
        if mixer == "softmax":
            self.logits = nn.Parameter(prior_strength * self.prior_NK.clone())
        elif mixer == "raw":
            self.logits = nn.Parameter(self.prior_NK.clone())

    def coefficients(self) -> torch.Tensor:
        """c [N, K]."""
        if self.mixer == "softmax":
            return self.logits.softmax(dim=-1)
        if self.mixer == "raw":
            return self.logits
        return self.prior_NK

    def prior_loss(self) -> torch.Tensor:
        """Cross-entropy of each expert's coefficients against its one-hot prior, averaged over the N experts.

        softmax: -log softmax(logits)[n, prior(n)]; raw: -log max(c[n, prior(n)], 1e-6) (the raw values read as
        probabilities; no gradient once an entry falls below eps); oracle: 0.
        """
        if self.mixer == "softmax":
            return F.cross_entropy(self.logits, self.prior_N)
        if self.mixer == "raw":
            prior_entry_N = self.logits.gather(1, self.prior_N[:, None]).squeeze(1)
            return -prior_entry_N.clamp_min(RAW_PRIOR_EPS).log().mean()
        return self.prior_NK.new_zeros(())


class RemixLinear(nn.Module):
    """K basis linears mixed in weight space: y = x (sum_k c_k W_k)^T + sum_k c_k b_k.

    The parameters keep the plain layer's names with a leading K dim (`weight` [K, O, I], `bias` [K, O]), so
    a Remix model's state dict reads like a DiT's.
    """

    def __init__(self, in_features: int, out_features: int, num_basis: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.num_basis = in_features, out_features, num_basis
        self.weight = nn.Parameter(torch.empty(num_basis, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_basis, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's init for every basis independently: xavier-uniform weights, zero biases."""
        for weight_OI in self.weight:
            nn.init.xavier_uniform_(weight_OI)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def mixed_weights(self, coeffs_K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        coeffs_K = coeffs_K.to(self.weight.dtype)
        weight_OI = torch.einsum("k,koi->oi", coeffs_K, self.weight)
        bias_O = None if self.bias is None else torch.einsum("k,ko->o", coeffs_K, self.bias)
        return weight_OI, bias_O

    def forward(self, x: torch.Tensor, coeffs_K: torch.Tensor) -> torch.Tensor:
        weight_OI, bias_O = self.mixed_weights(coeffs_K)
        return F.linear(x, weight_OI, bias_O)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, basis={self.num_basis}, bias={self.bias is not None}"


def coefficient_tables(cfg: RemixConfig, num_linears: int) -> nn.Module:
    """The model's tables: one `MixingCoefficients` (global) or a ModuleList of one per remixed linear (local)."""
    def table() -> MixingCoefficients:
        return MixingCoefficients(cfg.num_experts, cfg.num_basis, cfg.mixer, cfg.prior_strength)

    if cfg.scope == "global":
        return table()
    return nn.ModuleList(table() for _ in range(num_linears))


def forward_per_expert(expert_B: torch.Tensor, experts: Sequence[int],
                       forward_rows: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """A batch whose rows belong to several experts: `forward_rows(n, rows_R)` once per expert n on its rows,
    the outputs scattered back into batch order (None when `experts` is empty)."""
    out = None
    for n in experts:
        rows_R = (expert_B == n).nonzero().squeeze(1)
        out_R = forward_rows(n, rows_R)
        out = out_R.new_zeros((expert_B.shape[0], *out_R.shape[1:])) if out is None else out
        out = out.index_copy(0, rows_R, out_R)
    return out
