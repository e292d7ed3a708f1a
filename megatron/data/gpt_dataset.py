"""Fixed-length training samples over an indexed dataset, shuffled and cached as in GPT-NeoX.

A split's documents are laid end to end (reshuffled every epoch) into one token stream; sample i is
the window of `seq_length + 1` tokens starting at `i * seq_length`, so neighbouring samples share one
token (the last target of one is the first input of the next). Samples are visited in a shuffled
order. The three index arrays are cached as `.npy` beside the data and reused.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megatron.data.indexed_dataset import MMapIndexedDataset

log = logging.getLogger("megatron.data")


def split_documents(num_documents: int, split: str) -> list[np.ndarray]:
    """`"969,30,1"` -> three consecutive ranges of document indices in those proportions (NeoX's rule)."""
    weights = np.array([float(w) for w in split.replace("/", ",").split(",") if w.strip()])
    if len(weights) != 3 or weights.min() < 0 or weights.sum() <= 0:
        raise ValueError(f"split: expected three non-negative weights like '969,30,1', got {split!r}")
    bounds = np.round(np.concatenate([[0.0], np.cumsum(weights / weights.sum())]) * num_documents).astype(int)
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(3)]


# where the index arrays go when the data's own folder cannot be written (read-only storage)
FALLBACK_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron" / "index"


def _save_atomically(path: Path, array: np.ndarray) -> None:
    """Temp file + rename: a concurrent reader or a killed run never sees half an array."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class GPTDataset:
    """`num_samples` windows of `seq_length + 1` tokens over the shuffled documents of one split.

    Index arrays (NeoX's doc_idx, sample_idx, shuffle_idx) are cached as `.npy` beside the data; the file
    names carry the split name, num_samples, seq_length, seed and a digest of the split's documents, so a
    changed split or rebuilt corpus never reuses stale indices.
    """

    def __init__(
        self,
        name: str,
        data_prefix: str,
        indexed_dataset: MMapIndexedDataset,
        documents: np.ndarray,
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
        documents = np.asarray(documents, dtype=np.int64)
        digest = zlib.crc32(indexed_dataset.sizes[documents].astype(np.int64).tobytes(),
                            zlib.crc32(documents.tobytes()))
        cache = Path(cache_dir) if cache_dir else Path(data_prefix).parent
        stem = f"{Path(data_prefix).name}_{name}_{num_samples}ns_{seq_length}sl_{seed}s_{digest:08x}"
        kinds = ("doc", "sample", "shuffle")
        for folder in (cache, FALLBACK_CACHE):  # beside the data, or where a read-only data folder sent them
            paths = {kind: folder / f"{stem}_{kind}_idx.npy" for kind in kinds}
            self.cache_paths = list(paths.values())
            if all(p.is_file() for p in paths.values()):
                self.doc_idx, self.sample_idx, self.shuffle_idx = (np.load(paths[k]) for k in kinds)
                return
        self.doc_idx, self.sample_idx, self.shuffle_idx = self._build(documents, seed, data_prefix, name)
        arrays = (self.doc_idx, self.sample_idx, self.shuffle_idx)
        try:
            self.cache_paths = self._save(cache, stem, kinds, arrays)
        except OSError as err:  # read-only data storage: a writable cache folder instead, said once
            self.cache_paths = self._save(FALLBACK_CACHE, stem, kinds, arrays)
            log.warning("%s: cannot write the sample index beside the data (%s); cached in %s instead", data_prefix,
                        err.strerror or err, FALLBACK_CACHE)
        log.info("built %s sample index for %s: %d samples over %d epoch(s)", name, data_prefix, num_samples,
                 len(self.doc_idx) // len(documents))

    @staticmethod
    def _save(folder: Path, stem: str, kinds: tuple[str, ...], arrays: tuple[np.ndarray, ...]) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{stem}_{kind}_idx.npy" for kind in kinds]
        for path, array in zip(paths, arrays):
            _save_atomically(path, array)
        return paths

    def _build(
        self, documents: np.ndarray, seed: int, data_prefix: str, name: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Epochs of per-epoch shuffled documents, sample starts every seq_length tokens, a sample order."""
        sizes = self.data.sizes
        tokens_per_epoch = int(sizes[documents].sum())
        if tokens_per_epoch == 0:
            raise ValueError(f"{data_prefix}: the {name} split's {len(documents)} documents hold no tokens")
        needed = self.num_samples * self.seq_length + 1
        epochs = max(1, math.ceil(needed / tokens_per_epoch))
        rng = np.random.RandomState(seed)
        doc_idx = np.concatenate([rng.permutation(documents) for _ in range(epochs)]).astype(np.int64)
        doc_ends = np.cumsum(sizes[doc_idx], dtype=np.int64)
        starts = np.arange(self.num_samples, dtype=np.int64) * self.seq_length
        position = np.searchsorted(doc_ends, starts, side="right")
        offset = starts - np.concatenate([[0], doc_ends])[position]
        sample_idx = np.stack([position, offset], axis=1)
        shuffle_idx = rng.permutation(self.num_samples).astype(np.int64)
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


class BlendableDataset:
    """Interleaves datasets so that every prefix of the blend follows the weights as closely as possible."""

    def __init__(self, datasets: list, weights: list[float], size: int):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != len(datasets) or len(w) == 0 or w.min() < 0 or w.sum() <= 0:
            raise ValueError(f"weights: expected {len(datasets)} non-negative weights with a positive sum, "
                             f"got {list(weights)}")
        w = w / w.sum()
        counts = np.ceil(w * size).astype(np.int64)
        # Each dataset's k-th sample is due at time (k + 0.5) / weight; merge all by due time.
        due = np.concatenate([(np.arange(c) + 0.5) / max(wi, 1e-12) for c, wi in zip(counts, w)])
        owner = np.concatenate([np.full(c, d) for d, c in enumerate(counts)])
        local = np.concatenate([np.arange(c) for c in counts])
        order = np.argsort(due, kind="stable")[:size]
        self.dataset_index, self.sample_index = owner[order], local[order]
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
    documents_of: Callable[[MMapIndexedDataset], np.ndarray],
    num_samples: int,
    seq_length: int,
    seed: int,
) -> GPTDataset | BlendableDataset | None:
    """One split over one or several corpora; None when nothing is requested or no corpus has documents."""
    if not prefixes or num_samples <= 0:
        return None
    weights = list(weights) if weights else [1.0] * len(prefixes)
    if len(weights) != len(prefixes):
        raise ValueError(f"{name} weights: expected {len(prefixes)} weights for {prefixes}, got {weights}")
    usable = []
    for prefix, weight in zip(prefixes, weights):
        data = MMapIndexedDataset(prefix)
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
    return BlendableDataset([p for p, _ in parts], [w for _, w in parts], num_samples)


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

    Returns (train, valid, test); a split with no documents or no samples requested is None.
    """
    names = ("train", "valid", "test")
    if data_prefixes:
        return tuple(
            _blend(name, data_prefixes, weights, lambda data, i=i: split_documents(len(data), split)[i],
                   num_samples[i], seq_length, seed)
            for i, name in enumerate(names)
        )
    lists = ((train_prefixes, train_weights), (valid_prefixes, valid_weights), (test_prefixes, test_weights))
    return tuple(
        _blend(name, prefixes, w, lambda data: np.arange(len(data)), num_samples[i], seq_length, seed)
        for i, (name, (prefixes, w)) in enumerate(zip(names, lists))
    )
