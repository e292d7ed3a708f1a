"""GPT-NeoX's default tokenizer, GPT2BPETokenizer (a GPT-2 vocab.json + merges.txt), through the whole path:
preprocessing, training, generation and the Hugging Face export. Its merge file used to be dropped on the way
("merge_file: None does not exist"), and no test used this tokenizer."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.runs import read_metrics, train_losses, write_config

import train
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preprocess import preprocess
from megatron.data.tokenizer import GPT2BPETokenizer

REPO = Path(__file__).resolve().parents[2]
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A byte-level BPE trained on the bundled corpus, saved in GPT-2's format, and a jsonl of documents."""
    from tokenizers import ByteLevelBPETokenizer

    from megatron.data.bundled import BUNDLED_CORPORA

    folder = tmp_path_factory.mktemp("gpt2")
    with gzip.open(BUNDLED_CORPORA["shakespeare"], "rt", encoding="utf-8") as f:
        documents = [json.loads(line)["text"][:2000] for line, _ in zip(f, range(100))]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(documents, vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    vocab, merges = bpe.save_model(str(folder))
    jsonl = folder / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents))
    return Path(vocab), Path(merges), jsonl


def test_preprocess_train_generate_and_export_with_gpt2_files(gpt2_files, tmp_path):
    vocab, merges, jsonl = gpt2_files
    tokenizer = GPT2BPETokenizer(str(vocab), str(merges))
    files = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab), "--merge-file", str(merges)]
    subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(jsonl),
                    "--output-prefix", str(tmp_path / "data"), "--append-eod", "--workers", "2", *files],
                   check=True, capture_output=True, text=True, cwd=REPO)
    prefix = str(tmp_path / "data_text_document")
    first = MMapIndexedDataset(prefix)[0]
    assert list(first[:-1]) == tokenizer.encode(json.loads(jsonl.read_text().splitlines()[0])["text"])
    assert first[-1] == tokenizer.eod_id

    config = write_config(tmp_path, prefix, tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab),
                          merge_file=str(merges), train_iters=4, checkpoint_factor=4, eval_interval=0)
    train.run([str(config)])
    losses = train_losses(read_metrics(tmp_path / "logs"))
    assert losses[4] < losses[1]

    generated = subprocess.run([sys.executable, str(REPO / "tools/generate.py"), str(tmp_path / "ckpt"),
                                "--prompt", "To be", "--max-new-tokens", "5"],
                               check=True, capture_output=True, text=True, cwd=REPO)
    assert generated.stdout.startswith("To be")

    transformers = pytest.importorskip("transformers")
    subprocess.run([sys.executable, str(REPO / "tools/convert_to_hf.py"), str(tmp_path / "ckpt"),
                    str(tmp_path / "hf")], check=True, capture_output=True, text=True, cwd=REPO)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer(TEXT)["input_ids"] == tokenizer.encode(TEXT)
    assert hf_tokenizer.eos_token_id == tokenizer.eod_id


@pytest.mark.parametrize("merges", ["", "#version: 0.2\n"], ids=["empty", "header_only"])
def test_preprocessing_refuses_a_merges_file_without_merges(gpt2_files, tmp_path, merges):
    """It used to write every byte as a token, three times as many, without a word."""
    vocab, _, jsonl = gpt2_files
    (tmp_path / "merges.txt").write_text(merges)
    with pytest.raises(ValueError, match=f"merge_file: {tmp_path / 'merges.txt'} holds no merges"):
        preprocess([str(jsonl)], ["text"], "GPT2BPETokenizer", str(vocab), str(tmp_path / "data"),
                   merge_file=str(tmp_path / "merges.txt"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt"]  # no dataset written
