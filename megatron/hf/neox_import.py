"""A Hugging Face folder as our step-0 checkpoint, to continue pretraining or upcycle: GPT-NeoX (Pythia), a
Llama-family model (Llama, Mistral, Mixtral, Qwen3, Qwen3-MoE; mapping in megatron/hf/llama.py), DeepSeek-V3
(megatron/hf/deepseek_v3.py) or gpt-oss; FAMILIES below is the list.

OUTPUT gets `global_step0/` + `latest` (the trainer's own format), `model.yml` (the model's keys and
tokenizer, to put before a data/optimizer config: `python train.py OUTPUT/model.yml run.yml --load OUTPUT`;
seq_length is the model's full context, `--seq_length N` trains shorter) and a copy of the folder's
tokenizer.json. Only what we compute exactly is accepted: default RoPE with an even rotary width, exact
activations (gelu, relu, silu; not gelu_new/gelu_fast).

As careful as train.py with its input: every file read (config.json, tokenizer.json, model.safetensors, the shard
index and its shards, pytorch_model.bin) is named in a one-line error saying what was expected. The model is the
one config.json describes, so an override of its keys is refused; other overrides (the tokenizer's files) are kept
in model.yml. OUTPUT must be new or empty and appears only when complete (megatron/outputs.py).
"""
from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from megatron.config import ConfigError, NeoXArgs, load_config
from megatron.config.loader import parse_overrides, set_dotted
from megatron.config.schema import MODEL_KEYS
from megatron.data.tokenizer import Tokenizer, build_tokenizer, padded_vocab_size, tokenizer_of
from megatron.hf.deepseek_v3 import deepseek_keys, deepseek_prepare, deepseek_to_ours
from megatron.hf.gpt_oss import gpt_oss_keys, gpt_oss_to_ours
from megatron.hf.llama import LLAMA_MODEL_TYPES, llama_keys, llama_to_ours
from megatron.hf.neox import ACTIVATIONS, neox_to_ours, rotary_dims
from megatron.model.build import build_gpt
from megatron.outputs import new_output_folder
from megatron.runtime import optional_import
from megatron.training.seed_checkpoint import write_step0_checkpoint

log = logging.getLogger("megatron.hf")
State = dict[str, torch.Tensor]
TOKENIZER_KEYS = ("tokenizer_type", "vocab_file", "merge_file")


def neox_keys(where: str, hf: Any) -> dict[str, Any]:
    """Our config keys for a transformers GPTNeoXConfig (5.x: rope settings in `rope_parameters`)."""
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


class Family(NamedTuple):
    """How one config.json model_type converts: its keys, its weights, and its embedding and head tensors."""

    keys: Callable[[str, Any], dict[str, Any]]
    to_ours: Callable[[State, Any], State]
    embedding: str
    heads: tuple[str, ...]  # the output layer's names in its files (transformers 4's GPT-NeoX: embed_out)
    # (weights file, config, weights) -> the keys the weights decide (DeepSeek-V3's MTP modules) and the weights as
    # to_ours reads them; None: config.json decides every key
    prepare: Callable[[str, Any, State], tuple[dict[str, Any], State]] | None = None


# config.json's model_type -> its conversion: the one table that decides what converts, so the refusal of any other
# model_type lists exactly what this table accepts.
FAMILIES: dict[str, Family] = {
    "gpt_neox": Family(neox_keys, neox_to_ours, "gpt_neox.embed_in.weight", ("lm_head.weight", "embed_out.weight")),
    **{model_type: Family(llama_keys, llama_to_ours, "model.embed_tokens.weight", ("lm_head.weight",))
       for model_type in LLAMA_MODEL_TYPES},
    "gpt_oss": Family(gpt_oss_keys, gpt_oss_to_ours, "model.embed_tokens.weight", ("lm_head.weight",)),
    "deepseek_v3": Family(deepseek_keys, deepseek_to_ours, "model.embed_tokens.weight", ("lm_head.weight",),
                          deepseek_prepare),
}


def first_line(err: BaseException) -> str:
    """A library's error message as one line (some span several, some are empty); a first line that only
    announces the detail ("Validation error for field 'hidden_size':") keeps the line that gives it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def read_json(path: Path, expected: str) -> dict[str, Any]:
    """The JSON object in `path`; anything else is one line naming the file and what was expected."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (expected {expected})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}; "
                          f"expected {expected})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: a JSON {type(value).__name__} (expected {expected}, a JSON object)")
    return value


