"""Every kind of bad input through `python train.py`'s entry point: a non-zero exit, exactly one error line naming
the file, key or value and what was expected, and no traceback. In-process (train.main with sys.argv), so the
table stays fast; tests/integration/test_bad_input.py runs a few of the same through a real subprocess."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers.runs import assert_one_line, run_main, write_config

# (name, config overrides or a YAML text, extra command-line arguments, pattern the error line must match)
CONFIG_CASES = [
    ("malformed YAML", "num_layers: [2\n", [], r"config\.yml:.*invalid YAML"),
    ("YAML not a mapping", "- 1\n- 2\n", [], r"config\.yml: expected a mapping"),
    ("misspelled key", {"hiden_size": 32}, [], r"unknown key 'hiden_size' \(did you mean 'hidden_size'\?\)"),
    ("misspelled override", {}, ["--num_layer", "2"], r"unknown key 'num_layer'"),
    ("override without value", {}, ["--num_layers"], r"--num_layers needs a value"),
    ("wrong type", {"num_layers": "two"}, [], r"num_layers: .*integer.*'two'"),
    ("negative learning rate", {"optimizer": {"type": "AdamW", "params": {"lr": -0.1}}}, [], r"lr: .*greater than 0"),
    ("zero iterations", {"train_iters": 0}, [], r"train_iters: .*greater than or equal to 1"),
    ("unknown optimizer", {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, [], r"expected Adam or AdamW.*SGD"),
    ("heads do not divide hidden", {"hidden_size": 30, "num_attention_heads": 4}, [],
     r"hidden_size 30 is not divisible by num_attention_heads 4"),
    ("seq_length above positions", {"seq_length": 64, "max_position_embeddings": 32}, [],
     r"max_position_embeddings 32 < seq_length 64"),
    ("top-k above experts", {"moe_num_experts": 2, "moe_top_k": 3}, [],
     r"moe_top_k 3 must be between 1 and moe_num_experts 2"),
    ("LoRE top-l above M", {"moe_num_experts": 2, "lore_num_experts": 2, "lore_rank": 2, "lore_top_k": 3}, [],
     r"lore_top_k 3 must be between 1 and lore_num_experts 2"),
    ("LoREs without MoE", {"lore_num_experts": 2, "lore_rank": 2}, [],
     r"lore_num_experts: 2 cannot act in this model: it needs an MoE model"),
    ("EP above experts", {"moe_num_experts": 2, "moe_expert_parallel_size": 4}, [], r"moe_expert_parallel_size 4"),
    ("EP without MoE", {"moe_expert_parallel_size": 2}, [], r"needs an MoE model"),
    ("batch sizes disagree", {"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2,
                              "gradient_accumulation_steps": 2}, [], r"train_batch_size 7 != "),
    ("batch size not an integer", {"train_batch_size": "16x"}, [],
     r"config\.yml: train_batch_size: expected a positive integer, got '16x'"),
    ("min_lr above lr", {"min_lr": 1.0}, [], r"min_lr 1\.0 > optimizer\.params\.lr"),
    ("bad split", {"split": "90,10"}, [], r"split: .*three non-negative weights"),
    ("weights without paths", {"valid_data_weights": [1.0]}, [], r"valid_data_weights has 1 entries"),
    ("LSH without MoE", {"lsh_compression": True}, [], r"lsh_compression: True cannot act .*needs an MoE model"),
    ("LSH layer not MoE", {"moe_num_experts": 2, "moe_expert_interval": 2, "lsh_compression": True,
                           "lsh_layers": [1]}, [], r"lsh_layers: 1 is not an MoE layer"),
    ("missing data", {"data_path": "/nonexistent/corpus"}, [], r"corpus\.bin does not exist"),
    ("missing vocab file", {"tokenizer_type": "HFTokenizer", "vocab_file": "/nonexistent/tok.json"}, [],
     r"vocab_file: /nonexistent/tok\.json does not exist"),
    ("DiT patch does not divide image", {"model_type": "dit", "image_size": 9, "patch_size": 2}, [],
     r"image_size 9 is not divisible by patch_size 2"),
    ("DiT betas reversed", {"model_type": "dit", "beta_start": 0.02, "beta_end": 0.01}, [],
     r"beta_start 0\.02 must be below beta_end 0\.01"),
    ("missing config file", None, [], r"nope\.yml: config file does not exist"),
    # found silently accepted before: each is refused before the first step now
    ("key given twice in a file", "num_layers: 2\nhidden_size: 32\nnum_layers: 3\n", [],
     r"config\.yml: line 3: .*key 'num_layers' is given twice \(lines 1 and 3\)"),
    ("micro-batch 0", {"train_micro_batch_size_per_gpu": 0}, [],
     r"train_micro_batch_size_per_gpu: expected a positive integer, got 0"),
    ("micro-batch 0 on the command line", {}, ["--train_micro_batch_size_per_gpu", "0"],
     r"command line: train_micro_batch_size_per_gpu: expected a positive integer, got 0"),
    ("negative lr_decay_iters", {}, ["--lr_decay_iters", "-5"], r"lr_decay_iters: .*greater than or equal to 1"),
    ("negative corpus weight", {"data_path": None, "train_data_paths": ["a", "b"], "train_data_weights": [1, -1]},
     [], r"train_data_weights: expected non-negative weights with a positive sum, got \[1\.0, -1\.0\]"),
    ("corpus weights all zero", {"data_path": None, "train_data_paths": ["a", "b"], "train_data_weights": [0, 0]},
     [], r"train_data_weights: expected non-negative weights with a positive sum"),
    ("split without validation but evaluating", {"split": "100,0,0"}, [],
     r"split '100,0,0' leaves no validation documents but eval_interval is 4"),
    ("split without training", {"split": "0,100,0"}, [], r"split '0,100,0' gives training no documents"),
    ("data_path a folder", {}, ["--data_path", "/tmp/"], r"data_path: /tmp/ is a folder; expected a dataset prefix"),
    ("negative intermediate_size", {"intermediate_size": -4}, [], r"intermediate_size: .*greater than or equal to 1"),
    ("negative init_method_std", {"init_method_std": -0.02}, [], r"init_method_std: .*greater than 0"),
    ("Adam beta of 1.5", {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 1.5]}}}, [],
     r"optimizer\.params\.betas: expected two Adam betas in \[0, 1\), got \[0\.9, 1\.5\]"),
    ("vocab_file a folder", {"tokenizer_type": "HFTokenizer", "vocab_file": "/tmp"}, [],
     r"vocab_file: /tmp is a folder; expected the tokenizer's file"),
    ("device cuda without a GPU", {"device": "cuda"}, [], r"device: cuda, but this machine has no CUDA device"),
    ("flash attention without a GPU", {"attention_impl": "flash"}, [], r"attention_impl: flash needs a CUDA device"),
    ("megablocks without a GPU", {"moe_num_experts": 2, "moe_impl": "megablocks"}, [],
     r"moe_impl: megablocks needs a CUDA device and the grouped_gemm package"),
    ("lr contradicting the optimizer block", {"lr": 0.5}, [],
     r"config\.yml: lr 0\.5 contradicts optimizer\.params\.lr"),
]


@pytest.mark.parametrize("name, overrides, extra, pattern", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_and_file_errors(tmp_path, data_prefix, capsys, name, overrides, extra, pattern):
    if "without a GPU" in name and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if overrides is None:
        config = tmp_path / "nope.yml"
    elif isinstance(overrides, str):
        config = tmp_path / "config.yml"
        config.write_text(overrides)
    else:
        config = write_config(tmp_path, data_prefix, pos_emb="rotary", **overrides)
    assert_one_line(*run_main([str(config), *extra], capsys), pattern)


def damage_dataset(data_prefix: str, folder: Path, damage: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = str(folder / "corpus")
    shutil.copy(f"{data_prefix}.bin", f"{prefix}.bin")
    shutil.copy(f"{data_prefix}.idx", f"{prefix}.idx")
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if damage == "truncated .bin":
        bin_.write_bytes(bin_.read_bytes()[:1000])
    elif damage == "longer .bin":
        bin_.write_bytes(bin_.read_bytes() + bytes(6))
    elif damage == "foreign .idx":
        idx.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(60))
    elif damage == "index version 2":
        data = idx.read_bytes()
        idx.write_bytes(data[:9] + struct.pack("<Q", 2) + data[17:])
    elif damage == "truncated .idx":
        idx.write_bytes(idx.read_bytes()[:100])
    elif damage == "item past the end":
        data = bytearray(idx.read_bytes())
        count = struct.unpack("<Q", data[18:26])[0]
        pointers = 34 + 4 * count
        data[pointers:pointers + 8] = struct.pack("<q", 10**9)
        idx.write_bytes(bytes(data))
    return prefix


DATA_CASES = [
    ("truncated .bin", r"corpus\.bin: truncated"),
    ("longer .bin", r"corpus\.bin: longer than its index"),
    ("foreign .idx", r"corpus\.idx: not a GPT-NeoX mmap index \(bad magic\)"),
    ("index version 2", r"corpus\.idx: index version 2, expected 1"),
    ("truncated .idx", r"corpus\.idx: truncated index"),
    ("item past the end", r"corpus\.idx: item 0 .* lies outside .*corpus\.bin"),
]


@pytest.mark.parametrize("damage, pattern", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_damaged_datasets(tmp_path, data_prefix, capsys, damage, pattern):
    prefix = damage_dataset(data_prefix, tmp_path / "data", damage)
    config = write_config(tmp_path, prefix, pos_emb="rotary", train_iters=2)
    assert_one_line(*run_main([str(config)], capsys), pattern)


def test_tokenizer_that_does_not_fit_the_model(tmp_path, data_prefix, capsys):
    config = write_config(tmp_path, data_prefix, pos_emb="rotary", vocab_size=100)
    assert_one_line(*run_main([str(config)], capsys), r"vocab_size: 100 disagrees with the CharLevelTokenizer")


def test_data_from_a_larger_tokenizer(tmp_path, capsys):
    """Token ids beyond the model's vocabulary (a corpus made with another tokenizer): one line, not an index error."""
    import numpy as np

    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "wide"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for i in range(40):
        builder.add_document((np.arange(50) * 997 + i) % 50000)  # ids up to ~50k; CharLevelTokenizer has 257
    builder.finalize(f"{prefix}.idx")
    config = write_config(tmp_path, str(prefix), pos_emb="rotary", train_iters=2)
    assert_one_line(*run_main([str(config)], capsys), r"data: token id \d+ .* outside the model's vocabulary \(384")


