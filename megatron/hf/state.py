"""Reading a state dict tensor by tensor, so that a conversion uses every tensor exactly once: what it asks for
and is not there, and what is there and never asked for, are both one-line errors naming a tensor."""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


class Taker:
    """`take(name)` returns a tensor (in fp32, or as stored with `dtype=None`) and remembers it was used."""

    def __init__(self, state: State, what: str, dtype: torch.dtype | None = torch.float32):
        self.state, self.what, self.dtype, self.used = state, what, dtype, set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.state:
            raise ValueError(f"{name}: missing from the {self.what} weights")
        self.used.add(name)
        tensor = self.state[name]
        return tensor if self.dtype is None else tensor.to(self.dtype)

    def has(self, name: str) -> bool:
        return name in self.state

    def unused(self) -> list[str]:
        return sorted(set(self.state) - self.used)
