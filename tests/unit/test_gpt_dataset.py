"""GPT dataset: windows of the document stream, epochs, seeds, splits, the index cache, blending.

Token values encode their place: token = 1000 * document + position, so a sample says where it came from.
"""

from __future__ import annotations

import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from megatron.data.gpt_dataset import (
    BlendableDataset,
    GPTDataset,
    build_train_valid_test_datasets,
    split_documents,
)
from megatron.data.indexed_dataset import IndexedDatasetBuilder, MMapIndexedDataset


def make_corpus(tmp_path: Path, sizes: list[int], name: str = "c") -> str:
    builder = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), np.int32)
    for doc, size in enumerate(sizes):
        builder.add_document(np.arange(size) + 1000 * doc)
    builder.finalize(str(tmp_path / f"{name}.idx"))
    return str(tmp_path / name)


def stream_windows(data: MMapIndexedDataset, doc_order: np.ndarray, seq_length: int, n: int) -> np.ndarray:
    """The expected samples, built directly: concatenate documents, cut overlapping windows."""
    stream = np.concatenate([data[int(d)] for d in doc_order]).astype(np.int64)
    return np.stack([stream[k * seq_length: k * seq_length + seq_length + 1] for k in range(n)])


def test_samples_are_consecutive_windows_and_one_epoch_covers_all(tmp_path: Path) -> None:
    sizes = [7, 3, 12, 5, 1, 9, 4]  # 41 tokens: 41 - 1 = 40 = 5 samples of 8
    prefix = make_corpus(tmp_path, sizes)
    data = MMapIndexedDataset(prefix)
    ds = GPTDataset("train", prefix, data, np.arange(len(sizes)), num_samples=5, seq_length=8, seed=3)
    assert len(ds.doc_idx) == len(sizes)
    assert sorted(ds.doc_idx.tolist()) == list(range(len(sizes)))
    assert sorted(ds.shuffle_idx.tolist()) == list(range(5))
    expected = stream_windows(data, ds.doc_idx, 8, 5)
    samples = np.stack([ds[i] for i in range(len(ds))])
    assert samples.dtype == np.int64 and samples.shape == (5, 9)
    np.testing.assert_array_equal(samples, expected[ds.shuffle_idx])
    in_order = expected
    for k in range(4):  # the last target of a window is the first input of the next
        assert in_order[k][-1] == in_order[k + 1][0]
    all_tokens = np.concatenate([data[i] for i in range(len(sizes))])
    assert set(samples.ravel().tolist()) == set(all_tokens.tolist())


def test_more_samples_than_an_epoch_repeats_shuffled_epochs(tmp_path: Path) -> None:
    sizes = [10, 20, 30]
    prefix = make_corpus(tmp_path, sizes)
    data = MMapIndexedDataset(prefix)
    ds = GPTDataset("train", prefix, data, np.arange(3), num_samples=25, seq_length=6, seed=0)
    # 25 * 6 + 1 = 151 tokens needed, 60 per epoch -> 3 epochs, each a permutation of the documents.
    assert len(ds.doc_idx) == 9
    for e in range(3):
        assert sorted(ds.doc_idx[3 * e: 3 * e + 3].tolist()) == [0, 1, 2]
    expected = stream_windows(data, ds.doc_idx, 6, 25)
    np.testing.assert_array_equal(np.stack([ds[i] for i in range(25)]), expected[ds.shuffle_idx])


def test_seed_determinism(tmp_path: Path) -> None:
    prefix = make_corpus(tmp_path, [5 + (i * 7) % 13 for i in range(40)])
    data = MMapIndexedDataset(prefix)

    def build(seed: int, cache: str) -> GPTDataset:
        return GPTDataset("train", prefix, data, np.arange(40), 30, 8, seed, cache_dir=str(tmp_path / cache))

    a, b, c = build(1, "a"), build(1, "b"), build(2, "c")
    for x, y in ((a.doc_idx, b.doc_idx), (a.sample_idx, b.sample_idx), (a.shuffle_idx, b.shuffle_idx)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.doc_idx, c.doc_idx)
    assert not np.array_equal(a.shuffle_idx, c.shuffle_idx)


