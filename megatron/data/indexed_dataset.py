"""GPT-NeoX's memory-mapped indexed dataset (`PREFIX.bin` + `PREFIX.idx`), byte for byte.

`.idx`: magic `MMIDIDX\\x00\\x00`, `<Q` version 1, `<B` dtype code, `<Q` item count, `<Q` doc_idx count,
int32 item sizes, int64 byte pointers into `.bin`, int64 doc_idx (0, then the item count at each
document end). `.bin`: the tokens of every item back to back.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float32, 7: np.float64, 8: np.uint16,
}


def code_of(dtype: DTypeLike) -> int:
    """The `<B` code NeoX stores for a dtype; other dtypes cannot be written in its format."""
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {dtype} has no GPT-NeoX dtype code")


def best_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 while every token id fits (NeoX's threshold), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dataset_exists(prefix: str) -> bool:
    """Both halves present: a dataset is only usable with its `.bin` and its `.idx`."""
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


class IndexedDatasetBuilder:
    """Streams items to `.bin`; `finalize` writes the `.idx`."""

    def __init__(self, bin_path: str, dtype: DTypeLike = np.uint16):
        self.dtype = np.dtype(dtype)
        code_of(self.dtype)  # fail before writing anything if NeoX cannot store this dtype
        self.bin_file = open(bin_path, "wb")
        self.sizes: list[int] = []
        self.doc_idx: list[int] = [0]

    def add_item(self, tokens: np.ndarray) -> None:
        """One item (NeoX allows several per document, e.g. sentences)."""
        array = np.asarray(tokens, dtype=self.dtype)
        self.bin_file.write(array.tobytes(order="C"))
        self.sizes.append(array.size)

    def end_document(self) -> None:
        """Closes the current document: doc_idx records how many items exist so far."""
        self.doc_idx.append(len(self.sizes))

    def add_document(self, tokens: np.ndarray) -> None:
        """The common case: one item that is a whole document."""
        self.add_item(tokens)
        self.end_document()

    def merge_file(self, prefix: str) -> None:
        """Appends another dataset (e.g. a worker's shard) of the same dtype."""
        other = MMapIndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{prefix}.idx: dtype {other.dtype} differs from the builder's {self.dtype}")
        offset = len(self.sizes)
        self.sizes.extend(int(s) for s in other.sizes)
        self.doc_idx.extend(offset + int(d) for d in other.doc_idx[1:])
        with open(f"{prefix}.bin", "rb") as f:
            while chunk := f.read(1 << 24):
                self.bin_file.write(chunk)

    def finalize(self, idx_path: str) -> None:
        """Closes `.bin` and writes the index; the dataset is complete once `.idx` exists."""
        self.bin_file.close()
        write_index(idx_path, self.dtype, self.sizes, self.doc_idx)


def write_index(idx_path: str, dtype: DTypeLike, sizes: list[int], doc_idx: list[int]) -> None:
    """Header, then sizes, byte pointers and doc_idx, exactly as NeoX's `MMapIndexedDataset.Index.writer`."""
    sizes_array = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        pointers[1:] = np.cumsum(sizes_array[:-1], dtype=np.int64) * np.dtype(dtype).itemsize
    with open(idx_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", code_of(dtype)))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes_array.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(doc_idx, dtype=np.int64).tobytes(order="C"))


class MMapIndexedDataset:
    """Reads items without loading the corpus into memory."""

    def __init__(self, prefix: str):
        idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
        for path in (idx_path, bin_path):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: dataset file does not exist")
        header = len(MAGIC) + 8 + 1 + 8 + 8
        with open(idx_path, "rb") as f:
            head = f.read(header)
        if head[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{idx_path}: not a GPT-NeoX mmap index (bad magic)")
        if len(head) < header:
            raise ValueError(f"{idx_path}: truncated index ({len(head)} bytes, shorter than its {header}-byte header)")
        version, code, count, doc_count = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != VERSION:
            raise ValueError(f"{idx_path}: index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = header + count * (4 + 8) + doc_count * 8
        if Path(idx_path).stat().st_size < expected:
            raise ValueError(f"{idx_path}: truncated index ({Path(idx_path).stat().st_size} bytes, "
                             f"expected {expected} for {count} items)")
        index = np.memmap(idx_path, mode="r", order="C")
        self.sizes = np.frombuffer(index, dtype=np.int32, count=count, offset=header)
        self.pointers = np.frombuffer(index, dtype=np.int64, count=count, offset=header + self.sizes.nbytes)
        self.doc_idx = np.frombuffer(
            index, dtype=np.int64, count=doc_count, offset=header + self.sizes.nbytes + self.pointers.nbytes
        )
        self._check_bin_size(idx_path, bin_path)
        self.tokens = np.memmap(bin_path, mode="r", dtype=self.dtype) if Path(bin_path).stat().st_size else (
            np.zeros(0, dtype=self.dtype))

    def _check_bin_size(self, idx_path: str, bin_path: str) -> None:
        """The .bin must end exactly where the index's last item ends, and every item must lie inside it: a
        half-copied .bin (or a damaged index) would otherwise give short slices past the end of the memory map,
        silently building samples from the wrong tokens."""
        expected = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if len(self.sizes) else 0
        actual = Path(bin_path).stat().st_size
        if actual != expected:
            kind = "truncated" if actual < expected else "longer than its index"
            raise ValueError(f"{bin_path}: {kind} ({actual} bytes, {idx_path} says {expected}): "
                             "re-copy or re-run tools/preprocess_data.py")
        chunk = 1 << 22  # items per pass: bounded temporary memory for indexes of billions of items
        for start in range(0, len(self.sizes), chunk):
            sizes, pointers = self.sizes[start:start + chunk], self.pointers[start:start + chunk]
            ends = pointers + sizes.astype(np.int64) * self.dtype.itemsize
            bad = np.flatnonzero((sizes < 0) | (pointers < 0) | (ends > actual))
            if len(bad):
                i = start + int(bad[0])
                raise ValueError(f"{idx_path}: item {i} (byte {int(self.pointers[i])}, {int(self.sizes[i])} tokens) "
                                 f"lies outside {bin_path} ({actual} bytes): a damaged index")
        doc_idx = self.doc_idx
        if len(doc_idx) and (doc_idx.min() < 0 or doc_idx.max() > len(self.sizes) or (np.diff(doc_idx) < 0).any()):
            raise ValueError(f"{idx_path}: document index not increasing within [0, {len(self.sizes)}]: "
                             "a damaged index")

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of item i, read without touching the rest of the item."""
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        length = int(self.sizes[i]) - offset if length is None else length
        return np.asarray(self.tokens[start:start + length])

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for a dataset of {len(self)} items")
        return self.get(i % len(self))
