"""tools/convert_from_hf.py on bad or surprising input: every file it reads (config.json, tokenizer.json, the
weights in any of their three forms, the shard index) is named in a one-line error, a failed conversion leaves
no output, a folder holding the user's files is refused, and a config that ties the embeddings beside an lm_head
that differs is converted as transformers computes it."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.hf_models import REPO, save_random

from megatron.config import load_config
from megatron.data.tokenizer import tokenizer_of
from megatron.hf.neox_import import FAMILIES
from megatron.training.pretrained import load_pretrained

sys.path.insert(0, str(REPO / "tools"))
import convert_from_hf  # noqa: E402

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 8192, (2, 20), generator=torch.Generator().manual_seed(0))
SMALL = {"vocab_size": 8256, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": 64, "tie_word_embeddings": False}


def small_model(family: str):
    """A small random LlamaForCausalLM or GPTNeoXForCausalLM, untied."""
    torch.manual_seed(0)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, intermediate_size=48))
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**SMALL, intermediate_size=64))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A Llama folder (config.json, model.safetensors, tokenizer.json), built once; tests copy it."""
    folder = tmp_path_factory.mktemp("llama") / "hf"
    save_random(small_model("llama"), folder)
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "hf"))


def refused(tmp_path: Path, hf: Path, *overrides: str) -> str:
    """The one-line error the tool exits with; nothing is left beside the input folder."""
    with pytest.raises(SystemExit) as exit_info:
        convert_from_hf.main([str(hf), str(tmp_path / "ours"), *overrides])
    message = str(exit_info.value.code)
    assert message.startswith("convert_from_hf: ") and "\n" not in message and "Traceback" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no hidden staging folder
    return message


def edit_config(hf: Path, **changes) -> None:
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_safetensors_file_is_named(llama, tmp_path, damage):
    hf = copy_of(llama, tmp_path)
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file at all")
    assert "model.safetensors: not a complete safetensors file" in refused(tmp_path, hf)


def shard(hf: Path) -> dict[str, str]:
    """model.safetensors split into two shards with their index, as transformers writes large models."""
    from safetensors.torch import load_file, save_file

    state = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({name: state[name] for name in part}, hf / file)
        weight_map |= {name: file for name in part}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_a_sharded_folder_converts_with_equal_logits(tmp_path):
    hf_model = save_random(small_model("llama"), tmp_path / "hf")
    shard(tmp_path / "hf")
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    _, model, _ = load_pretrained(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS)[0], hf_model(TOKENS).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("damage, message", [
    ("not json", r"model\.safetensors\.index\.json: not valid JSON"),
    ("no weight_map", r"model\.safetensors\.index\.json: expected a weight_map"),
    ("missing shard", r"model\.safetensors\.index\.json: its weight_map names model-00002-of-00002\.safetensors, "
                      "which is not in"),
    ("misplaced tensor", r"model\.safetensors\.index\.json: lists lm_head\.weight in model-00002-of-00002"),
])
def test_a_broken_shard_index_is_named(llama, tmp_path, damage, message):
    hf = copy_of(llama, tmp_path)
    weight_map = shard(hf)
    index = hf / "model.safetensors.index.json"
    if damage == "not json":
        index.write_text('{"weight_map": {')
    elif damage == "no weight_map":
        index.write_text(json.dumps({"metadata": {}}))
    elif damage == "missing shard":
        (hf / "model-00002-of-00002.safetensors").unlink()
    else:  # lm_head.weight is in the first shard
        assert weight_map["lm_head.weight"] == "model-00001-of-00002.safetensors"
        moved = weight_map | {"lm_head.weight": "model-00002-of-00002.safetensors"}
        index.write_text(json.dumps({"weight_map": moved}))
    assert re.search(message, refused(tmp_path, hf))


def test_a_damaged_pytorch_model_bin_is_named(llama, tmp_path):
    hf = copy_of(llama, tmp_path)
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(b"not a pickle")
    assert "pytorch_model.bin: not a PyTorch state dict" in refused(tmp_path, hf)


