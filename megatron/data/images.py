"""Image datasets for the DiT family (scikit-learn's 8x8 digits, a folder of class subfolders, pre-encoded
latents) and the deterministic batch schedule.

Shape legend: N images, C channels, H/W pixels (H == W == image_size), B batch.

A dataset is held in memory: pixels as float32 in [-1, 1], latents as encoded. Large image sets belong in
latents (4x32x32 per 256-pixel image), not in a folder read whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megatron.runtime import optional_import

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class ImageDataset:
    images_NCHW: torch.Tensor  # float32; pixels in [-1, 1]
    labels_N: torch.Tensor  # int64 in [0, num_classes)
    num_classes: int

    def __post_init__(self) -> None:
        shape = list(self.images_NCHW.shape)
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ValueError(f"images shape {shape}: expected [N, C, H, W] with H == W")
        if list(self.labels_N.shape) != shape[:1]:
            raise ValueError(f"labels shape {list(self.labels_N.shape)}: expected [{shape[0]}], one per image")

    @property
    def image_size(self) -> int:
        return self.images_NCHW.shape[-1]

    @property
    def channels(self) -> int:
        return self.images_NCHW.shape[1]

    def __len__(self) -> int:
        return self.images_NCHW.shape[0]

    def subset(self, index_N: torch.Tensor) -> ImageDataset:
        return ImageDataset(self.images_NCHW[index_N], self.labels_N[index_N], self.num_classes)

    def split(self, valid_fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """(train, valid): the first round(N x fraction) items of a permutation seeded by `seed` validate, the
        rest train; each part keeps the original order, so the split is a fixed function of (N, fraction, seed)."""
        if not 0 <= valid_fraction < 1:
            raise ValueError(f"valid fraction {valid_fraction}: expected 0 <= fraction < 1")
        order_N = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        num_valid = round(len(self) * valid_fraction)
        return self.subset(order_N[num_valid:].sort().values), self.subset(order_N[:num_valid].sort().values)


def digits_dataset(image_size: int = 8, upsample: str = "bilinear") -> ImageDataset:
    """scikit-learn's 1797 handwritten digits (8x8, grey levels 0..16, shipped in its wheel), 10 classes, 1 channel,
    levels mapped linearly to [-1, 1]. Larger sizes by F.interpolate: bilinear (align_corners=False, the default:
    smooth strokes, values stay in [-1, 1]) or nearest (blocky, exact levels)."""
    if image_size < 8:
        raise ValueError(f"digits: image_size {image_size}: expected >= 8 (the digits are 8x8)")
    if upsample not in ("bilinear", "nearest"):
        raise ValueError(f"digits: upsample {upsample!r}: expected 'bilinear' or 'nearest'")
    digits = optional_import("sklearn.datasets", "dit", "image_dataset: digits").load_digits()
    images_NCHW = torch.from_numpy(digits.images).float()[:, None] / 8.0 - 1.0
    if image_size != 8:
        align = False if upsample == "bilinear" else None
        images_NCHW = F.interpolate(images_NCHW, size=(image_size, image_size), mode=upsample, align_corners=align)
    return ImageDataset(images_NCHW.contiguous(), torch.from_numpy(digits.target).long(), 10)


def load_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """[C, S, S] in [-1, 1]: the centred square crop of the image, resized by Pillow's bicubic (which filters
    when shrinking); 1 channel is Pillow's "L" luminance, 3 is RGB."""
    Image = optional_import("PIL.Image", "dit", "image_dataset: folder")
    try:
        with Image.open(path) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: unreadable image file ({type(err).__name__})") from err
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((image_size, image_size),
                                                                    Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1).copy())


def image_folder_dataset(root: str | Path, image_size: int, channels: int = 3) -> ImageDataset:
    """root/<class>/<image files>: classes are the sorted subfolder names (label = position), images are the files
    directly in each subfolder with an extension in IMAGE_EXTENSIONS (any case), read in sorted order."""
    root = Path(root)
    if channels not in (1, 3):
        raise ValueError(f"image folder {root}: channels {channels}, expected 1 (grey) or 3 (RGB)")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root}: not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root}: no class subfolders (expected {root}/<class>/<image files>)")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"image folder {root / name}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        images += [load_image(path, image_size, channels) for path in files]
        labels += [label] * len(files)
    return ImageDataset(torch.stack(images), torch.tensor(labels, dtype=torch.long), len(classes))


def _load_npy(path: str | Path) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npy file ({type(err).__name__})") from err


