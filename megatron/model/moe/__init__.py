"""Mixture-of-Experts: routers, expert capacity, token dispatcher, grouped and shared experts, StructMoE LoREs, the
layer."""

from megatron.model.moe.capacity import Capacity
from megatron.model.moe.config import MoEArchitecture, MoERuntime
from megatron.model.moe.dispatcher import LocalDispatcher
from megatron.model.moe.layer import MoEAux, MoELayer, moe_param_counts
from megatron.model.moe.lore import LoREBank, LoREConfig
from megatron.model.moe.router import Balancing, SinkhornRouter, TopKRouter

__all__ = ["Balancing", "Capacity", "LoREBank", "LoREConfig", "LocalDispatcher", "MoEArchitecture", "MoEAux",
           "MoELayer", "MoERuntime", "SinkhornRouter", "TopKRouter", "moe_param_counts"]