def read_config(folder: Path) -> tuple[Any, Family]:
    """transformers' config of `folder` and its family; a model_type we do not convert is refused before
    transformers reads it (it would only say it does not know the type, or build a config we cannot use)."""
    AutoConfig = optional_import("transformers", "hf", "convert_from_hf").AutoConfig
    path = folder / "config.json"
    model_type = read_json(path, "a Hugging Face model config").get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"{path}: model_type {model_type!r} is not converted (expected one of: "
                          f"{', '.join(FAMILIES)})")
    try:
        hf = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers raises many kinds on a value it cannot use
        raise ConfigError(f"{path}: transformers cannot read it: {first_line(err)}") from None
    return hf, FAMILIES[model_type]


def refuse_model_overrides(given: dict[str, Any], keys: dict[str, Any], where: str) -> None:
    """config.json defines the converted model: an override of one of its keys would build another model, which
    the weights do not fit or which computes something else."""
    fixed = set(keys) | set(MODEL_KEYS) | {"vocab_size", "make_vocab_size_divisible_by"}
    for dotted in given:
        key = dotted.split(".")[0]
        if key in fixed:
            run = "" if key in MODEL_KEYS or key not in keys else f"; a run may change it (train.py ... --{key})"
            raise ConfigError(f"--{key}: comes from the HF config ({where}) and is not overridden by a conversion{run}")


def read_safetensors(path: Path) -> State:
    """One safetensors file; a truncated or foreign file is one line naming it."""
    safetensors = optional_import("safetensors", "hf", "convert_from_hf")
    load_file = optional_import("safetensors.torch", "hf", "convert_from_hf").load_file
    try:
        return load_file(path)
    except (safetensors.SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a complete safetensors file ({first_line(err)}); expected the weights as "
                         "transformers saves them (a truncated download?)") from None


def read_sharded(index: Path) -> State:
    """The shards a model.safetensors.index.json names, each tensor checked to be in the shard it is listed in."""
    weight_map = read_json(index, "transformers' shard index, with a weight_map").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(shard, str) for shard in weight_map.values()):
        raise ValueError(f"{index}: expected a weight_map from each tensor name to its shard file")
    state: State = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.is_file():
            raise FileNotFoundError(f"{index}: its weight_map names {shard}, which is not in {index.parent}")
        tensors = read_safetensors(path)
        absent = [name for name, where in weight_map.items() if where == shard and name not in tensors]
        if absent:
            raise ValueError(f"{index}: lists {absent[0]} in {shard}, which does not hold it ({len(absent)} such)")
        state.update(tensors)
    return state


def read_torch_bin(path: Path) -> State:
    """pytorch_model.bin as torch.load reads it safely (tensors only); anything else is one line naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a PyTorch state dict ({first_line(err)}); expected the weights as "
                         "transformers saves them") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def read_weights(folder: Path) -> tuple[State, Path]:
    """The weights and the file they came from: model.safetensors, its sharded form (model.safetensors.index.json)
    or pytorch_model.bin, the first that exists."""
    single, index, pickled = (folder / name for name in
                              ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    if single.is_file():
        return read_safetensors(single), single
    if index.is_file():
        return read_sharded(index), index
    if pickled.is_file():
        return read_torch_bin(pickled), pickled
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def unties(state: State, family: Family) -> bool:
    """Whether transformers computes with an untied head although config.json ties it: it ties only an lm_head
    that is absent or equal to the embedding, and otherwise warns and keeps the file's (transformers 5.24's
    `tie_weights`). We take the same weights, so the logits are transformers' own."""
    head = next((state[name] for name in family.heads if name in state), None)
    embedding = state.get(family.embedding)
    if head is None or embedding is None:
        return False
    return head.shape != embedding.shape or not torch.equal(head.float(), embedding.float())


def folder_tokenizer(folder: Path) -> Path:
    """The folder's tokenizer.json; without one, the keys naming the tokenizer files it does have."""
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    hint = ""
    if (folder / "tokenizer.model").is_file():
        hint = f", e.g. --tokenizer_type SPMTokenizer --vocab_file {folder / 'tokenizer.model'}"
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        hint = (f", e.g. --tokenizer_type GPT2BPETokenizer --vocab_file {folder / 'vocab.json'} "
                f"--merge_file {folder / 'merges.txt'}")
    raise ConfigError(f"{folder}: no tokenizer.json; name the tokenizer (--tokenizer_type, --vocab_file{hint})")


def vocab_divisor(tokenizer_vocab: int, hf_vocab: int, where: str) -> int:
    """make_vocab_size_divisible_by that pads the tokenizer's vocabulary to the model's embedding rows."""
    if tokenizer_vocab > hf_vocab:
        raise ConfigError(f"{where}: the tokenizer has {tokenizer_vocab} tokens, more than config.json's vocab_size "
                          f"{hf_vocab} (the model's embedding rows)")
    return next((d for d in (128, 64, 32, 16, 8, 4, 2, 1) if padded_vocab_size(tokenizer_vocab, d) == hf_vocab),
                hf_vocab)


