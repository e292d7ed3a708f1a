"""GPT dataset: windows of the document stream, epochs, seeds, splits, the index cache, blending.

Token values encode their place: token = 1000 * document + position, so a sample says where it came from.
"""

from __future__ import annotations

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
    assert [r.tolist() for r in split_documents(10, "969,30,1")] == [list(range(10)), [], []]
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
