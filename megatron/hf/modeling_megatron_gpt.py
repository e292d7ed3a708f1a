"""A megatron-moe GPT as a Hugging Face causal LM (remote code, written by tools/convert_to_hf.py).

Shape legend: B batch, S sequence, V vocabulary.

The model is this project's own code (model_gpt.py and what it imports, shipped beside this file with
their imports made relative), not a second implementation: this file only rebuilds the GPTConfig from
config.json and adapts the call. `generate()` keeps keys and values in transformers' own cache object
(`CacheAdapter`), so each step runs only the new token; `attention_mask` pads rows on either side.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_megatron_gpt import MegatronGPTConfig
from .megatron_modules import __name__ as _shipped  # noqa: F401  (makes transformers copy every module)
from .model_gpt import GPT, make_attention
from .model_moe_config import MoERuntime
from .model_rope import Rotary


class CacheAdapter:
    """A transformers Cache seen through the two methods our attention calls on a KVCache (model_gpt.py), so
    that `generate()`'s own cache object holds the keys and values and no second cache format exists."""

    def __init__(self, cache: Any):
        self.cache = cache

    def length(self, layer: int = 0) -> int:
        return int(self.cache.get_seq_length(layer))

    def extend(self, layer: int, k_BKSDh: torch.Tensor, v_BKSDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k_BKSDh, v_BKSDh, layer)


def decode(value: Any) -> Any:
    """config.json's tagged dicts back into the shipped dataclasses."""
    if isinstance(value, dict) and "__dataclass__" in value:
        module, name = value["__dataclass__"].rsplit(".", 1)
        cls = getattr(importlib.import_module(f".{module}", __package__), name)
        return cls(**{k: decode(v) for k, v in value.items() if k != "__dataclass__"})
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


class MegatronGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegatronGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: MegatronGPTConfig):
        super().__init__(config)
        self.model = GPT(decode(config.gpt), MoERuntime(impl="native"))  # one process, torch's kernels
        self._reference: dict[str, torch.nn.Module] = {}
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """Every weight comes from model.safetensors; only the rotary tables (buffers that are not saved)
        are filled here, from an attention block our code builds on the CPU (the kind the config chooses:
        multi-head latent attention rotates only its rope dims)."""
        if isinstance(module, Rotary):
            if "rotary" not in self._reference:  # a dict, not a submodule: modules are being iterated
                with torch.device("cpu"):
                    self._reference["rotary"] = make_attention(self.model.cfg).rotary
            reference = self._reference["rotary"]
            for name, buffer in reference.named_buffers():
                getattr(module, name).copy_(buffer)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, cache: Any = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Causal attention over the tokens in `cache` (transformers' cache object, which `generate()` passes and
        then slices `input_ids` to the new tokens) and `input_ids`; `attention_mask` (cached and new tokens, 0
        for padding) gives each row its own positions and hides its padding."""
        logits_BSV, _ = self.model(input_ids, cache=None if cache is None else CacheAdapter(cache),
                                   attention_mask_BT=attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits_BSV, cache=cache)
