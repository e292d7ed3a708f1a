"""Image datasets (digits, a folder of PNGs, latents), the train/validation split and the batch schedule.

Shape legend: N images, C channels, H/W pixels, B batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.data import images
from megatron.data.images import (
    ImageDataset,
    batch_indices,
    build_image_dataset,
    digits_dataset,
    image_folder_dataset,
    latents_dataset,
)

pytest.importorskip("sklearn")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return digits_dataset()


def one_line(err: pytest.ExceptionInfo, *names: object) -> None:
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, message


def test_digits_are_1797_grey_8x8_in_minus_one_to_one(digits):
    from sklearn.datasets import load_digits

    assert len(digits) == 1797 and digits.images_NCHW.shape == (1797, 1, 8, 8)
    assert digits.images_NCHW.dtype == torch.float32 and digits.labels_N.dtype == torch.int64
    assert float(digits.images_NCHW.min()) == -1.0 and float(digits.images_NCHW.max()) == 1.0
    assert digits.num_classes == 10 and digits.labels_N.unique().tolist() == list(range(10))
    assert (digits.image_size, digits.channels) == (8, 1)
    raw = load_digits()
    torch.testing.assert_close(digits.images_NCHW[:, 0].double(), torch.from_numpy(raw.images) / 8 - 1)
    assert digits.labels_N.tolist() == raw.target.tolist()


def test_digits_upsampled(digits):
    for size in (16, 32):
        data = digits_dataset(size)
        assert data.images_NCHW.shape == (1797, 1, size, size) and data.image_size == size
        assert -1.0 <= float(data.images_NCHW.min()) and float(data.images_NCHW.max()) <= 1.0
    nearest = digits_dataset(16, upsample="nearest").images_NCHW
    assert torch.equal(nearest[:, :, ::2, ::2], digits.images_NCHW)  # each pixel became a 2x2 block
    assert torch.equal(nearest[:, :, 1::2, 1::2], digits.images_NCHW)
    with pytest.raises(ValueError, match="image_size 4"):
        digits_dataset(4)


def test_split_is_deterministic_disjoint_and_complete():
    data = ImageDataset(torch.arange(100.0).view(100, 1, 1, 1), torch.arange(100) % 7, 7)
    train, valid = data.split(0.2, seed=3)
    again_train, again_valid = data.split(0.2, seed=3)
    assert torch.equal(train.labels_N, again_train.labels_N) and torch.equal(valid.images_NCHW, again_valid.images_NCHW)
    train_ids, valid_ids = set(train.images_NCHW.flatten().tolist()), set(valid.images_NCHW.flatten().tolist())
    assert len(valid) == 20 and len(train) == 80
    assert not train_ids & valid_ids and train_ids | valid_ids == set(range(100))
    assert valid.num_classes == 7 and train.images_NCHW.flatten().tolist() == sorted(train_ids)  # original order
    assert set(data.split(0.2, seed=4)[1].images_NCHW.flatten().tolist()) != valid_ids


def write(path: Path, size: tuple[int, int], colour, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def test_image_folder_labels_from_sorted_names_and_pixel_values(tmp_path):
    write(tmp_path / "zebra" / "a.png", (10, 10), (255, 0, 0))
    write(tmp_path / "ant" / "b.PNG", (6, 6), (0, 128, 255))
    wide = Image.new("RGB", (12, 8), (0, 0, 0))
    wide.paste((255, 255, 255), (2, 0, 10, 8))  # black 2-pixel margins left and right: the centre crop is white
    wide.save(tmp_path / "ant" / "c.jpg", quality=100)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    write(tmp_path / ".hidden" / "d.png", (4, 4), (1, 2, 3))
    data = image_folder_dataset(tmp_path, image_size=4)
    assert data.images_NCHW.shape == (3, 3, 4, 4) and data.num_classes == 2
    assert data.labels_N.tolist() == [0, 0, 1]  # ant: b.PNG, c.jpg; zebra: a.png
    azure = torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]).view(3, 1, 1)
    torch.testing.assert_close(data.images_NCHW[0], azure.expand(3, 4, 4))
    assert data.images_NCHW[1].min() > 0.95  # the crop dropped the black margins (JPEG rounding aside)
    torch.testing.assert_close(data.images_NCHW[2], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 4, 4))
    grey = image_folder_dataset(tmp_path, image_size=2, channels=1)
    assert grey.images_NCHW.shape == (3, 1, 2, 2) and grey.channels == 1
    assert float(grey.images_NCHW[2].max()) == pytest.approx(76 / 127.5 - 1, abs=1e-6)  # Pillow's L of pure red: 76


def test_image_folder_errors_are_one_line_and_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        image_folder_dataset(tmp_path / "missing", 4)
    one_line(err, tmp_path / "missing", "not found")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as err:
        image_folder_dataset(tmp_path / "empty", 4)
    one_line(err, tmp_path / "empty", "no class subfolders")
    (tmp_path / "noimages" / "cls").mkdir(parents=True)
    (tmp_path / "noimages" / "cls" / "readme.md").write_text("hi")
    with pytest.raises(ValueError) as err:
        image_folder_dataset(tmp_path / "noimages", 4)
    one_line(err, tmp_path / "noimages" / "cls", "no image files")
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError) as err:
        image_folder_dataset(tmp_path / "bad", 4)
    one_line(err, tmp_path / "bad" / "cls" / "broken.png", "unreadable image")


def test_latents_load_and_shape_mismatch(tmp_path):
    latents = np.random.default_rng(0).standard_normal((5, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    np.save(tmp_path / "labels.npy", np.array([0, 2, 1, 2, 0]))
    data = latents_dataset(tmp_path / "latents.npy", tmp_path / "labels.npy")
    assert data.images_NCHW.shape == (5, 4, 8, 8) and data.num_classes == 3
    assert data.labels_N.tolist() == [0, 2, 1, 2, 0] and np.array_equal(data.images_NCHW.numpy(), latents)
    paths = str(tmp_path / "latents.npy"), str(tmp_path / "labels.npy")
    built = build_image_dataset("latents", paths[0], 8, 4, labels_path=paths[1])
    assert torch.equal(built.images_NCHW, data.images_NCHW)
    with pytest.raises(ValueError) as err:
        build_image_dataset("latents", paths[0], 16, 4, labels_path=paths[1])
    one_line(err, tmp_path / "latents.npy", "image_size 16")
    np.save(tmp_path / "short.npy", np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError) as err:
        latents_dataset(tmp_path / "latents.npy", tmp_path / "short.npy")
    one_line(err, tmp_path / "short.npy", "expected 5 integer labels")
    np.save(tmp_path / "flat.npy", latents.reshape(5, -1))
    with pytest.raises(ValueError) as err:
        latents_dataset(tmp_path / "flat.npy", tmp_path / "labels.npy")
    one_line(err, tmp_path / "flat.npy", "[N, C, H, W]")
    with pytest.raises(FileNotFoundError) as err:
        latents_dataset(tmp_path / "nope.npy", tmp_path / "labels.npy")
    one_line(err, tmp_path / "nope.npy")


def test_build_image_dataset_dispatch_and_errors(tmp_path):
    assert build_image_dataset("digits", None, 16, 1).images_NCHW.shape == (1797, 1, 16, 16)
    write(tmp_path / "only" / "x.png", (4, 4), (0, 0, 0))
    assert len(build_image_dataset("folder", str(tmp_path), 4, 3)) == 1
    with pytest.raises(ValueError, match="image_channels 3"):
        build_image_dataset("digits", None, 8, 3)
    with pytest.raises(ValueError, match="'cifar'"):
        build_image_dataset("cifar", None, 8, 3)


def stream(num_items: int, batch_size: int, steps: range, slots: int, seed: int = 0) -> list[int]:
    return [i for step in steps for slot in range(slots)
            for i in batch_indices(num_items, batch_size, step, slot, seed, slots_per_step=slots).tolist()]


def test_batch_indices_is_a_pure_function_covering_each_item_once_per_epoch():
    first = batch_indices(10, 3, 4, 1, 7, slots_per_step=2)
    assert first.dtype == torch.int64 and first.shape == (3,)
    batch_indices(23, 5, 0, 0, 1)  # other calls in between change nothing
    assert torch.equal(batch_indices(10, 3, 4, 1, 7, slots_per_step=2), first)
    for num_items in (10, 7):
        items = stream(num_items, 3, range(7 * num_items), 2)  # 6 per step: 42 epochs of items in total
        for epoch in range(42):
            assert sorted(items[epoch * num_items:(epoch + 1) * num_items]) == list(range(num_items))
    epochs = stream(10, 5, range(4), 1)
    assert epochs[:10] != epochs[10:20] and stream(10, 5, range(4), 1, seed=1) != epochs  # reshuffled; seeded
    assert len(batch_indices(4, 9, 0, 0, 0)) == 9  # a batch larger than the data spans epochs


def test_batch_indices_slot_layout_and_resume():
    # slot = micro_batch x world_size + rank: one rank with 2 micro-batches sees what 2 ranks with 1 see together
    one_rank = [batch_indices(50, 4, step, micro * 1 + 0, 3, slots_per_step=2) for step in range(3) for micro in (0, 1)]
    two_ranks = [batch_indices(50, 4, step, 0 * 2 + rank, 3, slots_per_step=2) for step in range(3) for rank in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(one_rank, two_ranks))
    # and the global batch is independent of the micro-batch split: 1 x 12 == 2 x 6 == 4 x 3
    assert stream(50, 12, range(9), 1) == stream(50, 6, range(9), 2) == stream(50, 3, range(9), 4)
    continuous = stream(50, 4, range(30), 2)
    images._epoch_order.cache_clear()  # a fresh process resuming at step 17
    assert stream(50, 4, range(17, 30), 2) == continuous[17 * 8:]
    with pytest.raises(ValueError, match="slot 2, expected 0 <= slot < slots_per_step 2"):
        batch_indices(50, 4, 0, 2, 0, slots_per_step=2)
