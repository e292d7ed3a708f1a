"""Remix-DiT experts as plain DiTs: one expert's mixed weights as a DiT state dict, and `ExpertSwitch`, every
expert mixed once and picked by timestep, for sampling at a plain DiT's cost per step.

Shape legend: L remixed linears of a model, K basis models, O out features, I in features; B batch,
C/H/W image dims, R the rows of one expert.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn

from megatron.model.dit.config import check_timesteps, timestep_interval
from megatron.model.dit.diffusion import forward_with_cfg
from megatron.model.dit.model import DiT
from megatron.model.dit.remix import forward_per_expert


@torch.no_grad()
def mixed_state_dict(model: DiT, n: int) -> dict[str, torch.Tensor]:
    """Expert n as a plain DiT state dict (official names and shapes): every remixed weight precomputed."""
    if model.config.remix is None:
        raise ValueError("mixed_state_dict: the model is a plain DiT (config.remix is None), it has no experts")
    coeffs_LK = model.expert_coefficients(n)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("remix_coeffs.")}
    for name, coeffs_K in zip(model.remixed_layer_names(), coeffs_LK, strict=True):
        weight_OI, bias_O = model.get_submodule(name).mixed_weights(coeffs_K)
        state[f"{name}.weight"] = weight_OI
        if bias_O is not None:
            state[f"{name}.bias"] = bias_O
    return state


class ExpertSwitch(nn.Module):
    """A Remix-DiT as N plain DiTs, one per timestep interval: every expert's weights are mixed once, so a sampling
    step costs one plain DiT (no mixing per call), at N times a plain DiT's memory.

    `config` is the experts' plain DiTConfig (samplers read `config.num_classes`); `intervals[n]` is expert n's
    [lo, hi), contiguous from 0 to `num_timesteps`. Built from a model (`from_remix`) or from exported files
    (tools/export_remix_experts.py's `load_exported_experts`).
    """

    def __init__(self, experts: Sequence[DiT], intervals: Sequence[tuple[int, int]]):
        super().__init__()
        if not experts or len(experts) != len(intervals):
            raise ValueError(f"ExpertSwitch: {len(experts)} experts for {len(intervals)} intervals "
                             f"(expected as many, at least one)")
        for n, expert in enumerate(experts):
            if expert.config.remix is not None:
                raise ValueError(f"ExpertSwitch: expert {n} is a Remix-DiT (expected plain DiTs)")
            if expert.config != experts[0].config:
                raise ValueError(f"ExpertSwitch: expert {n}'s config {expert.config} differs from expert 0's "
                                 f"{experts[0].config}")
        previous_hi = 0
        for n, (lo, hi) in enumerate(intervals):
            if lo != previous_hi or hi <= lo:
                raise ValueError(f"ExpertSwitch: expert {n}'s interval [{lo}, {hi}) (expected [{previous_hi}, hi) "
                                 f"with hi > {previous_hi}: intervals contiguous from 0)")
            previous_hi = hi
        self.experts = nn.ModuleList(experts)
        self.config = experts[0].config
        self.intervals = [(int(lo), int(hi)) for lo, hi in intervals]
        self.num_timesteps = self.intervals[-1][1]
        # expert n holds bounds[n-1] <= t < bounds[n]: torch.bucketize(t, bounds, right=True)
        self.register_buffer("bounds", torch.tensor([hi for _, hi in self.intervals[:-1]], dtype=torch.long),
                             persistent=False)

    @classmethod
    @torch.no_grad()
    def from_remix(cls, model: DiT) -> ExpertSwitch:
        """Every expert of a Remix-DiT mixed into its own plain DiT (`mixed_state_dict`), on the model's device
        and dtype and in its train/eval mode."""
        remix = model.config.remix
        if remix is None:
            raise ValueError("ExpertSwitch.from_remix: the model is a plain DiT (config.remix is None), it has no "
                             "experts")
        plain = dataclasses.replace(model.config, remix=None)
        experts = []
        for n in range(remix.num_experts):
            expert = DiT(plain)
            expert.load_state_dict(mixed_state_dict(model, n))
            experts.append(expert)
        weight = next(model.parameters())
        switch = cls(experts, [timestep_interval(n, remix) for n in range(remix.num_experts)])
        return switch.to(weight.device, weight.dtype).train(model.training)

    def expert_of(self, t_B: torch.Tensor) -> torch.Tensor:
        """[B] the expert whose interval holds each timestep."""
        check_timesteps(t_B, self.num_timesteps)
        if len(self.experts) == 1:
            return torch.zeros_like(t_B, dtype=torch.long)
        return torch.bucketize(t_B.long(), self.bounds.to(t_B.device), right=True)

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(out [B, C_out, H, W], {}) as DiT.forward: a batch of one expert (a sampling step) runs that plain DiT
        alone; rows of several experts run as one forward per expert, scattered back."""
        expert_B = self.expert_of(t_B)
        experts = expert_B.unique().tolist() or [0]  # an empty batch goes through expert 0
        if len(experts) == 1:
            return self.experts[experts[0]](x_BCHW, t_B, y_B)[0], {}
        return forward_per_expert(expert_B, experts, lambda n, rows_R: self.experts[n](
            x_BCHW[rows_R], t_B[rows_R], y_B[rows_R])[0]), {}

    def forward_with_cfg(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """DiT.forward_with_cfg's convention: the batch is [conditional half; null-class half], only the first half
        of x is read, both output halves carry uncond + s (cond - uncond) on the first C channels and the variance
        channels (learn_sigma) pass through."""
        return forward_with_cfg(self, x_BCHW, t_B, y_B, cfg_scale)
