"""Host syncs in the MoE layer: what would stall a GPU's host, found on the CPU.

On CUDA an op whose output size depends on tensor values (bincount, nonzero, unique, repeat_interleave without
`output_size`) or that reads a value (`item`, `tolist`, `.cpu()`) makes the host wait for the device. The
layer's GPU path (torch's grouped_mm on device offsets, one grouped call for the LoRE B term) must run none of
them outside the places kernels.py lists. These tests run that path on the CPU (the grouped kernel forced where
the CPU would pick its loop) and record every such op.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.model.moe import Balancing, Capacity, LoREConfig, MoELayer, lore, router
from megatron.model.moe.kernels import accumulate_grouped_matmul
from megatron.model.moe.lsh import CrossPolytopeHash, LSHConfig

VALUE_SIZED_OPS = {"aten::bincount", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
                   "aten::unique_consecutive", "aten::masked_select", "aten::_local_scalar_dense"}


class SyncRecorder(TorchDispatchMode):
    """Every op that would sync a CUDA host, by name."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in VALUE_SIZED_OPS:
            self.syncs.append(name)
        if name == "aten::repeat_interleave" and len(args) == 1 and kwargs.get("output_size") is None:
            self.syncs.append("aten::repeat_interleave without output_size")
        return func(*args, **kwargs)


@pytest.fixture
def record_syncs(monkeypatch):
    """The recorder, with the Python-side reads (tolist, item, cpu) recorded too and the LoRE B term on its
    GPU path (one grouped call) instead of the CPU's in-place loop."""
    recorder = SyncRecorder()
    for method in ("tolist", "item", "cpu"):
        real = getattr(torch.Tensor, method)

        def recording(self, *args, _real=real, _name=method, **kwargs):
            recorder.syncs.append(f"Tensor.{_name}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, recording)
    monkeypatch.setattr(lore, "accumulate_grouped_matmul",
                        functools.partial(accumulate_grouped_matmul, use_grouped_kernel=True))
    return recorder


GLOBAL_BIAS = Balancing(bias=True, lbl_scope="global_batch")  # sigmoid scores, biased choice, running counts
LAYERS = {
    "plain_top2": dict(num_experts=8, top_k=2),
    "structmoe_l1": dict(num_experts=8, top_k=1, lore=LoREConfig(8, 8, top_l=1)),
    "structmoe_l2": dict(num_experts=8, top_k=2, lore=LoREConfig(8, 8, top_l=2)),
    "router_free": dict(num_experts=8, top_k=1, lore=LoREConfig(8, 8, mode="router_free")),
    "standalone": dict(num_experts=8, top_k=1, lore=LoREConfig(8, 8, mode="standalone")),
    "swiglu_shared": dict(num_experts=8, top_k=2, activation="swiglu", num_shared_experts=1),
    "routing_remedies": dict(num_experts=8, top_k=2, score_function="sigmoid", balancing=GLOBAL_BIAS,
                             lore=LoREConfig(8, 8, top_l=1, balancing=GLOBAL_BIAS)),
    "sequence_loss": dict(num_experts=8, top_k=2, balancing=Balancing(lbl_scope="sequence")),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_moe_layer_forward_and_backward_make_no_host_sync(name, record_syncs):
    torch.manual_seed(0)
    layer = MoELayer.build(32, 64, impl="native", **LAYERS[name])
    x = torch.randn(2, 24, 32, requires_grad=True)
    with record_syncs:
        y, aux = layer(x)
        (y.square().sum() + aux.load_balancing_loss + aux.lore_balancing_loss).backward()
    assert record_syncs.syncs == []


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_token_dropping_adds_one_host_sync_the_kept_row_count(policy, record_syncs):
    torch.manual_seed(0)
    layer = MoELayer.build(32, 64, num_experts=8, top_k=2, impl="native", lore=LoREConfig(8, 8, top_l=1),
                           capacity=Capacity(0.5, 0.5, 0, policy))
    x = torch.randn(2, 24, 32, requires_grad=True)
    with record_syncs:
        y, aux = layer(x)
        (y.square().sum() + aux.load_balancing_loss + aux.lore_balancing_loss).backward()
    assert record_syncs.syncs == ["aten::_local_scalar_dense"] and aux.dispatch_stats["dropped_fraction"] > 0


def test_the_recorder_sees_the_syncs_it_looks_for(record_syncs):
    """The check above can fail: bincount, repeat_interleave without output_size and tolist are seen."""
    ids = torch.tensor([0, 2, 2])
    with record_syncs:
        torch.bincount(ids, minlength=4)
        torch.repeat_interleave(torch.arange(3), ids)
        ids.tolist()
    assert record_syncs.syncs == ["aten::bincount", "aten::repeat_interleave without output_size", "Tensor.tolist"]


@pytest.mark.parametrize("size", [1, 5, 64])
def test_count_ids_equals_bincount(size):
    ids = torch.randint(size, (7, 3), generator=torch.Generator().manual_seed(size))
    counts = router.count_ids(ids, size)
    assert counts.dtype == torch.long
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=size).tolist()
    assert router.count_ids(ids[:0], size).tolist() == [0] * size


def test_lore_b_weight_is_cast_to_bf16_once_per_call():
    """Under autocast the fp32 B weight is cast to bf16 once, however many checks look at its dtype."""
    torch.manual_seed(1)
    b = torch.randn(4, 8, 16, requires_grad=True)
    out, a, counts = torch.randn(12, 16).bfloat16(), torch.randn(12, 8).bfloat16(), torch.tensor([3, 0, 5, 4])
    casts = []

    class CastRecorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == b.shape:
                casts.append(kwargs.get("dtype"))
            return func(*args, **(kwargs or {}))

    for use_grouped_kernel in (True, False):
        casts.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16), CastRecorder():
            accumulate_grouped_matmul(out.clone(), a, b, counts, use_grouped_kernel=use_grouped_kernel)
        assert casts == [torch.bfloat16], (use_grouped_kernel, casts)


def test_lsh_buckets_are_the_fp32_buckets_under_bf16_autocast():
    torch.manual_seed(2)
    x = torch.randn(256, 64)
    hasher = CrossPolytopeHash(64, LSHConfig(num_hashes=2, hash_dim=8))
    exact = hasher(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(hasher(x), exact)
