"""A trained model (GPT or DiT) back from its checkpoint folder, on one process, for analysis and export."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from megatron.config import ConfigError, NeoXArgs, load_config
from megatron.config.loader import read_yaml
from megatron.data.tokenizer import vocab_size_of
from megatron.model.build import build_gpt
from megatron.model.dit import DiT, dit_config_from_args
from megatron.training import checkpoint as ckpt


def load_pretrained(load: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[NeoXArgs, nn.Module, Path]:
    """(the run's resolved config, the model with its trained weights, the checkpoint folder read).

    `load` is a save folder (its `latest` is read) or one `global_stepN` folder. The config is the one
    saved beside the weights; `overrides` (`--key value` pairs) change what does not touch the weights,
    such as LSH settings. Expert and ZeRO layouts of the run do not matter: the model is built whole.
    """
    path = ckpt.resolve_checkpoint(load)
    if path is None:
        raise ConfigError(f"{load}: no checkpoint (expected a save folder with `latest` or a global_stepN folder)")
    config = path / "config.yml"
    if not config.is_file():
        raise ConfigError(f"{path}: no config.yml beside the weights")
    saved = read_yaml(str(config))
    per_rank = saved["train_micro_batch_size_per_gpu"] * saved["gradient_accumulation_steps"]
    world = saved["train_batch_size"] // per_rank  # the run's data-parallel size, for the batch-size check
    args = load_config([str(config)], [*overrides, "--moe_expert_parallel_size", "1", "--zero_stage", "0"],
                       data_parallel_size=world)
    if args.model_type == "dit":
        model: nn.Module = DiT(dit_config_from_args(args))
    else:
        model = build_gpt(args, vocab_size_of(args))
    ckpt.load_model_weights(path, model)
    return args, model.eval(), path
