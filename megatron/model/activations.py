"""Feed-forward activations, plain and gated, shared by the dense MLP, the experts, the shared experts and LoREs.

Shape legend: F the block's width (what the down-projection sees).

A gated activation (`swiglu`, `geglu`, `clamped_swiglu`) reads an up-projection twice the block's width,
`[..., 2F]`: the first half is the value and the second the gate, `value * act(gate)`, Megatron's and GPT-NeoX's
`x, gate = h.chunk(2, -1)` order, so the width F the down-projection sees stays the block's width.

gpt-oss's `clamped_swiglu` has two parameters (alpha, limit), so an activation is an `Activation`: the name and
its parameters, made once (GPTConfig.act) and handed to every block that applies it. The functions below take
either an `Activation` or a bare name (a name's parameters are the defaults).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PLAIN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
GATED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"swiglu": F.silu, "geglu": F.gelu}
CLAMPED = "clamped_swiglu"
NAMES = (*PLAIN, *GATED, CLAMPED)


def clamped_swiglu(value: torch.Tensor, gate: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gated unit: the gate clamped above at `limit`, the value to [-limit, limit], and
    `(value + 1) * gate * sigmoid(alpha * gate)` (the + 1 lets a zero value pass the gate's output through)."""
    gate = gate.clamp(max=limit)
    value = value.clamp(min=-limit, max=limit)
    return (value + 1) * (gate * torch.sigmoid(alpha * gate))


@dataclass(frozen=True)
class Activation:
    """An activation by name, with clamped_swiglu's parameters (unused by the other names)."""

    name: str
    alpha: float = 1.702  # clamped_swiglu: the gate's sigmoid slope (swiglu_alpha)
    limit: float = 7.0  # clamped_swiglu: the clamp (swiglu_limit)

    def __post_init__(self):
        if self.name not in NAMES:
            raise ValueError(f"activation: unknown {self.name!r} (expected one of {sorted(NAMES)})")
        if self.alpha <= 0 or self.limit <= 0:
            raise ValueError(f"swiglu_alpha {self.alpha} and swiglu_limit {self.limit} must be > 0")

    @property
    def gated(self) -> bool:
        return self.name in GATED or self.name == CLAMPED

    def up_width(self, width: int) -> int:
        return 2 * width if self.gated else width

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return PLAIN[self.name](h)
        value, gate = h.chunk(2, dim=-1)
        if self.name == CLAMPED:
            return clamped_swiglu(value, gate, self.alpha, self.limit)
        return value * GATED[self.name](gate)

    def __str__(self) -> str:
        return self.name


def as_activation(act: str | Activation) -> Activation:
    return act if isinstance(act, Activation) else Activation(act)


def is_gated(act: str | Activation) -> bool:
    return as_activation(act).gated


def up_width(act: str | Activation, width: int) -> int:
    """Output columns of the up-projection for a block of `width`: twice that for a gated activation."""
    return as_activation(act).up_width(width)


def activate(act: str | Activation, h: torch.Tensor) -> torch.Tensor:
    """`act(h)`, or for a gated activation `value * act(gate)` with `h = [value, gate]` on the last dim."""
    return as_activation(act)(h)
