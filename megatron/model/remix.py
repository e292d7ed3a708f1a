"""Remix-DiT (Fang, Ma & Wang, NeurIPS 2024): N timestep experts mixed from K basis weights.

Shape legend: N experts, K basis models, L remixed linears of a model, O out features, I in features;
(ExpertSwitch) B batch, C/H/W image dims, R the rows of one expert.

Expert n serves the timesteps [floor(nT/N), floor((n+1)T/N)) and runs with W_n = sum_k c[n, k] W_k in every
remixed linear, where c is a learned [N, K] coefficient table. Mixing happens in weight space, so an expert's
forward costs one plain linear per layer (plus the mix), and `mixed_state_dict` exports any expert as a plain
DiT for inference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from megatron.model.dit import DiT

MIXERS = ("softmax", "raw", "oracle")
SCOPES = ("global", "local")
RAW_PRIOR_EPS = 1e-6  # the raw mixer's prior loss reads -log(max(c, eps)): finite for c <= 0


@dataclass
class RemixConfig:
    """Remix-DiT settings. `prior_strength` scales the one-hot prior in the softmax logits at init."""

    num_basis: int = 4  # K
    num_experts: int = 20  # N
    num_timesteps: int = 1000  # T
    mixer: str = "softmax"  # softmax | raw | oracle
    scope: str = "global"  # global: one table for the model; local: one table per remixed linear
    prior_strength: float = 3.0

    def __post_init__(self) -> None:
        if self.num_basis < 1:
            raise ValueError(f"remix num_basis: {self.num_basis} (expected >= 1)")
        if self.num_experts < 1:
            raise ValueError(f"remix num_experts: {self.num_experts} (expected >= 1)")
        if self.num_timesteps < self.num_experts:
            raise ValueError(f"remix num_timesteps: {self.num_timesteps} (expected >= num_experts "
                             f"{self.num_experts}, so that every expert has a timestep)")
        if self.mixer not in MIXERS:
            raise ValueError(f"remix mixer: {self.mixer!r} (expected one of {', '.join(MIXERS)})")
        if self.scope not in SCOPES:
            raise ValueError(f"remix scope: {self.scope!r} (expected one of {', '.join(SCOPES)})")
        if not (math.isfinite(self.prior_strength) and self.prior_strength >= 0):
            raise ValueError(f"remix prior_strength: {self.prior_strength} (expected a finite value >= 0)")


def timestep_interval(n: int, cfg: RemixConfig) -> tuple[int, int]:
    """Expert n's timesteps [lo, hi): N equal splits of [0, T) with integer boundaries floor(nT/N)."""
    if not 0 <= n < cfg.num_experts:
        raise ValueError(f"expert {n}: expected 0 <= n < num_experts {cfg.num_experts}")
    return n * cfg.num_timesteps // cfg.num_experts, (n + 1) * cfg.num_timesteps // cfg.num_experts


def expert_of_timestep(t: torch.Tensor | int, cfg: RemixConfig) -> torch.Tensor | int:
    """The expert whose interval holds t: the largest n with floor(nT/N) <= t, i.e. ((t + 1) N - 1) // T.

    (floor(tN/T) would disagree with `timestep_interval` when N does not divide T.)
    """
    N, T = cfg.num_experts, cfg.num_timesteps
    if isinstance(t, torch.Tensor):
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"timesteps: dtype {t.dtype} (expected integer timesteps in [0, {T}))")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
            raise ValueError(f"timesteps: range [{int(t.min())}, {int(t.max())}] (expected within [0, {T}))")
        return torch.div((t.long() + 1) * N - 1, T, rounding_mode="floor")
    if not 0 <= t < T:
        raise ValueError(f"timestep {t}: expected 0 <= t < {T}")
    return ((t + 1) * N - 1) // T


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


@torch.no_grad()
def mixed_state_dict(model: DiT, n: int) -> dict[str, torch.Tensor]:
    """Expert n as a plain DiT state dict (official names and shapes): every remixed weight precomputed."""
    if model.config.remix is None:
        raise ValueError("mixed_state_dict: the model is a plain DiT (config.remix is None), it has no experts")
    coeffs_LK = model.expert_coefficients(n)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("remix_coeffs.")}
    for name, coeffs_K in zip(model.remixed_layer_names(), coeffs_LK, strict=True):
        weight_OI, bias_O = model.get_submodule(name).mixed_weights(coeffs_K)
        state[f"{name}.weight"] = weight_OI
        if bias_O is not None:
            state[f"{name}.bias"] = bias_O
    return state


