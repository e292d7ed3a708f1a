"""Measurements of LSH-MoE's compression, for training's logs and the calibration tools: how far a compressing
layer's output is from the exact exchange's. The compression itself is lsh.py; the model never imports this."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron.model.moe.lsh import CrossPolytopeHash


def relative_error(y: torch.Tensor, exact: torch.Tensor) -> float:
    return float((y.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-12))


def hashers_of(model: torch.nn.Module) -> list[CrossPolytopeHash]:
    """The hash of every compressing MoE layer of a model, in layer order."""
    return [m.dispatcher.hasher for m in model.modules() if hasattr(getattr(m, "dispatcher", None), "hasher")]


def outputs_under(layer: torch.nn.Module, x: torch.Tensor, dispatchers: dict) -> dict[str, tuple]:
    """The MoE layer's (output, aux) on x with each dispatcher in turn: eval mode (no router jitter), no
    gradients, and the layer's own dispatcher and mode put back afterwards."""
    own, was_training = layer.dispatcher, layer.training
    outputs = {}
    try:
        layer.eval()
        with torch.no_grad():
            for name, dispatcher in dispatchers.items():
                layer.dispatcher = dispatcher
                outputs[name] = layer(x)
    finally:
        layer.dispatcher = own
        layer.train(was_training)
    return outputs


def compression_errors(layer: torch.nn.Module, x: torch.Tensor, compressing) -> dict[str, float]:
    """Relative output error of an LSH dispatcher against its exact inner exchange, with and without the
    compensation, on the same rows and the same buckets."""
    outputs = outputs_under(layer, x, {"exact": compressing.inner,
                                       "with_compensation": compressing.with_compensation(True),
                                       "without_compensation": compressing.with_compensation(False)})
    exact = outputs.pop("exact")[0]
    return {name: relative_error(y, exact) for name, (y, _) in outputs.items()}


class CompressionErrorProbe:
    """Every so often, how far each compressing MoE layer's output is from the exact exchange's.

    `arm()` before a forward; during it, each compressing layer (found by its dispatcher's `inner`) is run
    again on the same input, in eval mode (no router jitter) and without gradients, three ways: the exact
    exchange, compressed with and compressed without compensation. It runs inside the layer's forward, so
    sharded weights are still gathered; with expert parallelism every rank measures at the same step, so
    the extra exchanges pair up. `pop()` returns the relative errors ||y - y_exact|| / ||y_exact|| of the
    layer output, averaged over the measurements since the last pop, per MoE layer (its index among the
    MoE layers, as in the routing statistics).
    """

    def __init__(self, model: torch.nn.Module):
        moe_layers = [m for m in model.modules() if hasattr(m, "expert_parts")]  # in order
        self.compressing = {i for i, layer in enumerate(moe_layers) if hasattr(layer.dispatcher, "inner")}
        self.armed: set[int] = set()
        self.errors: dict[str, list[float]] = {}
        for index in self.compressing:
            moe_layers[index].register_forward_hook(self._hook(index))

    def arm(self) -> None:
        self.armed = set(self.compressing)

    def _hook(self, index: int):
        def measure(layer, args, output):
            if index not in self.armed:
                return
            self.armed.discard(index)  # once per arming (activation recompute calls forward again)
            for name, error in compression_errors(layer, args[0].detach(), layer.dispatcher).items():
                self._add(f"moe/layer{index}/lsh_error_{name}", error)
        return measure

    def _add(self, key: str, value: float) -> None:
        self.errors.setdefault(key, []).append(value)

    def pop(self) -> dict[str, float]:
        means = {key: sum(values) / len(values) for key, values in self.errors.items()}
        self.errors = {}
        return means
