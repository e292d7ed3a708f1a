"""Rotary position embeddings and their frequency scalings (Llama-3.1's; more as families need them).

Shape legend: B batch, H heads, S sequence, Dh head dim, R rotary dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


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



class Rotary(nn.Module):
    """Rotary embedding on the first `rotary_pct` of each head's dims (GPT-NeoX's rotate-half form)."""

    def __init__(self, head_dim: int, rotary_pct: float, base: int, max_positions: int,
                 scaling: Llama3RopeScaling | None = None):
        super().__init__()
        self.rotary_dims = int(head_dim * rotary_pct) // 2 * 2
        inv_freq = 1.0 / (base ** (torch.arange(0, self.rotary_dims, 2).float() / self.rotary_dims))
        if scaling is not None:
            inv_freq = scaling.scale(inv_freq)
        angles_SR = torch.outer(torch.arange(max_positions).float(), inv_freq)
        angles_SR = torch.cat([angles_SR, angles_SR], dim=-1)
        self.register_buffer("cos_SR", angles_SR.cos(), persistent=False)
        self.register_buffer("sin_SR", angles_SR.sin(), persistent=False)

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