def latents_dataset(path_npy: str | Path, labels_npy: str | Path, num_classes: int | None = None) -> ImageDataset:
    """Pre-encoded latents [N, C, H, W] (float) and their integer labels [N]; num_classes defaults to max + 1.

    Make them on a GPU machine with a Stable-Diffusion VAE, as DiT does: `vae = diffusers.AutoencoderKL.
    from_pretrained("stabilityai/sd-vae-ft-ema")`, images centre-cropped and scaled to [-1, 1], then
    `latents = vae.encode(x).latent_dist.sample() * 0.18215` (256-pixel RGB -> 4x32x32), and
    `np.save("latents.npy", latents.cpu().numpy())`, `np.save("labels.npy", labels)`. Sample with
    clip_denoised=False (latents are not confined to [-1, 1]) and decode with `vae.decode(z / 0.18215)`.
    """
    latents, labels = _load_npy(path_npy), _load_npy(labels_npy)
    if latents.ndim != 4 or not np.issubdtype(latents.dtype, np.floating):
        raise ValueError(f"{path_npy}: {latents.dtype} of shape {list(latents.shape)}, expected float [N, C, H, W]")
    if labels.shape != latents.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{labels_npy}: {labels.dtype} of shape {list(labels.shape)}, expected {latents.shape[0]} "
                         f"integer labels, one per latent of {path_npy}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{labels_npy}: label {labels.min()} is negative")
    found = int(labels.max()) + 1 if labels.size else 0
    if num_classes is not None and found > num_classes:
        raise ValueError(f"{labels_npy}: label {found - 1} >= num_classes {num_classes}")
    return ImageDataset(torch.from_numpy(latents).float(), torch.from_numpy(labels).long(), num_classes or found)


def build_image_dataset(kind: str, path: str | None, image_size: int, channels: int,
                        labels_path: str | None = None) -> ImageDataset:
    """kind "digits" (path unused), "folder" (path: root of class subfolders) or "latents" (path: the latents
    .npy, labels_path: the labels .npy); checks the data's size and channels against the arguments."""
    if kind == "digits":
        if channels != 1:
            raise ValueError(f"image_dataset digits: image_channels {channels}, expected 1 (grey digits)")
        return digits_dataset(image_size)
    if kind == "folder":
        if path is None:
            raise ValueError("image_dataset folder: image_path is required (a folder of class subfolders)")
        return image_folder_dataset(path, image_size, channels)
    if kind == "latents":
        if path is None or labels_path is None:
            raise ValueError("image_dataset latents: image_path (latents .npy) and image_labels_path are required")
        data = latents_dataset(path, labels_path)
        if data.image_size != image_size or data.channels != channels:
            raise ValueError(f"{path}: latents are {data.channels}x{data.image_size}x{data.image_size}, expected "
                             f"image_channels {channels} and image_size {image_size}")
        return data
    raise ValueError(f"image_dataset {kind!r}: expected one of digits, folder, latents")


@functools.lru_cache(maxsize=4)
def _epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of epoch `epoch` (cached: consecutive calls mostly share an epoch; never mutated)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63))


def batch_indices(num_items: int, batch_size: int, step: int, slot: int, seed: int,
                  slots_per_step: int = 1) -> torch.Tensor:
    """[batch_size] int64 indices of the micro-batch `slot` of global step `step`: a pure function, no iterator.

    The data is an endless stream of epochs, each a permutation seeded by (seed, epoch); global step s takes
    the next slots_per_step x batch_size items of it, and slot k the k-th consecutive block of those (a batch
    may straddle two epochs). So every item is seen once per epoch, a resumed run needs only the step, and
    the global batch depends only on slots_per_step = global batch / micro batch, not on how slots are
    spread over ranks and accumulation steps (any numbering of the slots 0..slots_per_step-1 will do).
    """
    if num_items < 1 or batch_size < 1 or step < 0:
        raise ValueError(f"batch_indices: num_items {num_items}, batch_size {batch_size}, step {step}: expected "
                         "num_items >= 1, batch_size >= 1, step >= 0")
    if not 0 <= slot < slots_per_step:
        raise ValueError(f"batch_indices: slot {slot}, expected 0 <= slot < slots_per_step {slots_per_step} "
                         "(pass slots_per_step = global batch / micro batch)")
    start = (step * slots_per_step + slot) * batch_size
    positions_B = torch.arange(start, start + batch_size)
    epochs_B = positions_B // num_items
    index_B = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs_B.unique().tolist():
        in_epoch_B = epochs_B == epoch
        index_B[in_epoch_B] = _epoch_order(num_items, seed, epoch)[positions_B[in_epoch_B] % num_items]
    return index_B
