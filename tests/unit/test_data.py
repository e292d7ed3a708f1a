"""Data: the .bin/.idx layout byte for byte, tokenizers, GPT samples, preprocessing, the bundled corpus."""

import gzip
import json
import struct

import numpy as np
import pytest

from megatron.data.bundled import BUNDLED_CORPORA, BUNDLED_TOKENIZER, ensure_bundled_dataset
from megatron.data.gpt_dataset import BlendableDataset, GPTDataset, build_train_valid_test_datasets, split_documents
from megatron.data.indexed_dataset import IndexedDatasetBuilder, MMapIndexedDataset, best_dtype
from megatron.data.preprocess import preprocess
from megatron.data.tokenizer import build_tokenizer, padded_vocab_size, train_bpe_tokenizer


def test_index_and_bin_match_the_gpt_neox_layout_byte_for_byte(tmp_path):
    prefix = str(tmp_path / "d")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    builder.add_document([5, 6, 7])
    builder.add_item([8])
    builder.add_item([9, 10])
    builder.end_document()
    builder.finalize(f"{prefix}.idx")
    expected_idx = (
        b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 3) + struct.pack("<Q", 3)
        + struct.pack("<3i", 3, 1, 2) + struct.pack("<3q", 0, 6, 8) + struct.pack("<3q", 0, 1, 3)
    )
    assert (tmp_path / "d.idx").read_bytes() == expected_idx
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<6H", 5, 6, 7, 8, 9, 10)
    data = MMapIndexedDataset(prefix)
    assert [data[i].tolist() for i in range(len(data))] == [[5, 6, 7], [8], [9, 10]]
    assert data.get(0, offset=1, length=2).tolist() == [6, 7] and data.doc_idx.tolist() == [0, 1, 3]


def test_bad_index_is_a_clear_error(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="x.idx: not a GPT-NeoX mmap index"):
        MMapIndexedDataset(str(tmp_path / "x"))
    assert best_dtype(50000) == np.uint16 and best_dtype(128256) == np.int32


def test_tokenizers_round_trip(tmp_path):
    texts = ["To be, or not to be, that is the question."] * 20 + ["Whether 'tis nobler in the mind to suffer"] * 20
    hf = build_tokenizer("HFTokenizer", str(train_bpe_tokenizer(texts, 300, tmp_path / "tok.json")))
    assert hf.decode(hf.encode(texts[0])) == texts[0] and hf.eod_id == hf.encode("<|endoftext|>")[0]
    char = build_tokenizer("CharLevelTokenizer", None)
    assert char.decode(char.encode("Fair é")) == "Fair é" and char.eod_id == 256
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(texts * 5))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "spm"),
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    sp = build_tokenizer("SPMTokenizer", str(tmp_path / "spm.model"))
    assert sp.decode(sp.encode(texts[1])) == texts[1] and sp.eod_id == 2
    assert padded_vocab_size(8193, 128) == 8320 and padded_vocab_size(8192, 128) == 8192
    with pytest.raises(FileNotFoundError, match="vocab_file: .*missing.json does not exist"):
        build_tokenizer("HFTokenizer", str(tmp_path / "missing.json"))


@pytest.fixture
def small_dataset(tmp_path):
    prefix = str(tmp_path / "s")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    rng = np.random.default_rng(0)
    for d in range(30):
        builder.add_document(rng.integers(0, 1000, size=rng.integers(3, 40)) + d * 1000)
    builder.finalize(f"{prefix}.idx")
    return prefix