def test_config_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "latin1.yml"
    config.write_bytes("num_layers: 2\n# r\xe9sum\xe9\n".encode("latin-1"))
    assert_one_line(*run_main([str(config)], capsys), r"latin1\.yml: not UTF-8 text \(byte 17")


def test_lr_on_the_command_line_sets_the_learning_rate(tmp_path, data_prefix):
    """GPT-NeoX users set the learning rate with --lr; it takes effect (it used to be ignored)."""
    from megatron.config import load_config

    config = write_config(tmp_path, data_prefix)  # its optimizer block says lr 3e-3
    args = load_config([str(config)], ["--lr", "0.5"])
    assert args.lr == 0.5 and args.optimizer.params.lr == 0.5 and args.optimizer.params.betas == (0.9, 0.95)
    assert load_config([str(config)]).lr == 3e-3


@pytest.mark.parametrize("tokenizer_type, content, pattern", [
    ("HFTokenizer", "hello, not JSON\n", r"vocab_file: .*tok\.json is not a tokenizers \.json \(HFTokenizer\)"),
    ("SPMTokenizer", '{"a": 1}\n', r"vocab_file: .*tok\.json is not a SentencePiece \.model \(SPMTokenizer\)"),
])
def test_a_file_that_is_not_the_tokenizer_named(tmp_path, data_prefix, capsys, tokenizer_type, content, pattern):
    vocab = tmp_path / "tok.json"
    vocab.write_text(content)
    config = write_config(tmp_path, data_prefix, pos_emb="rotary", tokenizer_type=tokenizer_type, vocab_file=str(vocab))
    assert_one_line(*run_main([str(config)], capsys), pattern)


def test_a_dataset_without_documents(tmp_path, capsys):
    import numpy as np

    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "empty"
    IndexedDatasetBuilder(f"{prefix}.bin", np.uint16).finalize(f"{prefix}.idx")
    config = write_config(tmp_path, str(prefix), pos_emb="rotary", train_iters=2)
    assert_one_line(*run_main([str(config)], capsys), r"data: no training documents in .*empty \(split '90,10,0'\)")
