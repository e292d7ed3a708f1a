"""Rotary position embeddings and their frequency scalings (Llama-3.1's, YaRN's).

Shape legend: B batch, H heads, S sequence, Dh head dim, R rotary dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


def plain_inv_freq(base: float, dims: int) -> torch.Tensor:
    """RoPE's frequencies: pair i of `dims` rotated dims turns at base^(-2i / dims) radians per position."""
    return 1.0 / (base ** (torch.arange(0, dims, 2).float() / dims))


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1's RoPE scaling. A rotary frequency whose wavelength exceeds original_max / low_freq_factor is
    divided by `factor`; one shorter than original_max / high_freq_factor is kept; between, the two are blended
    linearly in original_max / wavelength."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def scale(self, inv_freq: torch.Tensor) -> torch.Tensor:
        wavelength = 2 * math.pi / inv_freq
        context = self.original_max_position_embeddings
        blend = (context / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - blend) * inv_freq / self.factor + blend * inv_freq
        scaled = torch.where(wavelength > context / self.low_freq_factor, inv_freq / self.factor, blended)
        return torch.where(wavelength < context / self.high_freq_factor, inv_freq, scaled)

    def inv_freq(self, base: float, dims: int) -> torch.Tensor:
        """The scaled frequencies of `dims` rotated dims (dims / 2 pairs)."""
        return self.scale(plain_inv_freq(base, dims))

    def attention_factor(self) -> float:
        """What cos and sin are multiplied by: Llama-3.1's scaling leaves them as they are."""
        return 1.0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched `factor` times: 0.1 mscale ln(factor) + 1 (1 unstretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN's RoPE scaling (DeepSeek-V3, gpt-oss). Over the original context, rotary pair i turns
    original_max / wavelength_i times; pairs turning fewer than beta_slow times are interpolated (divided by
    `factor`), ones turning more than beta_fast times are kept, and a linear ramp in the pair index blends between
    (its ends rounded out to whole pairs when `truncate`). cos and sin are multiplied by attention_factor(), so the
    logits grow by its square, which offsets the flatter attention of a longer context."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    def inv_freq(self, base: float, dims: int) -> torch.Tensor:
        """The scaled frequencies of `dims` rotated dims (dims / 2 pairs)."""
        pos_freqs = base ** (torch.arange(0, dims, 2).float() / dims)
        low, high = self.correction_range(base, dims)
        if low == high:
            high += 0.001  # a step, not a division by zero
        ramp = ((torch.arange(dims // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        kept = 1 - ramp  # 1: the pair turns fast enough to keep its frequency, 0: interpolated
        return 1.0 / (self.factor * pos_freqs) * (1 - kept) + 1.0 / pos_freqs * kept

    def correction_range(self, base: float, dims: int) -> tuple[float, float]:
        """The pair indices where the pairs turn beta_fast and beta_slow times over the original context: pair i
        has wavelength 2 pi base^(2i / dims), so it turns `r` times at i = dims ln(L / (2 pi r)) / (2 ln base)."""
        def pair(turns: float) -> float:
            context = self.original_max_position_embeddings
            return dims * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(base))

        low, high = pair(self.beta_fast), pair(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dims - 1)

    def attention_factor(self) -> float:
        """What cos and sin are multiplied by (transformers' attention_factor): mscale(factor, mscale) /
        mscale(factor, mscale_all_dim) when both are set, else mscale(factor)."""
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def mla_softmax_scale_factor(self) -> float:
        """What multi-head latent attention multiplies its softmax scale 1/sqrt(d_qk) by (DeepSeek-V3):
        mscale(factor, mscale_all_dim)^2, 1 when mscale_all_dim is 0."""
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


class Rotary(nn.Module):
    """Rotary embedding on the first `rotary_pct` of each head's dims (GPT-NeoX's rotate-half form)."""

    def __init__(self, head_dim: int, rotary_pct: float, base: int, max_positions: int,
                 scaling: Llama3RopeScaling | YarnRopeScaling | None = None):
        super().__init__()
        self.rotary_dims = int(head_dim * rotary_pct) // 2 * 2
        if scaling is None:
            inv_freq, magnitude = plain_inv_freq(base, self.rotary_dims), 1.0
        else:
            inv_freq, magnitude = scaling.inv_freq(base, self.rotary_dims), scaling.attention_factor()
        angles_SR = torch.outer(torch.arange(max_positions).float(), inv_freq)
        angles_SR = torch.cat([angles_SR, angles_SR], dim=-1)
        # YaRN's attention factor scales the rotated dims of queries and keys alike (transformers scales cos, sin)
        self.register_buffer("cos_SR", angles_SR.cos() * magnitude, persistent=False)
        self.register_buffer("sin_SR", angles_SR.sin() * magnitude, persistent=False)

    def forward(self, x_BHSDh: torch.Tensor, start: int = 0, positions_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Rotates the S positions from `start` on (start > 0: new tokens after a cache), or each row's own
        `positions_BS` (padded rows)."""
        r = self.rotary_dims
        if r == 0:
            return x_BHSDh
        x_rot, x_pass = x_BHSDh[..., :r], x_BHSDh[..., r:]
        if positions_BS is None:
            stop = start + x_BHSDh.shape[-2]
            cos, sin = self.cos_SR[start:stop], self.sin_SR[start:stop]
        else:  # [B, 1, S, R]: one table row per token, broadcast over heads
            cos, sin = self.cos_SR[positions_BS].unsqueeze(1), self.sin_SR[positions_BS].unsqueeze(1)
        cos, sin = cos.to(x_rot.dtype), sin.to(x_rot.dtype)
        half1, half2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat([-half2, half1], dim=-1)
        return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)
