"""A trained checkpoint as a Hugging Face folder: GPTNeoXForCausalLM, a Llama-family model (Llama, Mistral,
Qwen3, Mixtral, Qwen3-MoE), gpt-oss or DeepSeek-V3, when one of them computes exactly our model (every field of
its config, by the rule of fields.py), else our own code as remote code. Tokenizer files come from the run's
tokenizer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron.config import ConfigError
from megatron.data.tokenizer import HFTokenizer, SPMTokenizer, Tokenizer, tokenizer_of
from megatron.hf.deepseek_v3 import deepseek_blockers, deepseek_config, deepseek_notes, ours_to_deepseek
from megatron.hf.gpt_oss import gpt_oss_blockers, gpt_oss_config, ours_to_gpt_oss
from megatron.hf.llama import llama_blockers, llama_config, ours_to_llama
from megatron.hf.neox import neox_blockers, neox_config, ours_to_neox
from megatron.hf.remote import write_remote_folder
from megatron.model.gpt import GPT
from megatron.outputs import check_output_folder, new_output_folder
from megatron.runtime import optional_import
from megatron.training.pretrained import load_pretrained


def write_tokenizer_files(tokenizer: Tokenizer, vocab_file: str | None, out: Path, max_length: int) -> list[str]:
    """tokenizer.json (+ tokenizer_config.json) for AutoTokenizer; nothing for the byte-level tokenizer."""
    if isinstance(tokenizer, HFTokenizer):  # GPT2BPETokenizer too: its BPE saves as tokenizer.json
        if type(tokenizer) is HFTokenizer:
            shutil.copyfile(vocab_file, out / "tokenizer.json")
        else:
            tokenizer.tokenizer.save(str(out / "tokenizer.json"))
        eod = tokenizer.tokenizer.id_to_token(tokenizer.eod_id)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eod, "eos_token": eod,
                  "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    elif isinstance(tokenizer, SPMTokenizer):
        shutil.copyfile(vocab_file, out / "tokenizer.model")
        config = {"tokenizer_class": "LlamaTokenizer", "model_max_length": max_length}
    else:
        return []
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return sorted(p.name for p in out.iterdir() if p.name.startswith("tokenizer"))


@dataclass(frozen=True)
class NativeFormat:
    """A transformers family that computes some of our models exactly, loaded with no code of ours."""

    name: str
    blockers: Callable[[GPT], list[str]]  # why it cannot hold this model; [] when it computes exactly it
    config: Callable[[Any], dict[str, Any]]  # config.json (its `architectures` names the class)
    weights: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]]
    notes: Callable[[Any], list[str]] = lambda cfg: []  # what the report should say about this model's folder


NATIVE_FORMATS = (
    NativeFormat("GPT-NeoX", lambda model: neox_blockers(model.cfg), neox_config, ours_to_neox),
    NativeFormat("Llama family", lambda model: llama_blockers(model.cfg, model.moe_runtime), llama_config,
                 ours_to_llama),
    NativeFormat("gpt-oss", lambda model: gpt_oss_blockers(model.cfg, model.moe_runtime), gpt_oss_config,
                 ours_to_gpt_oss),
    NativeFormat("DeepSeek-V3", lambda model: deepseek_blockers(model.cfg, model.moe_runtime), deepseek_config,
                 ours_to_deepseek, deepseek_notes),
)


def choose_format(model: GPT) -> tuple[NativeFormat | None, list[str]]:
    """The first native format that computes exactly our model, or None (remote code) and every format's
    reasons, each prefixed with its name."""
    because = []
    for native in NATIVE_FORMATS:
        reasons = native.blockers(model)
        if not reasons:
            return native, []
        because += [f"{native.name}: {reason}" for reason in reasons]
    return None, because


def convert_to_hf(load: str | Path, out: str | Path) -> dict:
    """Writes the folder, whole or not at all (megatron/outputs.py); returns what was written: the format
    (native or remote_code), the transformers class, and for remote code why no native format holds the model."""
    out = check_output_folder(out)  # refused before the checkpoint is read
    args, model, path = load_pretrained(load)
    if args.model_type != "gpt":
        raise ConfigError(f"{path}: model_type {args.model_type}: only GPT language models convert to Hugging Face")
    tokenizer = tokenizer_of(args)
    ids = {"bos_token_id": tokenizer.eod_id, "eos_token_id": tokenizer.eod_id}
    cfg = model.cfg
    native, because = choose_format(model)
    with new_output_folder(out) as staging:
        if native is None:
            config = write_remote_folder(staging, model, ids)
        else:
            save_file = optional_import("safetensors.torch", "hf", "convert_to_hf").save_file
            config = {**native.config(cfg), **ids}
            weights = native.weights(model.state_dict(), cfg)
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        files = write_tokenizer_files(tokenizer, args.vocab_file, staging, cfg.max_position_embeddings)
    return {"checkpoint": str(path), "format": "remote_code" if native is None else "native",
            "class": config["architectures"][0], "model_type": config["model_type"], "because": because,
            "notes": [] if native is None else native.notes(cfg), "tokenizer_files": files}
