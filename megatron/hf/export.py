"""A trained checkpoint as a Hugging Face folder: GPTNeoXForCausalLM, or a Llama-family model (Llama, Qwen3,
Mixtral, Qwen3-MoE), when one of them computes exactly our model, else our own code as remote code. Tokenizer
files come from the run's tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron.config import ConfigError
from megatron.data.tokenizer import HFTokenizer, SPMTokenizer, Tokenizer, tokenizer_of
from megatron.hf.llama import llama_blockers, llama_config, ours_to_llama
from megatron.hf.neox import neox_blockers, neox_config, ours_to_neox
from megatron.hf.remote import write_remote_folder
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


def convert_to_hf(load: str | Path, out: str | Path) -> dict:
    """Writes the folder; returns what was written: the format and, for remote code, why."""
    args, model, path = load_pretrained(load)
    if args.model_type != "gpt":
        raise ConfigError(f"{path}: model_type {args.model_type}: only GPT language models convert to Hugging Face")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty (files of an earlier export could be mistaken for this one's)")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_of(args)
    ids = {"bos_token_id": tokenizer.eod_id, "eos_token_id": tokenizer.eod_id}
    cfg = model.cfg
    # the first native family that computes exactly our model, else our own code (remote code)
    native = [("gpt_neox", neox_blockers(cfg), neox_config, ours_to_neox),
              ("llama", llama_blockers(cfg, model.moe_runtime), llama_config, ours_to_llama)]
    family = next((entry for entry in native if not entry[1]), None)
    blockers = native[0][1] if family is None else []  # why not GPT-NeoX, the plainest of them
    if family is None:
        write_remote_folder(out, model, ids)
    else:
        save_file = optional_import("safetensors.torch", "hf", "convert_to_hf").save_file
        _, _, config_of, weights_of = family
        (out / "config.json").write_text(json.dumps({**config_of(cfg), **ids}, indent=2) + "\n")
        save_file(weights_of(model.state_dict(), cfg), str(out / "model.safetensors"), metadata={"format": "pt"})
    files = write_tokenizer_files(tokenizer, args.vocab_file, out, cfg.max_position_embeddings)
    return {"checkpoint": str(path), "format": "remote_code" if family is None else family[0], "because": blockers,
            "tokenizer_files": files}
