"""Fixed-length training samples over an indexed dataset, shuffled and cached as in GPT-NeoX.

A split's documents are laid end to end (reshuffled every epoch) into one token stream; sample i is
the window of `seq_length + 1` tokens starting at `i * seq_length`, so neighbouring samples share one
token (the last target of one is the first input of the next). Samples are visited in a shuffled
order. The three index arrays are cached as `.npy` beside the data and reused.

At scale (docs/parallelism.md, "The data index at scale"): one rank builds each index (global rank 0; where
the other ranks cannot see its files, each node's local rank 0), the others wait and never build, and every
rank memory-maps the cached files. A split is a range of document ids and the cache key is computed by one
rank in bounded chunks, so no rank other than the builder holds memory that grows with the corpus.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch.distributed as dist

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.parallel.distributed import ranks_from_env

log = logging.getLogger("megatron.data")

T = TypeVar("T")
Documents = range | np.ndarray  # the document ids of a split: a range, or (tests, explicit lists) an array


def split_documents(num_documents: int, split: str) -> list[range]:
    """`"969,30,1"` -> three consecutive ranges of document ids in those proportions (NeoX's rule).

    Ranges, not arrays: a split of a billion documents costs nothing to hold on every rank.
    """
    weights = np.array([float(w) for w in split.replace("/", ",").split(",") if w.strip()])
    if len(weights) != 3 or weights.min() < 0 or weights.sum() <= 0:
        raise ValueError(f"split: expected three non-negative weights like '969,30,1', got {split!r}")
    bounds = np.round(np.concatenate([[0.0], np.cumsum(weights / weights.sum())]) * num_documents).astype(int)
    return [range(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]


# where the index arrays go when the data's own folder cannot be written (read-only storage)
FALLBACK_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron" / "index"

CHUNK = 1 << 20  # documents per pass of the per-rank loops: bounded temporary memory at any corpus size


def _save_atomically(path: Path, array: np.ndarray) -> None:
    """Temp file + rename: a concurrent reader or a killed run never sees half an array."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# -- who builds ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ranks:
    """This process among the ranks that build datasets together: every rank of the default process group
    (one process when torch.distributed is not initialised). `local_rank` comes from the launcher."""

    rank: int
    world_size: int
    local_rank: int

    @staticmethod
    def current() -> Ranks:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return Ranks(dist.get_rank(), dist.get_world_size(), ranks_from_env()[2])
        return Ranks(0, 1, 0)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, on every rank (a barrier too)."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def from_rank_zero(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def on_rank_zero(what: str, compute: Callable[[], T]) -> T:
    """`compute()` on rank 0 alone, its result handed to every rank: work that reads the whole corpus is done
    once. If it raises, rank 0 raises that error and every other rank one line naming it (never a hang)."""
    ranks = Ranks.current()
    result, error = None, None
    if ranks.rank == 0:
        try:
            result = compute()
        except Exception as err:  # handed to the other ranks first, then raised here
            error = err
    shared_result, shared_error = ranks.from_rank_zero((result, None if error is None else _one_line(error)))
    if error is not None:
        raise error
    if shared_error is not None:
        raise ValueError(f"rank {ranks.rank}: {what}: rank 0 failed: {shared_error}")
    return shared_result


def _find(folders: Sequence[Path], stem: str, kinds: Sequence[str]) -> list[Path] | None:
    """The cached files of every kind in the first folder that holds them all, else None."""
    for folder in folders:
        paths = [folder / f"{stem}_{kind}_idx.npy" for kind in kinds]
        if all(path.is_file() for path in paths):
            return paths
    return None


def _save(what: str, folder: Path, stem: str, kinds: Sequence[str], arrays: Sequence[np.ndarray]) -> list[Path]:
    """Into `folder`, or FALLBACK_CACHE when it cannot be written (read-only data storage), said once."""
    def save_into(target: Path) -> list[Path]:
        target.mkdir(parents=True, exist_ok=True)
        paths = [target / f"{stem}_{kind}_idx.npy" for kind in kinds]
        for path, array in zip(paths, arrays):
            _save_atomically(path, array)
        return paths

    try:
        return save_into(folder)
    except OSError as err:
        paths = save_into(FALLBACK_CACHE)
        log.warning("%s: cannot write the sample index beside the data (%s); cached in %s instead", what,
                    err.strerror or err, FALLBACK_CACHE)
        return paths


def cached_arrays(
    what: str, folder: Path, stem: str, kinds: Sequence[str], build: Callable[[], Sequence[np.ndarray]]
) -> tuple[list[np.ndarray], list[Path]]:
    """The arrays `kinds`, cached as `{folder}/{stem}_{kind}_idx.npy` and memory-mapped read-only on every rank.

    Missing files are built by one rank while the others wait and never build: first global rank 0; then, if
    some rank still cannot see the files (its node's cache folder is not the one rank 0 wrote to), each node's
    local rank 0 that lacks them. So a shared cache folder is built once, node-local ones once per node. If a
    builder fails, every other rank raises one line naming it. A collective: every rank must call it.
    """
    ranks = Ranks.current()
    folders = (folder, FALLBACK_CACHE)

    def look() -> tuple[list[Path] | None, list[bool]]:  # this rank's files, and which ranks see theirs
        paths = _find(folders, stem, kinds)
        return paths, ranks.gather(paths is not None)

    builders = (("global rank 0", lambda r: r.rank == 0), ("each node's local rank 0", lambda r: r.local_rank == 0))
    paths, seen = look()
    for who, is_builder in builders:
        if all(seen):
            break
        if ranks.rank == 0:
            log.info("%s: not cached where ranks %s look; %s builds it", what,
                     [rank for rank, found in enumerate(seen) if not found], who)
        error = None
        if paths is None and is_builder(ranks):
            try:
                _save(what, folder, stem, kinds, build())
            except Exception as err:  # handed to the other ranks first, then raised here
                error = err
        failures = ranks.gather(None if error is None else f"rank {ranks.rank} failed to build it: {_one_line(error)}")
        if error is not None:
            raise error
        failure = next((message for message in failures if message), None)
        if failure is not None:
            raise ValueError(f"rank {ranks.rank}: {what}: {failure}")
        paths, seen = look()  # after the gather: every builder of this round has finished
    if paths is None or not all(seen):
        missing = [rank for rank, found in enumerate(seen) if not found]
        raise FileNotFoundError(f"rank {ranks.rank}: {what}: ranks {missing} cannot see {stem}_*_idx.npy in {folder} "
                                f"or {FALLBACK_CACHE} although rank 0 and their node's local rank 0 built it")
    return [np.load(path, mmap_mode="r") for path in paths], paths


# -- one corpus ---------------------------------------------------------------------------------------------------

def _ids(documents: Documents) -> np.ndarray:
    """Document ids as int64 (a range made concrete: only in chunks, or on the building rank)."""
    if isinstance(documents, range):
        return np.arange(documents.start, documents.stop, dtype=np.int64)
    return np.ascontiguousarray(documents, dtype=np.int64)


def _split_sizes(data: MMapIndexedDataset, documents: Documents) -> np.ndarray:
    """The documents' sizes (int32), read from the file for a range (no pages left mapped in this process)."""
    if isinstance(documents, range):
        return data.read("sizes", documents.start, documents.stop)
    return np.asarray(data.sizes[_ids(documents)])


def index_digest(data: MMapIndexedDataset, documents: Documents) -> int:
    """crc32 of the document ids, then of their sizes, both as int64: the cache key that keeps a changed split or
    a rebuilt corpus from reusing a stale index. Computed CHUNK documents at a time; the value is the one-shot
    crc32 of the whole arrays that earlier versions computed, so existing cache files keep their names."""
    crc = 0  # (crc32 reads the arrays' buffers directly: no bytes copies)
    for lo in range(0, len(documents), CHUNK):
        crc = zlib.crc32(_ids(documents[lo:lo + CHUNK]), crc)
    for lo in range(0, len(documents), CHUNK):
        crc = zlib.crc32(_split_sizes(data, documents[lo:lo + CHUNK]).astype(np.int64), crc)
    return crc


class GPTDataset:
    """`num_samples` windows of `seq_length + 1` tokens over the shuffled documents of one split.

    Index arrays (NeoX's doc_idx, sample_idx, shuffle_idx) are cached as `.npy` beside the data and memory-mapped;
    the file names carry the split name, num_samples, seq_length, seed and a digest of the split's documents, so a
    changed split or rebuilt corpus never reuses stale indices. With several ranks, one builds (`cached_arrays`).
    """

    KINDS = ("doc", "sample", "shuffle")

    def __init__(
        self,
        name: str,
        data_prefix: str,
        indexed_dataset: MMapIndexedDataset,
        documents: Documents,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | None = None,
    ):
        if len(documents) == 0:
            raise ValueError(f"{data_prefix}: the {name} split has no documents")
        if seq_length < 1 or num_samples < 1:
            raise ValueError(f"{data_prefix}: expected seq_length >= 1 and num_samples >= 1, "
                             f"got {seq_length} and {num_samples}")
        self.data, self.seq_length, self.num_samples = indexed_dataset, seq_length, num_samples
        what = f"{data_prefix}: {name} sample index"

        def check_and_digest() -> int:  # both read the whole index: rank 0 does it for everyone
            if not indexed_dataset.items_checked:
                indexed_dataset.check_items()
            return index_digest(indexed_dataset, documents)

        digest = on_rank_zero(what, check_and_digest)
        stem = f"{Path(data_prefix).name}_{name}_{num_samples}ns_{seq_length}sl_{seed}s_{digest:08x}"

        def build() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            arrays = self._build(documents, seed, data_prefix, name)
            log.info("built %s sample index for %s: %d samples over %d epoch(s)", name, data_prefix, num_samples,
                     len(arrays[0]) // len(documents))
            return arrays

        folder = Path(cache_dir) if cache_dir else Path(data_prefix).parent
        (self.doc_idx, self.sample_idx, self.shuffle_idx), self.cache_paths = cached_arrays(
            what, folder, stem, self.KINDS, build)

    def _build(
        self, documents: Documents, seed: int, data_prefix: str, name: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Epochs of per-epoch shuffled documents, sample starts every seq_length tokens, a sample order.

        NeoX's arrays exactly; O(documents) memory, on the building rank only. The shuffles run over positions
        0..n-1 within the split: a shuffle's swaps depend only on the length, so this draws the same order as
        shuffling the ids themselves (NeoX's `permutation(documents)`), without a second array of ids.
        """
        sizes = _split_sizes(self.data, documents)  # sizes[p] is the size of the split's p-th document
        tokens_per_epoch = int(sizes.sum(dtype=np.int64))
        if tokens_per_epoch == 0:
            raise ValueError(f"{data_prefix}: the {name} split's {len(documents)} documents hold no tokens")
        needed = self.num_samples * self.seq_length + 1
        epochs = max(1, math.ceil(needed / tokens_per_epoch))
        rng = np.random.RandomState(seed)
        n = len(documents)
        positions = np.empty(epochs * n, dtype=np.int64)
        for epoch in range(epochs):
            positions[epoch * n:(epoch + 1) * n] = np.arange(n)
            rng.shuffle(positions[epoch * n:(epoch + 1) * n])
        # (the dels and in-place steps keep the building rank's peak near 5 arrays of 8 bytes per document)
        doc_ends = np.cumsum(sizes[positions], dtype=np.int64)  # tokens up to the end of each doc_idx entry
        del sizes
        starts = np.arange(0, self.num_samples * self.seq_length, self.seq_length, dtype=np.int64)
        position = np.searchsorted(doc_ends, starts, side="right")  # the entry each sample starts in
        entry_start = doc_ends[position - 1]  # the tokens before that entry (none before the first)
        del doc_ends
        entry_start[position == 0] = 0
        starts -= entry_start  # now the offsets of the samples within their first entry
        del entry_start
        sample_idx = np.stack([position, starts], axis=1)
        del position, starts
        shuffle_idx = rng.permutation(self.num_samples).astype(np.int64, copy=False)
        if isinstance(documents, range):
            positions += documents.start  # positions -> document ids, in place
            doc_idx = positions
        else:
            doc_idx = _ids(documents)[positions]
        return doc_idx, sample_idx, shuffle_idx

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample shuffle_idx[i]: it may span several documents (NeoX does not pad at document ends)."""
        position, offset = (int(v) for v in self.sample_idx[self.shuffle_idx[i]])
        remaining, pieces = self.seq_length + 1, []
        while remaining > 0:
            doc = int(self.doc_idx[position])
            piece = self.data.get(doc, offset, min(remaining, int(self.data.sizes[doc]) - offset))
            pieces.append(piece)
            remaining -= len(piece)
            position, offset = position + 1, 0
        return np.concatenate(pieces).astype(np.int64)


# -- several corpora ----------------------------------------------------------------------------------------------

def blend_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each blended sample, its sample within that dataset) for normalised `weights`.

    Each dataset's k-th sample is due at time (k + 0.5) / weight; all are merged by due time, so every prefix of
    the blend follows the weights as closely as possible. O(size) memory: on the building rank only.
    """
    counts = np.ceil(weights * size).astype(np.int64)
    due = np.concatenate([(np.arange(c) + 0.5) / max(w, 1e-12) for c, w in zip(counts, weights)])
    order = np.argsort(due, kind="stable")[:size]
    del due
    owner = np.concatenate([np.full(c, d, dtype=np.int32) for d, c in enumerate(counts)])[order]
    local = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])[order]
    return owner, local


class BlendableDataset:
    """Interleaves datasets so that every prefix of the blend follows the weights as closely as possible.

    With `cache_folder`, the two index arrays are cached there (named by the weights and size, the only inputs
    they depend on), built by one rank and memory-mapped like a GPTDataset's; without, they are computed here.
    """

    KINDS = ("dataset", "sample")

    def __init__(self, datasets: list, weights: list[float], size: int, cache_folder: str | Path | None = None):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != len(datasets) or len(w) == 0 or w.min() < 0 or w.sum() <= 0:
            raise ValueError(f"weights: expected {len(datasets)} non-negative weights with a positive sum, "
                             f"got {list(weights)}")
        w = w / w.sum()
        if cache_folder is None:
            self.dataset_index, self.sample_index = blend_indices(w, size)
        else:
            stem = f"blend_{len(w)}x_{size}ns_{zlib.crc32(w.tobytes()):08x}"
            (self.dataset_index, self.sample_index), self.cache_paths = cached_arrays(
                f"{Path(cache_folder) / stem}: blend index", Path(cache_folder), stem, self.KINDS,
                lambda: blend_indices(w, size))
        self.datasets, self.size = datasets, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        dataset = self.datasets[int(self.dataset_index[i])]
        return dataset[int(self.sample_index[i]) % len(dataset)]


def _blend(
    name: str,
    prefixes: list[str] | None,
    weights: list[float] | None,
    documents_of: Callable[[MMapIndexedDataset], Documents],
    num_samples: int,
    seq_length: int,
    seed: int,
    opened: dict[str, MMapIndexedDataset],
) -> GPTDataset | BlendableDataset | None:
    """One split over one or several corpora; None when nothing is requested or no corpus has documents."""
    if not prefixes or num_samples <= 0:
        return None
    weights = list(weights) if weights else [1.0] * len(prefixes)
    if len(weights) != len(prefixes):
        raise ValueError(f"{name} weights: expected {len(prefixes)} weights for {prefixes}, got {weights}")
    usable = []
    for prefix, weight in zip(prefixes, weights):
        if prefix not in opened:  # each corpus opened (and, on rank 0, checked) once for all splits
            opened[prefix] = MMapIndexedDataset(prefix, check_items=False)
        data = opened[prefix]
        documents = documents_of(data)
        if len(documents) > 0 and weight > 0:
            usable.append((prefix, data, documents, weight))
    total = sum(u[3] for u in usable)
    parts = []
    for prefix, data, documents, weight in usable:
        # NeoX's 0.5% margin, so the blend never runs past the end of a part.
        wanted = num_samples if len(usable) == 1 else math.ceil(num_samples * weight / total * 1.005)
        parts.append((GPTDataset(name, prefix, data, documents, wanted, seq_length, seed), weight))
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0][0]
    return BlendableDataset([p for p, _ in parts], [w for _, w in parts], num_samples,
                            cache_folder=Path(usable[0][0]).parent)


def build_train_valid_test_datasets(
    data_prefixes: list[str] | None,
    weights: list[float] | None,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    train_prefixes: list[str] | None = None,
    train_weights: list[float] | None = None,
    valid_prefixes: list[str] | None = None,
    valid_weights: list[float] | None = None,
    test_prefixes: list[str] | None = None,
    test_weights: list[float] | None = None,
):
    """Both GPT-NeoX modes: one (or blended) `data_path` split by `split`, or explicit per-split lists.

    Returns (train, valid, test); a split with no documents or no samples requested is None. With several ranks,
    every rank must call this (the indices are built by one rank and shared through the cache files).
    """
    names = ("train", "valid", "test")
    opened: dict[str, MMapIndexedDataset] = {}
    if data_prefixes:
        return tuple(
            _blend(name, data_prefixes, weights, lambda data, i=i: split_documents(len(data), split)[i],
                   num_samples[i], seq_length, seed, opened)
            for i, name in enumerate(names)
        )
    lists = ((train_prefixes, train_weights), (valid_prefixes, valid_weights), (test_prefixes, test_weights))
    return tuple(
        _blend(name, prefixes, w, lambda data: range(len(data)), num_samples[i], seq_length, seed, opened)
        for i, (name, (prefixes, w)) in enumerate(zip(names, lists))
    )
