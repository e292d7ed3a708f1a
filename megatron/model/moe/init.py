"""Weight draws shared by the expert-holding modules (experts.py, lore.py, megablocks.py), kept apart so that
none of them imports another just for its initialisation."""

from __future__ import annotations

import torch
import torch.nn as nn


def normal_init_slice(shape: tuple[int, ...], std: float, rows: range | None = None) -> torch.Tensor:
    """N(0, std^2) draws for the full `shape`, keeping only `rows` of dim 0 (this rank's experts).

    Drawing the full tensor and slicing it makes every layout start from the weights one rank would
    have: the same random stream, consumed the same way, whatever the expert-parallel size.
    """
    full = torch.empty(shape)
    nn.init.normal_(full, std=std)
    return full if rows is None or len(rows) == shape[0] else full[rows.start:rows.stop].clone()
