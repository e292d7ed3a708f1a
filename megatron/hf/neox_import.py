"""A Hugging Face GPT-NeoX (Pythia-style) or Llama folder as our step-0 checkpoint, to continue pretraining or
upcycle (Llama's mapping: megatron/hf/llama.py).

OUTPUT gets `global_step0/` + `latest` (the trainer's own format), `model.yml` (the model's keys and
tokenizer, to put before a data/optimizer config: `python train.py OUTPUT/model.yml run.yml --load OUTPUT`;
seq_length is the model's full context, `--seq_length N` trains shorter) and a copy of the folder's
tokenizer.json. Only what we compute exactly is accepted: default RoPE with an even rotary width, exact
activations (gelu, relu, silu; not gelu_new/gelu_fast).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from megatron.config import ConfigError, load_config
from megatron.data.tokenizer import padded_vocab_size, tokenizer_of
from megatron.hf.llama import LLAMA_MODEL_TYPES, llama_keys, llama_to_ours
from megatron.hf.neox import ACTIVATIONS, neox_to_ours, rotary_dims
from megatron.model.build import build_gpt
from megatron.runtime import optional_import
from megatron.training.seed_checkpoint import write_step0_checkpoint


def model_keys(folder: Path, hf) -> dict:
    """Our config keys for a transformers GPTNeoXConfig (5.x: rope settings in `rope_parameters`)."""
    where = folder / "config.json"
    if hf.model_type in LLAMA_MODEL_TYPES:
        return llama_keys(str(where), hf)
    if hf.model_type != "gpt_neox":
        raise ConfigError(f"{where}: model_type {hf.model_type!r} (expected gpt_neox or llama)")
    rope = hf.rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{where}: rope_type {rope['rope_type']!r} (only the default RoPE is ours)")
    head_dim = hf.hidden_size // hf.num_attention_heads
    factor, theta = rope.get("partial_rotary_factor", 1.0), rope["rope_theta"]
    if rotary_dims(head_dim, factor) != int(head_dim * factor):
        raise ConfigError(f"{where}: partial_rotary_factor {factor} gives an odd rotary width "
                          f"{int(head_dim * factor)} (ours rotates an even number of dims)")
    if float(theta) != int(theta):
        raise ConfigError(f"{where}: rope_theta {theta} (expected a whole number)")
    if hf.hidden_act not in ACTIVATIONS.values():
        raise ConfigError(f"{where}: hidden_act {hf.hidden_act!r} (expected one of {sorted(ACTIVATIONS)})")
    return {
        "num_layers": hf.num_hidden_layers, "hidden_size": hf.hidden_size,
        "num_attention_heads": hf.num_attention_heads, "intermediate_size": hf.intermediate_size,
        "max_position_embeddings": hf.max_position_embeddings, "seq_length": hf.max_position_embeddings,
        "pos_emb": "rotary", "rotary_pct": factor,
        "rotary_emb_base": int(theta), "norm": "layernorm", "layernorm_epsilon": hf.layer_norm_eps,
        "use_bias_in_norms": True, "use_bias_in_attn_linear": hf.attention_bias, "activation": hf.hidden_act,
        "gpt_j_residual": hf.use_parallel_residual, "no_weight_tying": not hf.tie_word_embeddings,
        "hidden_dropout": float(hf.hidden_dropout), "attention_dropout": float(hf.attention_dropout),
        "init_method_std": hf.initializer_range,
    }


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, its sharded form (model.safetensors.index.json), or pytorch_model.bin."""
    load_file = optional_import("safetensors.torch", "hf", "convert_from_hf").load_file

    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def vocab_divisor(tokenizer_vocab: int, hf_vocab: int, where: str) -> int:
    """make_vocab_size_divisible_by that pads the tokenizer's vocabulary to the model's embedding rows."""
    if tokenizer_vocab > hf_vocab:
        raise ConfigError(f"{where}: the tokenizer has {tokenizer_vocab} tokens, the model's embedding only {hf_vocab}")
    return next((d for d in (128, 64, 32, 16, 8, 4, 2, 1) if padded_vocab_size(tokenizer_vocab, d) == hf_vocab),
                hf_vocab)


def convert_from_hf(folder: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Writes OUT/global_step0 (+ latest, model.yml); `overrides` are `--key value` pairs, e.g. the tokenizer
    of a folder without tokenizer.json (`--tokenizer_type CharLevelTokenizer`)."""
    AutoConfig = optional_import("transformers", "hf", "convert_from_hf").AutoConfig

    folder, out = Path(folder), Path(out).resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    if (out / "latest").exists():
        raise FileExistsError(f"{out}: already holds a checkpoint (latest); choose an empty folder")
    hf = AutoConfig.from_pretrained(folder)
    keys = model_keys(folder, hf)
    out.mkdir(parents=True, exist_ok=True)
    if (folder / "tokenizer.json").is_file():
        shutil.copyfile(folder / "tokenizer.json", out / "tokenizer.json")
        keys |= {"tokenizer_type": "HFTokenizer", "vocab_file": str(out / "tokenizer.json")}
    elif not any(o.lstrip("-").replace("-", "_").startswith("tokenizer_type") for o in overrides):
        raise ConfigError(f"{folder}: no tokenizer.json; name the tokenizer (--tokenizer_type, --vocab_file)")
    model_yml = out / "model.yml"
    model_yml.write_text(yaml.safe_dump(keys, sort_keys=False))
    args = load_config([str(model_yml)], list(overrides))
    tokenizer = tokenizer_of(args)
    keys["make_vocab_size_divisible_by"] = vocab_divisor(tokenizer.vocab_size, hf.vocab_size, str(folder))
    model_yml.write_text("# the model converted by tools/convert_from_hf.py; put data and optimizer keys in "
                         "another file\n" + yaml.safe_dump(keys, sort_keys=False))
    args = load_config([str(model_yml)], list(overrides))
    model = build_gpt(args, hf.vocab_size)
    to_ours = llama_to_ours if hf.model_type in LLAMA_MODEL_TYPES else neox_to_ours
    model.load_state_dict(to_ours(read_weights(folder), model.cfg), strict=True)
    write_step0_checkpoint(args, model, out)
    return out / "global_step0"
