"""Megablocks backend: weight-layout conversion on CPU; the kernel path only where CUDA exists."""

import pytest
import torch
import torch.nn.functional as F

from megatron.model.moe import MoELayer
from megatron.model.moe.megablocks import NEEDS, megablocks_to_native, native_to_megablocks


def test_conversion_round_trips_and_follows_megablocks_math():
    torch.manual_seed(0)
    E, D, Fd = 4, 8, 12
    layer = MoELayer.build(D, Fd, E, 1, init_std=0.3, output_init_std=0.3)
    native = {k: v.detach() for k, v in layer.state_dict().items()}
    mb = native_to_megablocks(native)
    assert mb["experts.w1"].shape == (E * Fd, D) and mb["experts.w2"].shape == (E * Fd, D)
    back = megablocks_to_native(mb, E)
    assert back.keys() == native.keys() and all(torch.equal(back[k], native[k]) for k in native)
    # Megablocks' grouped MLP: expert e computes gelu(x @ w1[e].T) @ w2[e] with w1, w2 viewed [E, F, D].
    x = torch.randn(10, D)
    y, _ = layer(x)
    w1, w2 = mb["experts.w1"].view(E, Fd, D), mb["experts.w2"].view(E, Fd, D)
    probs = F.softmax(x @ layer.router.gate.weight.T, dim=-1)
    gate, ids = probs.max(dim=-1)
    expected = torch.stack([gate[t] * F.gelu(x[t] @ w1[ids[t]].T) @ w2[ids[t]] for t in range(10)])
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation,act", [("swiglu", F.silu), ("geglu", F.gelu)])
def test_gated_conversion_is_megablocks_glu_layout(activation, act):
    """Gated experts convert to Megablocks' GroupedGLU layout: w1 the gate, v1 the value, both [E*F, D];
    expert e computes (act(x @ w1[e].T) * (x @ v1[e].T)) @ w2[e]."""
    torch.manual_seed(1)
    E, D, Fd = 3, 8, 12
    layer = MoELayer.build(D, Fd, E, 1, activation, init_std=0.3, output_init_std=0.3)
    native = {k: v.detach() for k, v in layer.state_dict().items()}
    mb = native_to_megablocks(native)
    assert {k: tuple(v.shape) for k, v in mb.items() if k.startswith("experts.")} == {
        "experts.w1": (E * Fd, D), "experts.v1": (E * Fd, D), "experts.w2": (E * Fd, D)}
    back = megablocks_to_native(mb, E)
    assert back.keys() == native.keys() and all(torch.equal(back[k], native[k]) for k in native)
    x = torch.randn(10, D)
    y, _ = layer(x)
    w1, v1, w2 = (mb[f"experts.{n}"].view(E, Fd, D) for n in ("w1", "v1", "w2"))
    gate, ids = F.softmax(x @ layer.router.gate.weight.T, dim=-1).max(dim=-1)
    expected = torch.stack([gate[t] * (act(x[t] @ w1[ids[t]].T) * (x[t] @ v1[ids[t]].T)) @ w2[ids[t]]
                            for t in range(10)])
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_megablocks_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="moe_impl: megablocks needs CUDA"):
        MoELayer.build(8, 16, 2, 1, impl="megablocks")
    assert "pip install megablocks" in NEEDS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and megablocks")
def test_megablocks_layer_matches_native_on_cuda():
    pytest.importorskip("megablocks")
    torch.manual_seed(0)
    native = MoELayer.build(64, 128, 4, 1).cuda()
    mb = MoELayer.build(64, 128, 4, 1, impl="megablocks").cuda()
    mb.load_state_dict(native_to_megablocks(native.state_dict()))
    x = torch.randn(32, 64, device="cuda")
    torch.testing.assert_close(mb(x)[0], native(x)[0], rtol=1e-3, atol=1e-4)
