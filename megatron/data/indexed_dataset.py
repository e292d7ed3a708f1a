"""GPT-NeoX's memory-mapped indexed dataset (`PREFIX.bin` + `PREFIX.idx`), byte for byte.

`.idx`: magic `MMIDIDX\\x00\\x00`, `<Q` version 1, `<B` dtype code, `<Q` item count, `<Q` doc_idx count,
int32 item sizes, int64 byte pointers into `.bin`, int64 doc_idx (0, then the item count at each
document end). `.bin`: the tokens of every item back to back.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
CHUNK = 1 << 20  # entries per pass of the checks over the whole index: bounded memory for billions of items
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


def index_header(dtype: DTypeLike, items: int, doc_idx_entries: int) -> bytes:
    """The `.idx` header; the int32 sizes, int64 pointers and int64 doc_idx follow it (writers that stream
    billions of items, such as benchmarks/sample_index.py, write those in chunks)."""
    return MAGIC + struct.pack("<QBQQ", VERSION, code_of(dtype), items, doc_idx_entries)


def write_index(idx_path: str, dtype: DTypeLike, sizes: list[int], doc_idx: list[int]) -> None:
    """Header, then sizes, byte pointers and doc_idx, exactly as NeoX's `MMapIndexedDataset.Index.writer`."""
    sizes_array = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        pointers[1:] = np.cumsum(sizes_array[:-1], dtype=np.int64) * np.dtype(dtype).itemsize
    with open(idx_path, "wb") as f:
        f.write(index_header(dtype, len(sizes), len(doc_idx)))
        f.write(sizes_array.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(doc_idx, dtype=np.int64).tobytes(order="C"))


class MMapIndexedDataset:
    """Reads items without loading the corpus into memory: the index and the tokens are memory-mapped."""

    def __init__(self, prefix: str, check_items: bool = True):
        """Opens PREFIX.idx/.bin. The header and the .bin's size are always checked (O(1)); every item only with
        `check_items` (O(items)); the sample index opens without and runs `check_items()` on one rank only."""
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
        self.idx_path, self.bin_path = idx_path, bin_path
        self._offsets = {"sizes": header, "pointers": header + self.sizes.nbytes,
                         "doc_idx": header + self.sizes.nbytes + self.pointers.nbytes}
        self._check_bin_size()
        self.items_checked = False
        if check_items:
            self.check_items()
        self.tokens = np.memmap(bin_path, mode="r", dtype=self.dtype) if Path(bin_path).stat().st_size else (
            np.zeros(0, dtype=self.dtype))

    def _check_bin_size(self) -> None:
        """The .bin must end exactly where the index's last item ends: a half-copied .bin would otherwise give
        short slices past the end of the memory map, silently building samples from the wrong tokens. O(1)."""
        expected = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if len(self.sizes) else 0
        actual = Path(self.bin_path).stat().st_size
        if actual != expected:
            kind = "truncated" if actual < expected else "longer than its index"
            raise ValueError(f"{self.bin_path}: {kind} ({actual} bytes, {self.idx_path} says {expected}): "
                             "re-copy or re-run tools/preprocess_data.py")

    def check_items(self) -> None:
        """Every item lies inside the .bin and the document index increases: a damaged index is refused here,
        not read as wrong tokens. O(items) time in bounded chunks read from the file, not through the memory
        map, so a pass over billions of items leaves neither temporaries nor mapped pages in this process."""
        actual = Path(self.bin_path).stat().st_size
        for start, sizes in self.read_in_chunks("sizes"):
            pointers = self.read("pointers", start, start + len(sizes))
            ends = pointers + sizes.astype(np.int64) * self.dtype.itemsize
            bad = np.flatnonzero((sizes < 0) | (pointers < 0) | (ends > actual))
            if len(bad):
                i = start + int(bad[0])
                raise ValueError(f"{self.idx_path}: item {i} (byte {int(pointers[bad[0]])}, {int(sizes[bad[0]])} "
                                 f"tokens) lies outside {self.bin_path} ({actual} bytes): a damaged index")
        previous = 0  # doc_idx must run from >= 0 to <= the item count without decreasing
        for _, doc_idx in self.read_in_chunks("doc_idx"):
            if doc_idx[0] < previous or (np.diff(doc_idx) < 0).any() or doc_idx[-1] > len(self.sizes):
                raise ValueError(f"{self.idx_path}: document index not increasing within [0, {len(self.sizes)}]: "
                                 "a damaged index")
            previous = int(doc_idx[-1])
        self.items_checked = True

    def read(self, field: str, start: int, stop: int) -> np.ndarray:
        """A private copy of `field` ("sizes", "pointers" or "doc_idx") entries start:stop, read from the file."""
        dtype = np.dtype(np.int32 if field == "sizes" else np.int64)
        with open(self.idx_path, "rb") as f:
            f.seek(self._offsets[field] + start * dtype.itemsize)
            return np.fromfile(f, dtype=dtype, count=stop - start)

    def read_in_chunks(self, field: str) -> Iterator[tuple[int, np.ndarray]]:
        """(first entry, entries) of the whole `field`, CHUNK entries at a time: bounded memory."""
        total = len(getattr(self, field))
        for first in range(0, total, CHUNK):
            yield first, self.read(field, first, min(first + CHUNK, total))

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