def load_weights(model: torch.nn.Module, ours: State, source: Path) -> None:
    """`ours` into the model built from config.json; a tensor that does not fit is one line, not torch's list."""
    expected = model.state_dict()
    for names, problem in ((sorted(set(expected) - set(ours)), "no tensor for our"),
                           (sorted(set(ours) - set(expected)), "a tensor the model has no place for:")):
        if names:
            raise ValueError(f"{source}: {problem} {names[0]} ({len(names)} such)")
    for name, tensor in ours.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{source}: our {name} would be {tuple(tensor.shape)}, but config.json's sizes give "
                             f"{tuple(expected[name].shape)} (the weights and config.json disagree)")
    model.load_state_dict(ours, strict=True)


def write_model_yml(path: Path, keys: dict[str, Any]) -> Path:
    path.write_text("# the model converted by tools/convert_from_hf.py; put data and optimizer keys in another "
                    "file\n" + yaml.safe_dump(keys, sort_keys=False))
    return path


def load_keys(model_yml: Path, where: str, given: dict[str, Any]) -> NeoXArgs:
    """load_config of config.json's keys (in the staging folder's model.yml) and the overrides, given as on the
    command line: a bad value is reported as config.json's or the command line's, never the staging file's."""
    try:
        return load_config([str(model_yml)], [f"--{key}={json.dumps(value)}" for key, value in given.items()])
    except ConfigError as err:
        message = str(err).removeprefix(f"{model_yml}: ")
        if not message.startswith("command line"):  # config.json's values, as our keys
            message = f"{where} (as our keys): {message}"
        raise ConfigError(message) from None


def convert_from_hf(folder: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Writes OUT/global_step0 (+ latest, model.yml, tokenizer.json); `overrides` are `--key value` pairs, e.g. the
    tokenizer of a folder without tokenizer.json (`--tokenizer_type CharLevelTokenizer`), kept in model.yml.
    OUT must be new or empty; it appears only once complete."""
    folder, out = Path(folder), Path(out).resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    where = str(folder / "config.json")
    given = dict(parse_overrides(list(overrides)))
    for key in ("vocab_file", "merge_file"):  # model.yml is read from other folders too
        if isinstance(given.get(key), str):
            given[key] = str(Path(given[key]).resolve())
    with new_output_folder(out) as staging:
        hf, family = read_config(folder)
        keys = family.keys(where, hf)
        refuse_model_overrides(given, keys, where)
        state, source = read_weights(folder)
        if family.prepare is not None:
            weights_keys, state = family.prepare(str(source), hf, state)
            keys |= weights_keys
        if not keys["no_weight_tying"] and unties(state, family):
            log.warning("%s: tie_word_embeddings is true but the weights' lm_head differs from the embedding: "
                        "converted untied (no_weight_tying: true), as transformers computes it", where)
            keys["no_weight_tying"] = True
        if any(key in given for key in TOKENIZER_KEYS):  # the user's tokenizer
            tokenizer_file = None
        else:
            tokenizer_file = folder_tokenizer(folder)
            keys |= {"tokenizer_type": "HFTokenizer", "vocab_file": str(out / "tokenizer.json")}
        args = load_keys(write_model_yml(staging / "model.yml", keys), where, given)
        tokenizer: Tokenizer = (tokenizer_of(args) if tokenizer_file is None else
                                build_tokenizer("HFTokenizer", str(tokenizer_file)))
        tokenizer_name = str(tokenizer_file or args.vocab_file or args.tokenizer_type)
        keys["make_vocab_size_divisible_by"] = vocab_divisor(tokenizer.vocab_size, hf.vocab_size, tokenizer_name)
        for dotted, value in given.items():  # and kept in model.yml: train.py reads the same model and tokenizer
            set_dotted(keys, dotted, value)
        args = load_config([str(write_model_yml(staging / "model.yml", keys))])
        if tokenizer_file is not None:
            (staging / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
        model = build_gpt(args, hf.vocab_size)
        try:
            ours = family.to_ours(state, model.cfg)
        except (ValueError, RuntimeError) as err:  # a tensor missing, unmapped, or of a shape that cannot stack
            raise ValueError(f"{source}: {first_line(err)}") from None
        load_weights(model, ours, source)
        write_step0_checkpoint(args, model, staging)
    return out / "global_step0"
