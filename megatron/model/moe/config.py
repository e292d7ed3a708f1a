"""An MoE model's settings, in two parts: what the model computes (`MoEArchitecture`, which a checkpoint or a
Hugging Face export carries) and how this run computes it (`MoERuntime`: the expert-parallel group, the
experts' kernels, the LSH-compressed exchange, token dropping), which belongs to the run and is never written
with the model. Token dropping is the run's because it is a remedy a run turns on or off (a run that ran out of
memory resumes with it); an export, or a model built without the run's settings, is dropless."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron.model.moe.capacity import Capacity
from megatron.model.moe.lore import LoREConfig
from megatron.model.moe.lsh import LSHConfig
from megatron.model.moe.router import Balancing
from megatron.parallel.expert_parallel import ExpertParallel


@dataclass(frozen=True)
class MoEArchitecture:
    """Which layers are MoE layers and what each computes: its experts, its router and its LoREs."""

    num_experts: int
    top_k: int = 1
    expert_interval: int = 1
    first_layer: int = 0  # MoE layers: first_layer, first_layer + expert_interval, ... (GPT-NeoX: 0)
    ffn_hidden_size: int | None = None  # each expert's width F; None: the dense MLP's
    jitter_eps: float | None = None
    renormalize: bool = False
    lbl_in_fp32: bool = False
    router_type: str = "topk"  # topk or sinkhorn (moe/router.py)
    score_function: str = "softmax"  # topk router: softmax over experts, or sigmoid with normalised gates
    balancing: Balancing = Balancing()  # topk router: loss-free bias, the load-balancing loss's scope
    num_shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeekMoE), one MLP that wide
    num_groups: int = 1  # topk router: group-limited choice (DeepSeek-V3's n_group); 1: none
    group_top_k: int = 1  # ... the groups each token keeps (topk_group)
    scaling_factor: float = 1.0  # the chosen gates multiplied by this (routed_scaling_factor)
    router_bias: bool = False  # a learned bias in the router's linear (gpt-oss), not the loss-free expert bias
    expert_biases: bool = False  # biases on both projections of every routed and shared expert (gpt-oss)
    lore: LoREConfig | None = None

    def is_moe_layer(self, layer_idx: int) -> bool:
        offset = layer_idx - self.first_layer
        return self.num_experts > 1 and offset >= 0 and offset % self.expert_interval == 0


@dataclass(frozen=True)
class MoERuntime:
    """How this run computes the MoE layers; none of it is saved with the model (megablocks only stores the same
    expert weights in another layout). A model's runtime names the layers that compress (`lsh_layers`);
    `for_layer` gives one layer's."""

    expert_parallel: ExpertParallel | None = None  # this rank's EP group; None: every expert is local
    impl: str = "auto"  # experts backend: auto, native, grouped_gemm, megablocks (moe/kernels.py)
    use_grouped_mm: bool | None = None  # None: torch's grouped_mm where available, False: a per-expert loop
    lsh: LSHConfig | None = None  # LSH-MoE compression of the exchange; None: exact
    lsh_layers: tuple[int, ...] | None = None  # which (MoE) layers compress; None: all
    capacity: Capacity | None = None  # token dropping: each expert's capacity and what it drops; None: dropless

    def for_layer(self, layer_idx: int) -> MoERuntime:
        """Layer `layer_idx`'s runtime: its LSH settings with a rotation of its own (seed + layer index), or none."""
        if self.lsh is None or (self.lsh_layers is not None and layer_idx not in self.lsh_layers):
            return dataclasses.replace(self, lsh=None, lsh_layers=None)
        return dataclasses.replace(self, lsh=dataclasses.replace(self.lsh, seed=self.lsh.seed + layer_idx),
                                   lsh_layers=None)
