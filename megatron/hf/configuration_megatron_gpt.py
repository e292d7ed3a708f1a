"""Hugging Face config of a megatron-moe GPT (remote code, written by tools/convert_to_hf.py).

`gpt` holds the model's own GPTConfig (nested dataclasses tagged with their module and class); the
modeling file rebuilds it. The top-level sizes are copies for tools that read them.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MegatronGPTConfig(PretrainedConfig):
    model_type = "megatron_gpt"

    def __init__(self, gpt: dict | None = None, **kwargs):
        self.gpt = gpt or {}
        super().__init__(**kwargs)