def test_samples_are_windows_of_the_shuffled_document_stream(small_dataset):
    data = MMapIndexedDataset(small_dataset)
    docs = np.arange(20)
    ds = GPTDataset("train", small_dataset, data, docs, num_samples=50, seq_length=8, seed=3)
    stream = np.concatenate([data[int(d)] for d in ds.doc_idx])
    for i in range(50):
        k = int(ds.shuffle_idx[i])
        assert ds[i].tolist() == stream[k * 8: k * 8 + 9].tolist()
    # one epoch of samples covers every token of the training documents
    tokens_per_epoch = int(data.sizes[docs].sum())
    covered = GPTDataset("cover", small_dataset, data, docs, tokens_per_epoch // 8, 8, seed=3)
    seen = np.concatenate([covered[i] for i in range(len(covered))])
    assert set(seen.tolist()) >= set(np.concatenate([data[int(d)] for d in docs]).tolist()[:tokens_per_epoch - 8])


def test_sampling_is_deterministic_cached_and_splits_are_disjoint(small_dataset):
    data = MMapIndexedDataset(small_dataset)
    a = GPTDataset("train", small_dataset, data, np.arange(20), 40, 8, seed=1)
    b = GPTDataset("train", small_dataset, data, np.arange(20), 40, 8, seed=1)  # from the .npy cache
    c = GPTDataset("train", small_dataset, data, np.arange(20), 40, 8, seed=2)
    assert all(np.array_equal(a[i], b[i]) for i in range(40))
    assert not all(np.array_equal(a[i], c[i]) for i in range(40))
    train, valid, test = split_documents(30, "969,30,1")
    assert len(train) + len(valid) + len(test) == 30 and not set(train) & set(valid)
    tr, va, _ = build_train_valid_test_datasets([small_dataset], None, "80,20,0", 8, 1, (10, 5, 0))
    train_tokens = {int(t) // 1000 for i in range(len(tr)) for t in tr[i]}
    valid_tokens = {int(t) // 1000 for i in range(len(va)) for t in va[i]}
    assert train_tokens <= set(range(24)) and valid_tokens <= set(range(24, 30))


def test_blending_follows_the_weights():
    blend = BlendableDataset([["a"] * 10, ["b"] * 10], [0.75, 0.25], 400)
    picks = [blend[i] for i in range(400)]
    assert picks.count("a") == 300
    assert picks[:8].count("a") == 6  # every prefix stays close to the weights


def test_preprocess_is_identical_for_one_and_two_workers(tmp_path):
    docs = [{"text": f"document {i}: " + "word " * (i % 7)} for i in range(300)]
    with gzip.open(tmp_path / "in.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    outputs = [preprocess([str(tmp_path / "in.jsonl.gz")], ["text"], "CharLevelTokenizer", None,
                          str(tmp_path / f"out{w}"), workers=w, progress=False)["text"] for w in (1, 2)]
    assert all((tmp_path / f"out{w}_text_document.bin").exists() for w in (1, 2))
    for suffix in (".bin", ".idx"):
        assert open(outputs[0] + suffix, "rb").read() == open(outputs[1] + suffix, "rb").read()
    data = MMapIndexedDataset(outputs[0])
    assert len(data) == 300 and data[5].tolist() == list(docs[5]["text"].encode()) + [256]


def test_bundled_corpus_is_deduplicated_and_builds_once(tmp_path):
    with gzip.open(BUNDLED_CORPORA["shakespeare"], "rt") as f:
        records = [json.loads(line) for line in f]
    titles = {r["title"] for r in records}
    assert len(records) > 500 and len(titles) == 42
    assert not any("milton" in r["title"].lower() or "paradise" in r["title"].lower() for r in records)
    assert sum("hamlet" in t.lower() for t in titles) == 1  # one edition of each work
    prefix = str(tmp_path / "sh" / "shakespeare_text_document")
    ensure_bundled_dataset("shakespeare", prefix, "HFTokenizer", str(BUNDLED_TOKENIZER))
    built = (tmp_path / "sh" / "shakespeare_text_document.bin").stat().st_mtime_ns
    ensure_bundled_dataset("shakespeare", prefix, "HFTokenizer", str(BUNDLED_TOKENIZER))
    assert (tmp_path / "sh" / "shakespeare_text_document.bin").stat().st_mtime_ns == built
    assert len(MMapIndexedDataset(prefix)) == len(records)
    with pytest.raises(ValueError, match="prepare_data: unknown bundled corpus 'poe'"):
        ensure_bundled_dataset("poe", prefix, "HFTokenizer", None)


def test_preprocess_reads_parquet_and_text_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", "second"], "meta": ["a", "b"]}), tmp_path / "in.parquet")
    (tmp_path / "play.txt").write_text("a whole file is one document")
    prefix = preprocess([str(tmp_path / "in.parquet"), str(tmp_path / "play.txt")], ["text"], "CharLevelTokenizer",
                        None, str(tmp_path / "out"), progress=False)["text"]
    data = MMapIndexedDataset(prefix)
    assert [bytes(t for t in data[i] if t < 256).decode() for i in range(3)] == [
        "first doc", "second", "a whole file is one document"]
    (tmp_path / "notes.csv").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.csv: unsupported file type"):
        preprocess([str(tmp_path / "notes.csv")], ["text"], "CharLevelTokenizer", None, str(tmp_path / "o"),
                   progress=False)
