"""PNG grids of images in [-1, 1], to look at what a generator draws.

Shape legend: N images, C channels (1 or 3), H/W pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from megatron.runtime import optional_import

MIN_VISIBLE_SIDE = 32  # tiny images are enlarged (nearest neighbour, integer factor) to at least this many pixels


def save_image_grid(images_NCHW: torch.Tensor | np.ndarray, path: str | Path, nrow: int = 8, padding: int = 2,
                    scale: int | None = None, pad_value: float = 0.0) -> Path:
    """Writes the images as one PNG, `nrow` images per row, and returns its path; parent folders are created.

    Each image is enlarged by the integer `scale` (default: the smallest making its longer side at least
    MIN_VISIBLE_SIDE, so 8x8 digits become 32x32) and the cells are separated by `padding` pixels of
    `pad_value` (in [-1, 1]; the default 0 is mid-gray, which stands apart from both black and white
    backgrounds). The grid is (rows * H * scale + (rows + 1) * padding) by (cols * W * scale + (cols + 1) *
    padding) pixels, with cols = min(nrow, N). Values outside [-1, 1] are clipped, NaNs shown as black.
    """
    x_NCHW = images_NCHW.detach().cpu().float().numpy() if isinstance(images_NCHW, torch.Tensor) \
        else np.asarray(images_NCHW, dtype=np.float32)
    if x_NCHW.ndim != 4 or x_NCHW.shape[1] not in (1, 3) or x_NCHW.shape[0] == 0:
        raise ValueError(f"save_image_grid: images must be [N >= 1, C in (1, 3), H, W], got {x_NCHW.shape}")
    if nrow < 1 or padding < 0 or (scale is not None and scale < 1):
        raise ValueError(f"save_image_grid: nrow {nrow} and scale {scale} must be >= 1, padding {padding} >= 0")
    n, c, h, w = x_NCHW.shape
    scale = scale if scale is not None else max(1, math.ceil(MIN_VISIBLE_SIDE / max(h, w)))
    pixels_NCHW = _to_uint8(np.nan_to_num(x_NCHW, nan=-1.0))
    pixels_NCHW = pixels_NCHW.repeat(scale, axis=2).repeat(scale, axis=3)
    cols, rows = min(nrow, n), math.ceil(n / min(nrow, n))
    cell_h, cell_w = h * scale + padding, w * scale + padding
    grid_CHW = np.full((c, rows * cell_h + padding, cols * cell_w + padding), _to_uint8(np.float32(pad_value)),
                       dtype=np.uint8)
    for i in range(n):
        top, left = padding + (i // cols) * cell_h, padding + (i % cols) * cell_w
        grid_CHW[:, top:top + h * scale, left:left + w * scale] = pixels_NCHW[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Pillow infers the mode from the array: [H, W] uint8 is "L", [H, W, 3] uint8 is "RGB"
    Image = optional_import("PIL.Image", "dit", "image grids")
    Image.fromarray(grid_CHW[0] if c == 1 else np.ascontiguousarray(grid_CHW.transpose(1, 2, 0))).save(path, "PNG")
    return path


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] to 0..255, rounded to nearest; -1 is black, 1 white."""
    return np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
