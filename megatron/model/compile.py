"""Regional `torch.compile`: each block's fixed-shape parts compiled in place, the MoE experts left eager.

Why regions and not the whole model: every block has the same structure, and with torch's default
`inline_inbuilt_nn_modules` parameters are graph inputs, so one compiled graph per kind of region serves every
layer and compile time does not grow with depth. Why the experts stay eager: their row counts per expert change
every step (dropless routing), and the dispatch reads them on the host; compiling them would recompile or
graph-break on every new count. The router sees a fixed [T, E] shape, so it is compiled.

Never the `Block` itself: FSDP2 and activation checkpointing hook blocks, and those hooks must stay outside
the compiled graphs.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def compile_regions(model: nn.Module, dynamic: bool | None = None) -> list[str]:
    """Compiles, in place, every block's attention, norms and dense MLP and every MoE router (the multi-token
    prediction modules' blocks too); returns their names.

    `dynamic=None` lets torch mark a dimension dynamic once it has seen it change (evaluation batches).
    """
    from megatron.model.moe import MoELayer

    blocks = [(f"blocks.{index}", block) for index, block in enumerate(model.blocks)]
    blocks += [(f"mtp.{index}.block", module.block) for index, module in enumerate(getattr(model, "mtp", ()))]
    compiled = []
    for prefix, block in blocks:
        for name, child in block.named_children():
            if isinstance(child, MoELayer):
                child.router.compile(dynamic=dynamic)
                compiled.append(f"{prefix}.{name}.router")
            elif isinstance(child, nn.Dropout) or not any(True for _ in child.parameters()):
                continue
            else:
                child.compile(dynamic=dynamic)
                compiled.append(f"{prefix}.{name}")
    return compiled


def compile_wanted(setting: str, device: torch.device) -> bool:
    """`torch_compile: auto` compiles on CUDA only: on CPUs the measured gain does not pay for the compile time
    of a short run (docs/performance.md)."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"
