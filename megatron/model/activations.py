"""Feed-forward activations, plain and gated, shared by the dense MLP and the experts.

A gated activation (`swiglu`, `geglu`) reads an up-projection twice the block's width, `[..., 2F]`:
the first half is the value and the second the gate, `value * act(gate)`, Megatron's and GPT-NeoX's
`x, gate = h.chunk(2, -1)` order, so the width F the down-projection sees stays the block's width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PLAIN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
GATED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"swiglu": F.silu, "geglu": F.gelu}


def is_gated(name: str) -> bool:
    if name not in PLAIN and name not in GATED:
        raise ValueError(f"activation: unknown {name!r} (expected one of {sorted({**PLAIN, **GATED})})")
    return name in GATED


def up_width(name: str, width: int) -> int:
    """Output columns of the up-projection for a block of `width`: twice that for a gated activation."""
    return 2 * width if is_gated(name) else width


def activate(name: str, h: torch.Tensor) -> torch.Tensor:
    """`act(h)`, or for a gated activation `value * act(gate)` with `h = [value, gate]` on the last dim."""
    if name in GATED:
        value, gate = h.chunk(2, dim=-1)
        return value * GATED[name](gate)
    return PLAIN[name](h)