@pytest.mark.parametrize("damage, message", [
    ("{oops", r"config\.json: not valid JSON"),
    ('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}', r"config\.json: model_type 'gpt2' is not "),
    ("hidden_size 30", r"config\.json: transformers cannot read it: .*hidden size \(30\)"),
    ("vocab_size 4000", r"tokenizer\.json: the tokenizer has 8192 tokens, more than config\.json's vocab_size 4000"),
    ("hidden_size 64", r"model\.safetensors: our embed\.weight would be \(8256, 32\), but config\.json's sizes give "
                       r"\(8256, 64\)"),
    ("tokenizer.json", r"hf/tokenizer\.json is not a tokenizers \.json"),
    ("no tokenizer", r"no tokenizer\.json; name the tokenizer .*--tokenizer_type SPMTokenizer"),
], ids=["json", "architecture", "transformers_validation", "vocab", "shapes", "tokenizer", "no_tokenizer"])
def test_bad_config_or_tokenizer_is_named(llama, tmp_path, damage, message):
    hf = copy_of(llama, tmp_path)
    if damage.startswith("{"):
        (hf / "config.json").write_text(damage)
    elif damage.split()[0] in ("hidden_size", "vocab_size"):
        key, value = damage.split()
        edit_config(hf, **{key: int(value), "head_dim": int(value) // 4 if key == "hidden_size" else 8})
    elif damage == "tokenizer.json":
        (hf / "tokenizer.json").write_text("{oops")
    else:
        (hf / "tokenizer.json").rename(hf / "tokenizer.model")
    assert re.search(message, refused(tmp_path, hf))


def test_an_unsupported_architecture_lists_every_accepted_model_type(llama, tmp_path):
    hf = copy_of(llama, tmp_path)
    edit_config(hf, model_type="gpt2")
    message = refused(tmp_path, hf)
    assert set(FAMILIES) == {"gpt_neox", "llama", "mistral", "mixtral", "qwen3", "qwen3_moe", "gpt_oss", "deepseek_v3"}
    assert message.endswith(f"(expected one of: {', '.join(FAMILIES)})")


@pytest.mark.parametrize("override", [["--hidden_size", "64"], ["--num_layers=1"], ["--seq_length", "16"]])
def test_overriding_a_key_from_config_json_is_refused(llama, tmp_path, override):
    key = override[0].removeprefix("--").split("=")[0]
    message = refused(tmp_path, copy_of(llama, tmp_path), *override)
    assert f"--{key}: comes from the HF config ({tmp_path / 'hf' / 'config.json'})" in message


def test_a_non_empty_output_folder_is_refused_and_kept(llama, tmp_path):
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "model.yml").write_text("my: own file\n")
    with pytest.raises(SystemExit, match="ours: not empty"):
        convert_from_hf.main([str(llama), str(tmp_path / "ours")])
    assert [p.name for p in (tmp_path / "ours").iterdir()] == ["model.yml"]
    assert (tmp_path / "ours" / "model.yml").read_text() == "my: own file\n"


def test_tokenizer_overrides_are_kept_in_model_yml(llama, tmp_path, monkeypatch):
    """A folder without tokenizer.json and GPT-2 files named relative to the working directory: model.yml keeps
    them (absolute), so `train.py OUT/model.yml ...` builds that tokenizer from any folder."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["to be or not to be, that is the question"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    (tmp_path / "gpt2").mkdir()
    bpe.save_model(str(tmp_path / "gpt2"))
    hf = copy_of(llama, tmp_path)
    (hf / "tokenizer.json").unlink()
    monkeypatch.chdir(tmp_path)
    convert_from_hf.main(["hf", "ours", "--tokenizer_type", "GPT2BPETokenizer", "--vocab_file", "gpt2/vocab.json",
                          "--merge_file=gpt2/merges.txt"])
    monkeypatch.chdir(REPO)
    keys = yaml.safe_load((tmp_path / "ours" / "model.yml").read_text())
    assert keys["tokenizer_type"] == "GPT2BPETokenizer"
    assert (keys["vocab_file"], keys["merge_file"]) == (str(tmp_path / "gpt2/vocab.json"),
                                                        str(tmp_path / "gpt2/merges.txt"))
    tokenizer = tokenizer_of(load_config([str(tmp_path / "ours" / "model.yml")]))
    assert tokenizer.name == "GPT2BPETokenizer" and tokenizer.encode("to be") == bpe.encode("to be").ids
    args, _, _ = load_pretrained(tmp_path / "ours")  # the checkpoint's config.yml names the same files
    assert (args.tokenizer_type, args.merge_file) == ("GPT2BPETokenizer", keys["merge_file"])


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_a_tied_config_beside_a_different_lm_head_gives_transformers_logits(tmp_path, family):
    """transformers 5.24 ties only an lm_head equal to the embedding (or absent); one that differs is kept, with
    a warning. Ours converts the same weights untied, so the logits are transformers' own."""
    save_random(small_model(family), tmp_path / "hf")
    edit_config(tmp_path / "hf", tie_word_embeddings=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings and not torch.equal(hf.get_output_embeddings().weight,
                                                             hf.get_input_embeddings().weight)
    convert_from_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    args, model, _ = load_pretrained(tmp_path / "ours")
    assert args.no_weight_tying
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS)[0], hf(TOKENS).logits, atol=1e-4, rtol=0)