def test_split_is_by_document_order_and_disjoint(tmp_path: Path) -> None:
    prefix = make_corpus(tmp_path, [20] * 100)
    train, valid, test = build_train_valid_test_datasets(
        data_prefixes=[prefix], weights=None, split="90,10,0", seq_length=16, seed=1,
        num_samples=(50, 10, 5),
    )
    assert test is None
    train_docs = {int(t) // 1000 for i in range(len(train)) for t in train[i]}
    valid_docs = {int(t) // 1000 for i in range(len(valid)) for t in valid[i]}
    assert train_docs <= set(range(90)) and valid_docs <= set(range(90, 100))
    assert len(train) == 50 and len(valid) == 10
    assert [list(r) for r in split_documents(10, "969,30,1")] == [list(range(10)), [], []]
    assert [len(r) for r in split_documents(1000, "969,30,1")] == [969, 30, 1]
    with pytest.raises(ValueError, match="split: expected three non-negative weights"):
        split_documents(10, "1,2")


def test_cache_is_written_reused_and_keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = make_corpus(tmp_path, [9] * 30)
    data = MMapIndexedDataset(prefix)
    first = GPTDataset("valid", prefix, data, np.arange(30), 12, 8, 5)
    names = sorted(p.name for p in tmp_path.glob("*.npy"))
    assert len(names) == 3 and all(n.startswith("c_valid_12ns_8sl_5s_") for n in names)
    assert not list(tmp_path.glob("*.tmp"))

    def must_not_build(*args: object) -> None:
        raise AssertionError("index rebuilt although cached")

    monkeypatch.setattr(GPTDataset, "_build", must_not_build)
    again = GPTDataset("valid", prefix, data, np.arange(30), 12, 8, 5)
    np.testing.assert_array_equal(again.shuffle_idx, first.shuffle_idx)
    np.testing.assert_array_equal(again[3], first[3])
    monkeypatch.undo()
    GPTDataset("valid", prefix, data, np.arange(20), 12, 8, 5)  # other documents: a new cache entry
    assert len(list(tmp_path.glob("*.npy"))) == 6


def test_none_and_errors(tmp_path: Path) -> None:
    prefix = make_corpus(tmp_path, [0, 0, 0])
    data = MMapIndexedDataset(prefix)
    with pytest.raises(ValueError, match="no documents"):
        GPTDataset("train", prefix, data, np.arange(0), 5, 4, 0)
    with pytest.raises(ValueError, match="hold no tokens"):
        GPTDataset("train", prefix, data, np.arange(3), 5, 4, 0)
    good = make_corpus(tmp_path, [30] * 4, name="g")
    out = build_train_valid_test_datasets(
        data_prefixes=None, weights=None, split="969,30,1", seq_length=4, seed=0, num_samples=(5, 0, 5),
        train_prefixes=[good], valid_prefixes=[good], test_prefixes=None,
    )
    assert out[0] is not None and len(out[0]) == 5 and out[1] is None and out[2] is None


def test_blendable_dataset_follows_weights() -> None:
    datasets = [[(name, i) for i in range(1000)] for name in "abc"]
    weights = [5.0, 3.0, 2.0]
    blend = BlendableDataset(datasets, weights, 1000)
    picks = [blend[i] for i in range(len(blend))]
    for n in (10, 100, 1000):  # every prefix follows the ratios closely
        counts = {k: sum(1 for p in picks[:n] if p[0] == k) for k in "abc"}
        for k, w in zip("abc", weights):
            assert abs(counts[k] - n * w / 10) <= 1
    for k in "abc":  # each dataset is read from its start, in order
        assert [p[1] for p in picks if p[0] == k] == list(range(sum(1 for p in picks if p[0] == k)))
    again = BlendableDataset(datasets, weights, 1000)
    assert [again[i] for i in range(1000)] == picks
    with pytest.raises(ValueError, match="non-negative weights"):
        BlendableDataset(datasets, [1.0, -1.0, 1.0], 10)


def test_blended_prefixes_end_to_end(tmp_path: Path) -> None:
    a = make_corpus(tmp_path, [50] * 20, name="a")
    b = make_corpus(tmp_path, [50] * 20, name="b")
    train, _, _ = build_train_valid_test_datasets(
        data_prefixes=None, weights=None, split="1,0,0", seq_length=10, seed=0, num_samples=(200, 0, 0),
        train_prefixes=[a, b], train_weights=[3.0, 1.0],
    )
    assert isinstance(train, BlendableDataset) and len(train) == 200
    from_a = sum(int(train.dataset_index[i] == 0) for i in range(200))
    assert abs(from_a - 150) <= 1
    assert all(train[i].shape == (11,) for i in range(0, 200, 17))


def test_a_read_only_data_folder_caches_the_index_elsewhere_and_says_where(tmp_path, monkeypatch, caplog):
    from megatron.data import gpt_dataset

    prefix = make_corpus(tmp_path, [7, 3, 9, 4])
    data = MMapIndexedDataset(prefix)
    fallback = tmp_path / "user_cache"
    monkeypatch.setattr(gpt_dataset, "FALLBACK_CACHE", fallback)
    real_save = gpt_dataset._save_atomically

    def read_only_beside_the_data(path, array):
        if path.parent == Path(prefix).parent:
            raise PermissionError(13, "Read-only file system")
        real_save(path, array)

    monkeypatch.setattr(gpt_dataset, "_save_atomically", read_only_beside_the_data)
    with caplog.at_level("WARNING", logger="megatron"):
        first = GPTDataset("train", prefix, data, np.arange(4), num_samples=5, seq_length=4, seed=1)
    assert all(path.parent == fallback and path.is_file() for path in first.cache_paths)
    assert any(f"cached in {fallback} instead" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(GPTDataset, "_build", lambda *args: pytest.fail("rebuilt instead of read from the cache"))
    second = GPTDataset("train", prefix, data, np.arange(4), num_samples=5, seq_length=4, seed=1)
    assert np.array_equal(second.shuffle_idx, first.shuffle_idx) and np.array_equal(second.doc_idx, first.doc_idx)


# -- the index at scale: same arrays and names as the in-memory computation it replaced --------------------------

def old_way(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int):
    """The index as every rank computed it before it was built once and memory-mapped: NeoX's recipe, with the
    sample starts found by walking the token stream one document at a time (independent of searchsorted)."""
    documents = np.asarray(documents, dtype=np.int64)
    epochs = max(1, -(-(num_samples * seq_length + 1) // int(sizes[documents].sum())))
    rng = np.random.RandomState(seed)
    doc_idx = np.concatenate([rng.permutation(documents) for _ in range(epochs)]).astype(np.int64)
    sample_idx, entry, entry_start = [], 0, 0
    for start in range(0, num_samples * seq_length, seq_length):
        while entry_start + sizes[doc_idx[entry]] <= start:
            entry_start += int(sizes[doc_idx[entry]])
            entry += 1
        sample_idx.append((entry, start - entry_start))
    shuffle_idx = rng.permutation(num_samples).astype(np.int64)
    digest = zlib.crc32(sizes[documents].astype(np.int64).tobytes(), zlib.crc32(documents.tobytes()))
    return doc_idx, np.array(sample_idx, dtype=np.int64), shuffle_idx, digest


def old_blend(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The blend order as it was computed on every rank: each dataset's k-th sample due at (k + 0.5) / weight."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    due = [((k + 0.5) / w[d], d, k) for d in range(len(w)) for k in range(int(np.ceil(w[d] * size)))]
    order = sorted(range(len(due)), key=lambda i: due[i][0])[:size]  # sorted() is stable, like the old argsort
    return np.array([due[i][1] for i in order]), np.array([due[i][2] for i in order])


@pytest.mark.parametrize("split, num_samples, seq_length, seed", [
    ("969,30,1", 40, 8, 3),  # under an epoch
    ("50,30,20", 700, 16, 11),  # several epochs of every split
])
def test_the_index_equals_the_old_computation(tmp_path, monkeypatch, split, num_samples, seq_length, seed):
    from megatron.data import gpt_dataset

    monkeypatch.setattr(gpt_dataset, "CHUNK", 7)  # the digest's chunks end mid-split, as at scale
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in rng.integers(0, 40, size=203)]  # empty documents too
    prefix = make_corpus(tmp_path, sizes)
    data = MMapIndexedDataset(prefix, check_items=False)
    sizes_array = np.array(sizes, dtype=np.int32)
    for i, documents in enumerate(split_documents(len(sizes), split)):
        if len(documents) == 0:
            continue
        for given in (documents, np.arange(documents.start, documents.stop)):  # a range, or explicit ids
            ds = GPTDataset(f"s{i}", prefix, data, given, num_samples, seq_length, seed,
                            cache_dir=str(tmp_path / type(given).__name__))
            doc_idx, sample_idx, shuffle_idx, digest = old_way(sizes_array, np.arange(documents.start,
                                                                                     documents.stop),
                                                               num_samples, seq_length, seed)
            for new, old in ((ds.doc_idx, doc_idx), (ds.sample_idx, sample_idx), (ds.shuffle_idx, shuffle_idx)):
                assert isinstance(new, np.memmap) and new.dtype == old.dtype
                np.testing.assert_array_equal(new, old)
            assert all(path.name.endswith(f"_{digest:08x}_{kind}_idx.npy")  # existing caches keep their names
                       for path, kind in zip(ds.cache_paths, GPTDataset.KINDS))
    assert data.items_checked  # the O(documents) check ran (on rank 0) although the open skipped it


def test_the_blend_equals_the_old_computation_and_is_cached(tmp_path, monkeypatch):
    for weights, size in (([5.0, 3.0, 2.0], 1000), ([1.0] * 7, 333), ([0.2, 0.0, 0.8], 41)):
        blend = BlendableDataset([[]] * len(weights), weights, size, cache_folder=tmp_path)
        owner, local = old_blend(weights, size)
        assert isinstance(blend.dataset_index, np.memmap) and isinstance(blend.sample_index, np.memmap)
        np.testing.assert_array_equal(blend.dataset_index, owner)
        np.testing.assert_array_equal(blend.sample_index, local)
    from megatron.data import gpt_dataset

    monkeypatch.setattr(gpt_dataset, "blend_indices", lambda *args: pytest.fail("blend rebuilt although cached"))
    again = BlendableDataset([[]] * 3, [5.0, 3.0, 2.0], 1000, cache_folder=tmp_path)
    np.testing.assert_array_equal(again.dataset_index, old_blend([5.0, 3.0, 2.0], 1000)[0])
    monkeypatch.undo()
    BlendableDataset([[]] * 3, [5.0, 3.0, 2.1], 1000, cache_folder=tmp_path)  # other weights: a new entry
    assert len(list(tmp_path.glob("blend_3x_1000ns_*_dataset_idx.npy"))) == 2


def test_the_per_rank_path_holds_no_array_of_documents(tmp_path, monkeypatch):
    """With the index cached, opening a corpus of 200k documents allocates far less than one int64 per document:
    the split is a range, the digest reads in chunks, the arrays are memory-mapped (tracemalloc sees numpy)."""
    from megatron.data import gpt_dataset, indexed_dataset

    monkeypatch.setattr(gpt_dataset, "CHUNK", 1000)
    monkeypatch.setattr(indexed_dataset, "CHUNK", 1000)
    documents = 200_000
    prefix = str(tmp_path / "big")
    indexed_dataset.write_index(f"{prefix}.idx", np.uint16, np.full(documents, 3), np.arange(documents + 1))
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(documents * 3 * 2)
    assert split_documents(documents, "80,20,0") == [range(0, 160_000), range(160_000, 200_000), range(0)]
    build_train_valid_test_datasets([prefix], None, "80,20,0", 16, 1, (100, 10, 0))  # builds and caches
    monkeypatch.setattr(GPTDataset, "_build", lambda *args: pytest.fail("rebuilt although cached"))
    tracemalloc.start()
    try:
        train, valid, _ = build_train_valid_test_datasets([prefix], None, "80,20,0", 16, 1, (100, 10, 0))
        first = train[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.shape == (17,) and len(train.doc_idx) == 160_000
    assert all(isinstance(a, np.memmap) for ds in (train, valid) for a in (ds.doc_idx, ds.sample_idx, ds.shuffle_idx))
    assert peak < 0.1 * 8 * documents, f"{peak} bytes allocated while opening a cached index of {documents} documents"


def test_the_item_check_reads_in_chunks_and_still_finds_damage(tmp_path, monkeypatch):
    from megatron.data import indexed_dataset

    monkeypatch.setattr(indexed_dataset, "CHUNK", 2)
    prefix = make_corpus(tmp_path, [3, 4, 5, 6, 7])
    MMapIndexedDataset(prefix)  # intact: opens
    idx = bytearray((tmp_path / "c.idx").read_bytes())
    header, count = 9 + 8 + 1 + 8 + 8, 5
    doc_idx_at = header + 12 * count
    idx[doc_idx_at + 8 * 2: doc_idx_at + 8 * 3] = (0).to_bytes(8, "little")  # decreases across a chunk boundary
    (tmp_path / "c.idx").write_bytes(bytes(idx))
    unchecked = MMapIndexedDataset(prefix, check_items=False)  # the O(1) open does not look
    with pytest.raises(ValueError, match=r"c\.idx: document index not increasing"):
        unchecked.check_items()
    with pytest.raises(ValueError, match=r"c\.idx: document index not increasing"):
        MMapIndexedDataset(prefix)
