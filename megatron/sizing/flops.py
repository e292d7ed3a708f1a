"""Model FLOPs per token, from the built model: what MFU is measured against.

Conventions (PaLM's, so figures compare with published MFU): a matmul of an [m, k] by [k, n] costs 2mkn; a
training step costs 3x the forward (backward = 2x forward); activation checkpointing's recomputation is not
counted (model FLOPs, not hardware FLOPs); attention scores count the full sequence (QK^T and AV: 4 S d per
token and layer, as PaLM's 12 L d S for training), not the causal half nor a sliding window's band (sdpa computes
the full scores and masks them); per query head, so grouped-query attention costs the same; multi-head latent
attention's scores count its query/key head dim (nope + rope) and its values v_head_dim. Elementwise work
(norms, activations, softmax, attention sinks' extra logit, AdamW) is left out.

The walk reads the modules, so new block kinds built from nn.Linear (gated MLPs, grouped-query attention,
shared experts: dense, every token runs them) count with no change here. Routed weights count at their
active share: an expert's weights top_k / E of the time (gated: its [D, 2F] up-projection), a LoRE's
top_l / M of its expert's rows (router-free: its one LoRE always), and the LoRE router only on its
expert's rows. The router's choice (top-k or Sinkhorn, whose iterations are elementwise) does not change them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class FlopsPerToken:
    """Forward FLOPs per token by kind; `training` is 3x their sum."""

    dense: float = 0.0  # every nn.Linear outside routed experts (attention projections, MLPs, routers, DiT)
    attention: float = 0.0  # scores and weighted values
    experts: float = 0.0  # routed experts' active share
    lores: float = 0.0  # LoREs' active share
    head: float = 0.0  # the LM head (tied or not)
    mtp: float = 0.0  # multi-token prediction modules (training only): all of their kinds, their heads included

    @property
    def forward(self) -> float:
        return self.dense + self.attention + self.experts + self.lores + self.head + self.mtp

    @property
    def training(self) -> float:
        return 3.0 * self.forward


def flops_per_token(model: nn.Module, seq_length: int) -> FlopsPerToken:
    """Forward FLOPs per token of a GPT (megatron/model/gpt.py) or any model made of nn.Linear and MoE layers.

    Multi-token prediction modules (`model.mtp`, megatron/model/mtp.py) go to `mtp`: each module's projection,
    block and pass through the shared head, per token (module d runs on S - d positions of S: counted as S)."""
    modules = getattr(model, "mtp", None) or []
    flops = _walk(model, seq_length, skip="mtp")
    embed = getattr(model, "embed", None)
    if isinstance(embed, nn.Embedding) and getattr(model, "lm_head", None) is None:  # tied: the head is a matmul
        flops.head = 2.0 * embed.num_embeddings * embed.embedding_dim
    elif isinstance(getattr(model, "lm_head", None), nn.Linear):  # untied: counted in dense above; move it here
        head = model.lm_head
        flops.dense -= 2.0 * head.in_features * head.out_features
        flops.head = 2.0 * head.in_features * head.out_features
    for module in modules:
        part = _walk(module, seq_length)
        flops.mtp += part.dense + part.attention + part.experts + part.lores + flops.head
    return flops


def attention_flops(module: nn.Module, seq_length: int) -> float:
    """Scores (2 S per query/key dim) and weighted values (2 S per value dim), per token and query head: the same
    head dim for both, or multi-head latent attention's (nope + rope for the scores, v_head_dim for the values)."""
    mla = getattr(module, "mla", None)
    if mla is not None:
        return 2.0 * seq_length * module.num_heads * (mla.qk_head_dim + mla.v_head_dim)
    return 4.0 * seq_length * module.num_heads * module.head_dim


def _walk(model: nn.Module, seq_length: int, skip: str | None = None) -> FlopsPerToken:
    """Every nn.Linear, attention and MoE layer of `model`, but those under the submodule named `skip`."""
    from megatron.model.moe import MoELayer

    modules = [(name, m) for name, m in model.named_modules() if skip is None or not name.startswith(f"{skip}.")]
    flops = FlopsPerToken()
    routed: set[int] = set()
    for _, module in modules:
        if isinstance(module, MoELayer):
            flops.experts += _expert_flops(module)
            flops.lores += _lore_flops(module)
            routed |= {id(p) for name, p in module.named_parameters() if name.startswith(("experts.", "lore."))}
    for name, module in modules:
        if isinstance(module, nn.Linear) and id(module.weight) not in routed:
            flops.dense += 2.0 * module.in_features * module.out_features
        if name.endswith("attention") and hasattr(module, "num_heads") and (
                hasattr(module, "head_dim") or hasattr(module, "mla")):
            flops.attention += attention_flops(module, seq_length)
    return flops


def _expert_flops(layer: nn.Module) -> float:
    """top_k experts per token, each 2 x its weights (no biases; any layout: stacked [E, ...] or Megablocks'
    [E*F, D] rows, gated or not, over this rank's experts)."""
    per_expert = sum(p.numel() for p in layer.experts.parameters()) / len(layer.local_experts)
    return 2.0 * layer.router.top_k * per_expert


def _lore_flops(layer: nn.Module) -> float:
    """Per routed row: its expert's LoRE router (d x M, applied to that expert's rows only) and top_l LoREs."""
    lore = getattr(layer, "lore", None)
    if lore is None:
        return 0.0
    per_lore = (lore.A[0, 0].numel() + lore.B[0, 0].numel())  # one LoRE of one expert: d x r + r x out
    active = lore.config.top_l if lore.routed else 1  # router-free: its one LoRE of rank M r
    router = lore.A.shape[2] * lore.lores_per_expert if lore.routed else 0
    return 2.0 * layer.router.top_k * (active * per_lore + router)


# Dense peak TFLOP/s per GPU from the vendors' data sheets (no sparsity); fp32 matmuls run on TF32 tensor cores
# only when allowed, so fp32 lists the plain FP32 figure. Matched by substring of the device name, first match
# wins, so the PCIe and NVL boards (lower clocks and power) come before their SXM namesakes.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": {"bfloat16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bfloat16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H100": {"bfloat16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM ("NVIDIA H100 80GB HBM3")
    "H200 NVL": {"bfloat16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H200": {"bfloat16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bfloat16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bfloat16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10": {"bfloat16": 125.0, "fp16": 125.0, "fp32": 31.2},
}


def data_sheet_peak(device_name: str, precision: str) -> float | None:
    """The data-sheet peak of the first GPU_PEAK_TFLOPS key the device name contains; None if none does."""
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(precision, peaks["fp32"])
    return None


def peak_tflops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the figure comes from): a known GPU's data sheet, else a short matmul
    probe on this device (on a CPU: the threads this process uses), so MFU is measured against something real."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = data_sheet_peak(name, precision)
        if known is not None:
            return known, f"{name} data sheet, {precision}"
    dtype = {"bfloat16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    dtype = torch.float32 if device.type == "cpu" else dtype  # CPU configs train in fp32
    n = 1024 if device.type == "cpu" else 8192
    # its own generator: drawing from the global one would shift dropout and jitter from the first log on, which
    # a resumed run reaches at another step
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    for _ in range(2):
        a @ b
    _synchronize(device)
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3 or repeats < 3:
        a @ b
        repeats += 1
    _synchronize(device)
    seconds = time.perf_counter() - start
    return 2.0 * n**3 * repeats / seconds / 1e12, f"measured {n}x{n} {str(dtype).removeprefix('torch.')} matmuls"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
