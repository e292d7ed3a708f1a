"""The mmap indexed dataset against GPT-NeoX's byte layout, built by hand with struct.pack."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    IndexedDatasetBuilder,
    MMapIndexedDataset,
    best_dtype,
    dataset_exists,
)


def expected_idx(code: int, sizes: list[int], itemsize: int, doc_idx: list[int]) -> bytes:
    """NeoX's `.idx` written field by field, independent of the module under test."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", s) for s in sizes)
    pointer = 0
    for s in sizes:
        out += struct.pack("<q", pointer)
        pointer += s * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_idx)
    return out


def test_bytes_match_neox_layout_uint16(tmp_path: Path) -> None:
    docs = [[5, 6, 7], [65000], [1, 2, 3, 4, 0]]
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16)
    for doc in docs:
        builder.add_document(np.array(doc))
    builder.finalize(str(tmp_path / "d.idx"))
    assert (tmp_path / "d.idx").read_bytes() == expected_idx(8, [3, 1, 5], 2, [0, 1, 2, 3])
    flat = [t for doc in docs for t in doc]
    assert (tmp_path / "d.bin").read_bytes() == struct.pack(f"<{len(flat)}H", *flat)


def test_bytes_match_with_several_items_per_document_int32(tmp_path: Path) -> None:
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.int32)
    builder.add_item(np.array([100000, 1]))
    builder.add_item(np.array([2]))
    builder.end_document()
    builder.add_item(np.array([3, 4, 5]))
    builder.end_document()
    builder.finalize(str(tmp_path / "d.idx"))
    assert (tmp_path / "d.idx").read_bytes() == expected_idx(4, [2, 1, 3], 4, [0, 2, 3])
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<6i", 100000, 1, 2, 3, 4, 5)
    data = MMapIndexedDataset(str(tmp_path / "d"))
    assert data.doc_idx.tolist() == [0, 2, 3]
    assert data[0].tolist() == [100000, 1]


def test_round_trip_and_partial_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, size=n) for n in (1, 17, 0, 300, 2)]
    builder = IndexedDatasetBuilder(str(tmp_path / "r.bin"), best_dtype(50000))
    for doc in docs:
        builder.add_document(doc)
    builder.finalize(str(tmp_path / "r.idx"))
    assert dataset_exists(str(tmp_path / "r"))
    data = MMapIndexedDataset(str(tmp_path / "r"))
    assert len(data) == 5
    assert data.sizes.tolist() == [1, 17, 0, 300, 2]
    assert data.doc_idx.tolist() == [0, 1, 2, 3, 4, 5]
    for i, doc in enumerate(docs):
        assert data[i].tolist() == doc.tolist()
    assert data.get(3, offset=10, length=5).tolist() == docs[3][10:15].tolist()
    assert data.get(3, offset=290).tolist() == docs[3][290:].tolist()
    assert data[-1].tolist() == docs[-1].tolist()
    with pytest.raises(IndexError, match="out of range"):
        data[5]


def test_best_dtype_threshold() -> None:
    assert best_dtype(50257) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(128256) == np.int32


def test_merge_file_appends_shards(tmp_path: Path) -> None:
    for name, docs in (("a", [[1, 2], [3]]), ("b", [[4, 5, 6]])):
        builder = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), np.uint16)
        for doc in docs:
            builder.add_document(np.array(doc))
        builder.finalize(str(tmp_path / f"{name}.idx"))
    merged = IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16)
    merged.merge_file(str(tmp_path / "a"))
    merged.merge_file(str(tmp_path / "b"))
    merged.finalize(str(tmp_path / "m.idx"))
    assert (tmp_path / "m.idx").read_bytes() == expected_idx(8, [2, 1, 3], 2, [0, 1, 2, 3])
    assert (tmp_path / "m.bin").read_bytes() == struct.pack("<6H", 1, 2, 3, 4, 5, 6)
    wrong = IndexedDatasetBuilder(str(tmp_path / "w.bin"), np.int32)
    with pytest.raises(ValueError, match="a.idx: dtype"):
        wrong.merge_file(str(tmp_path / "a"))


def test_bad_files_give_one_line_errors(tmp_path: Path) -> None:
    prefix = str(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"x\.idx: dataset file does not exist"):
        MMapIndexedDataset(prefix)
    assert not dataset_exists(prefix)
    (tmp_path / "x.bin").write_bytes(b"")
    (tmp_path / "x.idx").write_bytes(b"NOTMAGIC!" + bytes(30))
    with pytest.raises(ValueError, match="bad magic") as err:
        MMapIndexedDataset(prefix)
    assert "\n" not in str(err.value)
    (tmp_path / "x.idx").write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 2, 8, 0, 1))
    with pytest.raises(ValueError, match="version 2, expected 1"):
        MMapIndexedDataset(prefix)
    (tmp_path / "x.idx").write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 9, 0, 1))
    with pytest.raises(ValueError, match="unknown dtype code 9"):
        MMapIndexedDataset(prefix)
    (tmp_path / "x.idx").write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 4, 5))
    with pytest.raises(ValueError, match="truncated index"):
        MMapIndexedDataset(prefix)
    with pytest.raises(ValueError, match="no GPT-NeoX dtype code"):
        IndexedDatasetBuilder(str(tmp_path / "y.bin"), np.uint32)


@pytest.mark.parametrize("keep_fraction, extra", [(0.5, 0), (0.0, 0), (1.0, 2)])
def test_bin_size_must_match_the_index(tmp_path: Path, keep_fraction: float, extra: int) -> None:
    """A half-copied .bin (or one with bytes the index does not know) is refused at open, naming both sizes."""
    sizes = [5, 3, 7]
    tokens = np.arange(sum(sizes), dtype=np.uint16)
    (tmp_path / "d.idx").write_bytes(expected_idx(8, sizes, 2, [0, 3]))
    full = tokens.tobytes()
    (tmp_path / "d.bin").write_bytes(full)
    assert MMapIndexedDataset(str(tmp_path / "d")).get(2).tolist() == tokens[8:].tolist()  # intact: opens
    damaged = full[: int(len(full) * keep_fraction)] + bytes(extra)
    (tmp_path / "d.bin").write_bytes(damaged)
    kind = "truncated" if extra == 0 else "longer than its index"
    with pytest.raises(ValueError, match=rf"d\.bin: {kind} \({len(damaged)} bytes, .*d\.idx says {len(full)}\)"):
        MMapIndexedDataset(str(tmp_path / "d"))
