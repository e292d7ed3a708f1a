"""The FLOPs torch's FlopCounterMode does not count itself, by their definition: pass COUNTED as its
custom_mapping (the experts' grouped matmuls, the in-place CPU LoRE accumulation)."""

import torch


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """[N, K] rows against [G, K, O] weights, each row with its group's: 2 N K O."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def addmm_flops(out_shape_in, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """out += a @ b, in place (the CPU LoRE accumulation loop), which FlopCounterMode does not count itself."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


COUNTED = {torch.ops.aten._grouped_mm: grouped_mm_flops, torch.ops.aten.addmm_: addmm_flops}
