"""Mixture-of-Experts: router, token dispatcher, grouped experts, StructMoE LoREs, the layer."""

from megatron.model.moe.dispatcher import LocalDispatcher
from megatron.model.moe.layer import MoEAux, MoELayer, moe_param_counts
from megatron.model.moe.lore import LoREBank, LoREConfig
from megatron.model.moe.router import TopKRouter

__all__ = ["LoREBank", "LoREConfig", "LocalDispatcher", "MoEAux", "MoELayer", "TopKRouter", "moe_param_counts"]