class ExpertSwitch(nn.Module):
    """A Remix-DiT as N plain DiTs, one per timestep interval: every expert's weights are mixed once, so a sampling
    step costs one plain DiT (no mixing per call), at N times a plain DiT's memory.

    `config` is the experts' plain DiTConfig (samplers read `config.num_classes`); `intervals[n]` is expert n's
    [lo, hi), contiguous from 0 to `num_timesteps`. Built from a model (`from_remix`) or from exported files
    (tools/export_remix_experts.py's `load_exported_experts`).
    """

    def __init__(self, experts: Sequence[DiT], intervals: Sequence[tuple[int, int]]):
        super().__init__()
        if not experts or len(experts) != len(intervals):
            raise ValueError(f"ExpertSwitch: {len(experts)} experts for {len(intervals)} intervals "
                             f"(expected as many, at least one)")
        for n, expert in enumerate(experts):
            if expert.config.remix is not None:
                raise ValueError(f"ExpertSwitch: expert {n} is a Remix-DiT (expected plain DiTs)")
            if expert.config != experts[0].config:
                raise ValueError(f"ExpertSwitch: expert {n}'s config {expert.config} differs from expert 0's "
                                 f"{experts[0].config}")
        previous_hi = 0
        for n, (lo, hi) in enumerate(intervals):
            if lo != previous_hi or hi <= lo:
                raise ValueError(f"ExpertSwitch: expert {n}'s interval [{lo}, {hi}) (expected [{previous_hi}, hi) "
                                 f"with hi > {previous_hi}: intervals contiguous from 0)")
            previous_hi = hi
        self.experts = nn.ModuleList(experts)
        self.config = experts[0].config
        self.intervals = [(int(lo), int(hi)) for lo, hi in intervals]
        self.num_timesteps = self.intervals[-1][1]
        # expert n holds bounds[n-1] <= t < bounds[n]: torch.bucketize(t, bounds, right=True)
        self.register_buffer("bounds", torch.tensor([hi for _, hi in self.intervals[:-1]], dtype=torch.long),
                             persistent=False)

    @classmethod
    @torch.no_grad()
    def from_remix(cls, model: DiT) -> ExpertSwitch:
        """Every expert of a Remix-DiT mixed into its own plain DiT (`mixed_state_dict`), on the model's device
        and dtype and in its train/eval mode."""
        from megatron.model.dit import DiT

        remix = model.config.remix
        if remix is None:
            raise ValueError("ExpertSwitch.from_remix: the model is a plain DiT (config.remix is None), it has no "
                             "experts")
        plain = dataclasses.replace(model.config, remix=None)
        experts = []
        for n in range(remix.num_experts):
            expert = DiT(plain)
            expert.load_state_dict(mixed_state_dict(model, n))
            experts.append(expert)
        weight = next(model.parameters())
        switch = cls(experts, [timestep_interval(n, remix) for n in range(remix.num_experts)])
        return switch.to(weight.device, weight.dtype).train(model.training)

    def expert_of(self, t_B: torch.Tensor) -> torch.Tensor:
        """[B] the expert whose interval holds each timestep."""
        if t_B.is_floating_point() or t_B.is_complex():
            raise ValueError(f"timesteps: dtype {t_B.dtype} (expected integer timesteps in [0, {self.num_timesteps}))")
        if t_B.numel() and (int(t_B.min()) < 0 or int(t_B.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps: range [{int(t_B.min())}, {int(t_B.max())}] (expected within "
                             f"[0, {self.num_timesteps}))")
        if len(self.experts) == 1:
            return torch.zeros_like(t_B, dtype=torch.long)
        return torch.bucketize(t_B.long(), self.bounds.to(t_B.device), right=True)

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(out [B, C_out, H, W], {}) as DiT.forward: a batch of one expert (a sampling step) runs that plain DiT
        alone; rows of several experts run as one forward per expert, scattered back."""
        expert_B = self.expert_of(t_B)
        experts = expert_B.unique().tolist() or [0]  # an empty batch goes through expert 0
        if len(experts) == 1:
            return self.experts[experts[0]](x_BCHW, t_B, y_B)[0], {}
        out = None
        for n in experts:
            rows_R = (expert_B == n).nonzero().squeeze(1)
            out_R, _ = self.experts[n](x_BCHW[rows_R], t_B[rows_R], y_B[rows_R])
            out = out_R.new_zeros((t_B.shape[0], *out_R.shape[1:])) if out is None else out
            out = out.index_copy(0, rows_R, out_R)
        return out, {}

    def forward_with_cfg(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """DiT.forward_with_cfg's convention: the batch is [conditional half; null-class half], only the first half
        of x is read, both output halves carry uncond + s (cond - uncond) on the first C channels and the variance
        channels (learn_sigma) pass through."""
        half = x_BCHW[: x_BCHW.shape[0] // 2]
        out, _ = self.forward(torch.cat([half, half]), t_B, y_B)
        C = self.config.in_channels
        cond_eps, uncond_eps = out[:, :C].chunk(2)
        guided_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided_eps, guided_eps]), out[:, C:]], dim=1)
