"""Kernel choice per device (CUDA faked with monkeypatch) and the grouped-kernel code paths, run on CPU.

The gmm path is driven on CPU by a stand-in with grouped_gemm's signature and checks; only the tests
marked `cuda` run the real kernels, and they skip without a CUDA device.
"""

import itertools
import sys
import types
import warnings

import pytest
import torch
from helpers.reference import per_group_reference

from megatron.model.moe import LoREConfig, MoELayer, kernels
from megatron.model.moe.kernels import (
    GMM_NEEDS,
    accumulate_grouped_matmul,
    grouped_matmul,
    load_gmm,
    resolve_moe_impl,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class FakeGmm:
    """grouped_gemm.ops.gmm's signature and input checks (bf16, contiguous, host int64 sizes), in torch ops."""

    def __init__(self):
        self.calls = []

    def __call__(self, a, b, batch_sizes, trans_b=False):
        assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64
        assert a.dtype == b.dtype == torch.bfloat16 and a.is_contiguous() and b.is_contiguous()
        assert batch_sizes.numel() == b.shape[0] and int(batch_sizes.sum()) == a.shape[0]
        self.calls.append(trans_b)
        w = b.transpose(-2, -1) if trans_b else b
        blocks = torch.split(a, batch_sizes.tolist())
        return torch.cat([blk.float() @ wg.float() for blk, wg in zip(blocks, w.unbind(0))]).to(a.dtype)


@pytest.fixture
def fake_device(monkeypatch):
    """fake_device(cuda_available, capability, gmm): what resolve_moe_impl sees of the machine."""

    def set_up(cuda_available: bool, capability: tuple[int, int] | None, gmm):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)

        def get_device_capability(device=None):
            if not cuda_available:
                raise AssertionError("CUDA queried on a machine without it")
            return capability

        monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
        monkeypatch.setattr(kernels, "load_gmm", lambda: gmm)
        monkeypatch.setattr(kernels, "_warned_slow_grouped_mm", False)

    return set_up


H100, B200, A100, A10, L4, RTX5090, V100 = (9, 0), (10, 0), (8, 0), (8, 6), (8, 9), (12, 0), (7, 0)
# (device, CUDA present, capability, grouped_gemm importable) -> (moe_impl: auto resolves to, warns)
AUTO_CASES = [
    ("cpu", False, None, False, "native", False),
    ("cpu", True, A100, True, "native", False),  # a CPU run on a GPU machine
    ("cpu", True, A100, False, "native", False),
    ("auto", False, None, False, "native", False),
    ("auto", False, None, True, "native", False),
    ("cuda", False, None, True, "native", False),  # asked for CUDA without it: the run fails elsewhere
    ("auto", True, H100, False, "native", False),
    ("cuda", True, H100, True, "native", False),  # torch's fused kernel beats a per-group gmm build
    ("cuda", True, B200, False, "native", False),
    ("cuda", True, B200, True, "native", False),
    ("cuda", True, A100, True, "grouped_gemm", False),
    ("auto", True, A100, True, "grouped_gemm", False),
    (torch.device("cuda", 0), True, A100, True, "grouped_gemm", False),
    ("cuda", True, A100, False, "native", True),
    ("auto", True, A100, False, "native", True),
    ("cuda", True, A10, True, "grouped_gemm", False),
    ("cuda", True, A10, False, "native", True),
    ("cuda", True, L4, True, "grouped_gemm", False),
    ("cuda", True, L4, False, "native", True),
    ("cuda", True, RTX5090, True, "grouped_gemm", False),  # no fused torch kernel past sm100 either
    ("cuda", True, RTX5090, False, "native", True),
    ("cuda", True, V100, True, "native", False),  # no bf16 kernels to switch to
    ("cuda", True, V100, False, "native", False),
]


@pytest.mark.parametrize("device, cuda_available, capability, has_gmm, expected, warns", AUTO_CASES)
def test_auto_resolves_by_device_capability_and_packages(fake_device, device, cuda_available, capability,
                                                         has_gmm, expected, warns):
    fake_device(cuda_available, capability, FakeGmm() if has_gmm else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_moe_impl("auto", device) == expected
    assert len(caught) == int(warns)
    if warns:
        message = str(caught[0].message)
        assert "pytorch issue 186620" in message and "pip install grouped_gemm" in message
        assert f"sm{capability[0]}{capability[1]}" in message


@pytest.mark.parametrize(
    "requested, device, cuda_available, capability, has_gmm",
    [
        (requested, device, cuda, capability if cuda else None, has_gmm)
        for requested, device, cuda, capability, has_gmm in itertools.product(
            ["native", "grouped_gemm", "megablocks"], ["cpu", "cuda", "auto"], [False, True],
            [H100, A100, V100], [False, True],
        )
        if cuda or capability == H100  # without CUDA the capability does not matter: one case
    ],
)
def test_explicit_choices_are_kept_silently(fake_device, requested, device, cuda_available, capability, has_gmm):
    fake_device(cuda_available, capability, FakeGmm() if has_gmm else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_moe_impl(requested, device) == requested
    assert caught == []


def test_unknown_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="moe_impl: 'megablock' is not one of auto, native, grouped_gemm, megablocks"):
        resolve_moe_impl("megablock", "cpu")
    with pytest.raises(ValueError, match="moe_impl: 'fast' is not one of"):
        MoELayer.build(8, 16, 2, 1, impl="fast")


def test_slow_path_warning_fires_once_per_process(fake_device):
    fake_device(True, A100, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert resolve_moe_impl("auto", "cuda") == "native"
        MoELayer.build(8, 16, 2, 1)  # a layer resolving "auto" itself does not repeat it either
    assert len(caught) == 1
    assert "torch's grouped_mm has no fused kernel" in str(caught[0].message)


def test_load_gmm_takes_grouped_gemm_ops_gmm_or_none(monkeypatch):
    fake = FakeGmm()
    package = types.ModuleType("grouped_gemm")
    package.ops = types.SimpleNamespace(gmm=fake)
    monkeypatch.setitem(sys.modules, "grouped_gemm", package)
    assert load_gmm() is fake
    monkeypatch.setitem(sys.modules, "grouped_gemm", None)  # makes the import fail, as when not installed
    assert load_gmm() is None


def test_build_resolves_for_the_run_device(fake_device):
    from megatron.config import load_config
    from megatron.model.build import moe_runtime_from_args

    def impl(device: str, moe_impl: str = "auto") -> str:
        args = load_config([], ["--moe_num_experts", "4", "--moe_router_type", "topk", "--moe_impl", moe_impl,
                                "--device", device])
        return moe_runtime_from_args(args).impl

    fake_device(True, A100, FakeGmm())
    assert impl("cuda") == "grouped_gemm"
    assert impl("cpu") == "native"
    fake_device(True, H100, FakeGmm())
    assert impl("auto") == "native"
    assert impl("cpu", "megablocks") == "megablocks"


def test_grouped_gemm_impl_needs_cuda_and_the_package(fake_device):
    fake_device(False, None, FakeGmm())
    with pytest.raises(RuntimeError, match="moe_impl: grouped_gemm needs CUDA"):
        MoELayer.build(8, 16, 2, 1, impl="grouped_gemm")
    fake_device(True, A100, None)
    with pytest.raises(RuntimeError, match="pip install grouped_gemm"):
        MoELayer.build(8, 16, 2, 1, impl="grouped_gemm")
    assert "pip install grouped_gemm" in GMM_NEEDS


# -- the grouped (CUDA) path of accumulate_grouped_matmul, forced on CPU, against the loop ---------------

# (rows per group, a width K, out width O): empty groups, all rows in one group, no rows at all, and widths
# that torch's grouped_mm cannot take (then the forced path keeps the loop)
SHAPES = [
    ([3, 0, 7, 0], 4, 12),
    ([0, 0, 0, 10], 8, 16),
    ([1, 2, 3, 4], 4, 8),
    ([10, 0, 0, 0], 16, 4),
    ([0, 5, 0, 5, 0, 0], 8, 32),
    ([2] * 16, 4, 8),
    ([0, 0, 0], 4, 8),
    ([4, 0, 2], 3, 5),  # 12- and 20-byte rows: no grouped kernel
]


def accumulate_and_grads(out_base, a, w, counts, **kwargs):
    base, a, w = (t.detach().clone().requires_grad_(True) for t in (out_base, a, w))
    out = accumulate_grouped_matmul(base * 1.0, a, w, torch.tensor(counts), **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    return (out.detach(), *torch.autograd.grad(out, [base, a, w], grad_out))


@pytest.mark.parametrize("counts, k, o", SHAPES)
def test_grouped_path_matches_the_loop_forward_and_backward(counts, k, o):
    torch.manual_seed(0)
    n, g = sum(counts), len(counts)
    out, a, w = torch.randn(n, o), torch.randn(n, k), torch.randn(g, k, o)
    grouped = accumulate_and_grads(out, a, w, counts, use_grouped_kernel=True)
    loop = accumulate_and_grads(out, a, w, counts, use_grouped_kernel=False)
    default = accumulate_and_grads(out, a, w, counts)  # CPU tensors: the loop
    expected = out + per_group_reference(a, w, counts) if n else out
    torch.testing.assert_close(grouped[0], expected)
    for got_grouped, got_loop, got_default in zip(grouped, loop, default):
        torch.testing.assert_close(got_grouped, got_loop)
        torch.testing.assert_close(got_default, got_loop)
    for gi, rows in enumerate(counts):
        if rows == 0:
            assert grouped[3][gi].abs().sum() == 0  # empty groups: a zero weight gradient


def test_grouped_path_makes_no_host_sync_and_leaves_out_alone(monkeypatch):
    counts = torch.tensor([3, 0, 5])
    out, a, w = torch.randn(8, 8), torch.randn(8, 4), torch.randn(3, 4, 8, requires_grad=True)
    before = out.clone()

    def no_tolist(self):
        raise AssertionError("tolist() on the grouped path: a host sync on CUDA")

    monkeypatch.setattr(torch.Tensor, "tolist", no_tolist)
    result = accumulate_grouped_matmul(out, a, w, counts, use_grouped_kernel=True)
    result.sum().backward()
    assert torch.equal(out, before)  # not in place: `out + term`
    monkeypatch.undo()
    torch.testing.assert_close(result, before + per_group_reference(a, w, [3, 0, 5]))


# -- the gmm path, with the stand-in on CPU --------------------------------------------------------------

@pytest.fixture
def gmm_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "GMM_DEVICE_TYPES", ("cuda", "cpu"))
    return FakeGmm()


@pytest.mark.parametrize("counts", [[3, 0, 7, 0], [0, 0, 0, 10], [1, 2, 3, 4]])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous_w", "transposed_w"])
def test_grouped_matmul_on_gmm_matches_reference(gmm_on_cpu, counts, transposed):
    torch.manual_seed(3)
    x = torch.randn(10, 16, dtype=torch.bfloat16, requires_grad=True)
    if transposed:  # a transposed view goes to gmm as its contiguous transpose with trans_b=True
        w_base = torch.randn(4, 8, 16, dtype=torch.bfloat16, requires_grad=True)
        w = w_base.transpose(1, 2)
    else:
        w_base = w = torch.randn(4, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    y = grouped_matmul(x, w, torch.tensor(counts), gmm=gmm_on_cpu)
    assert gmm_on_cpu.calls == [transposed] and y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().square().sum(), [x, w_base])
    xf, wf = x.detach().float().requires_grad_(True), w_base.detach().float().requires_grad_(True)
    y_ref = per_group_reference(xf, wf.transpose(1, 2) if transposed else wf, counts)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, torch.autograd.grad(y_ref.square().sum(), [xf, wf])):
        # bf16 products summed over 16 rows: an error relative to the gradient's scale, not to each element
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=2e-2 * float(want.abs().max()))


def test_gmm_takes_only_bf16_and_host_sizes_are_shared(gmm_on_cpu):
    x, w = torch.randn(6, 16), torch.randn(2, 16, 8)
    counts = torch.tensor([2, 4])
    torch.testing.assert_close(grouped_matmul(x, w, counts, gmm=gmm_on_cpu), per_group_reference(x, w, [2, 4]))
    assert gmm_on_cpu.calls == []  # fp32: torch's kernel
    grouped_matmul(x.bfloat16(), w.bfloat16(), counts, gmm=gmm_on_cpu, gmm_batch_sizes_G=counts.clone())
    assert gmm_on_cpu.calls == [False]
    grouped_matmul(x.bfloat16(), w.bfloat16(), counts, use_grouped_mm=False, gmm=gmm_on_cpu)
    assert gmm_on_cpu.calls == [False]  # the loop when asked for


GMM_SHAPES = [([3, 0, 7, 0], 8, 16), ([0, 0, 0, 10], 8, 32), ([1, 2, 3, 4], 16, 8), ([0, 5, 0, 5, 0, 0], 8, 8),
              ([2] * 16, 8, 16), ([0, 0, 0], 8, 8)]


@pytest.mark.parametrize("counts, k, o", GMM_SHAPES)
def test_accumulate_on_gmm_matches_the_loop(gmm_on_cpu, counts, k, o):
    torch.manual_seed(4)
    n, g = sum(counts), len(counts)
    out, a, w = (torch.randn(shape).bfloat16() for shape in ((n, o), (n, k), (g, k, o)))
    on_gmm = accumulate_and_grads(out, a, w, counts, use_grouped_kernel=True, gmm=gmm_on_cpu)
    assert gmm_on_cpu.calls == [False]
    loop = accumulate_and_grads(out.float(), a.float(), w.float(), counts, use_grouped_kernel=False)
    for got, want in zip(on_gmm, loop):
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=1e-1)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_on_gmm_matches_native_layer(fake_device, gmm_on_cpu, activation):
    """MoELayer(impl="grouped_gemm") with LoREs: experts and the LoRE B term on gmm, same function as native."""
    fake_device(True, A100, gmm_on_cpu)
    torch.manual_seed(5)
    lore = LoREConfig(num_lores=4, rank=8)
    native = MoELayer.build(32, 64, 4, 1, activation, lore=lore, impl="native", init_std=0.2, output_init_std=0.2)
    on_gmm = MoELayer.build(32, 64, 4, 1, activation, lore=lore, impl="grouped_gemm")
    assert native.experts.gmm is None and on_gmm.experts.gmm is gmm_on_cpu and on_gmm.lore.gmm is gmm_on_cpu
    on_gmm.load_state_dict(native.state_dict())
    x = torch.randn(24, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_native, _ = native(x)
        y_gmm, _ = on_gmm(x)
    assert len(gmm_on_cpu.calls) == 2  # up, down (the LoRE B term takes gmm for CUDA tensors only)
    torch.testing.assert_close(y_gmm.float(), y_native.float(), rtol=5e-2, atol=5e-2)
    y_gmm.float().sum().backward()
    assert all(p.grad is not None for p in on_gmm.experts.parameters())


@pytest.mark.parametrize("activation,lore", [("gelu", None), ("swiglu", None), ("geglu", LoREConfig(4, 8))])
def test_megablocks_layout_on_gmm_matches_native_layer(fake_device, gmm_on_cpu, activation, lore):
    from megatron.model.moe.megablocks import native_to_megablocks

    fake_device(True, A100, gmm_on_cpu)
    torch.manual_seed(6)
    native = MoELayer.build(32, 64, 4, 1, activation, lore=lore, impl="native", init_std=0.2, output_init_std=0.2)
    mb = MoELayer.build(32, 64, 4, 1, activation, lore=lore, impl="megablocks")
    mb.load_state_dict(native_to_megablocks(native.state_dict()))
    x = torch.randn(24, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_native, _ = native(x)
        y_mb, _ = mb(x)
    # w1 [E*F, D] with trans_b (gated: v1, the value, first, then w1, the gate), then w2
    assert gmm_on_cpu.calls == ([True, False] if activation == "gelu" else [True, True, False])
    torch.testing.assert_close(y_mb.float(), y_native.float(), rtol=5e-2, atol=5e-2)
    mb.eval()  # fp32 outside autocast: gmm cannot take it, torch's grouped_mm runs on the same weights
    torch.testing.assert_close(mb(x)[0], native(x)[0], rtol=1e-4, atol=1e-5)


# -- autocast: the grouped kernels get the operands autocast would give a matmul ---------------------

def test_grouped_kernels_follow_autocast_like_the_loop():
    torch.manual_seed(8)
    x, w, a = torch.randn(10, 16), torch.randn(4, 16, 32), torch.randn(10, 8)
    b = torch.randn(4, 8, 32)
    counts = torch.tensor([3, 0, 7, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped = grouped_matmul(x, w, counts)
        loop = grouped_matmul(x, w, counts, use_grouped_mm=False)
        assert grouped.dtype == loop.dtype == torch.bfloat16
        torch.testing.assert_close(grouped, loop)
        for use_grouped_kernel in (True, False):  # bf16 out, fp32 a and w: both paths line the dtypes up
            out = accumulate_grouped_matmul(grouped.clone(), a, b, counts, use_grouped_kernel=use_grouped_kernel)
            assert out.dtype == torch.bfloat16
            want = grouped.float() + per_group_reference(a, b, [3, 0, 7, 0])
            torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=1e-1)


def test_cuda_grouped_mm_is_used_below_its_group_limit_only():
    """torch's CUDA grouped_mm rejects 1024 groups or more (8 experts x 128 LoREs reach it): the loop then."""
    limit = kernels.CUDA_GROUPED_MM_MAX_GROUPS
    assert limit == 1023
    assert kernels.grouped_mm_takes_groups("cuda", limit) and not kernels.grouped_mm_takes_groups("cuda", limit + 1)
    assert kernels.grouped_mm_takes_groups("cpu", 8 * 128)  # the CPU kernel takes any number
    x, w = torch.randn(4, 16), torch.randn(8 * 128, 16, 16)
    assert kernels.grouped_mm_available(x, w)


# -- on a GPU ------------------------------------------------------------------------------------------

@pytest.mark.cuda
@requires_cuda
def test_more_groups_than_cuda_grouped_mm_takes_still_compute_the_grouped_product():
    torch.manual_seed(11)
    counts = torch.randint(0, 3, (8 * 128,)).tolist()  # an 8-expert StructMoE layer with 128 LoREs each
    n = sum(counts)
    x = torch.randn(n, 16, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(len(counts), 16, 32, device="cuda", dtype=torch.bfloat16)
    y = grouped_matmul(x, w, torch.tensor(counts, device="cuda"))
    torch.testing.assert_close(y.float(), per_group_reference(x.float(), w.float(), counts), rtol=2e-2, atol=1e-1)
    out = torch.randn(n, 32, device="cuda", dtype=torch.bfloat16)
    acc = accumulate_grouped_matmul(out, x, w, torch.tensor(counts, device="cuda"))
    torch.testing.assert_close(acc.float(), out.float() + per_group_reference(x.float(), w.float(), counts),
                               rtol=2e-2, atol=1e-1)



@pytest.mark.cuda
@requires_cuda
def test_resolve_on_this_gpu_and_the_default_cuda_path_matches_the_loop():
    assert resolve_moe_impl("auto", "cuda") in ("native", "grouped_gemm")
    torch.manual_seed(9)
    counts = [5, 0, 11, 0, 3, 1, 0, 12]
    n = sum(counts)
    for dtype in (torch.float32, torch.bfloat16):
        out, a, w = (torch.randn(shape, device="cuda", dtype=dtype) for shape in ((n, 64), (n, 16), (8, 16, 64)))
        default = accumulate_and_grads(out, a, w, counts)  # CUDA tensors: one grouped call
        loop = accumulate_and_grads(out, a, w, counts, use_grouped_kernel=False)
        tol = dict(rtol=2e-2, atol=1e-1) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
        for got, want in zip(default, loop):
            torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.cuda
@requires_cuda
def test_real_gmm_matches_reference_on_gpu():
    gmm = load_gmm()
    if gmm is None:
        pytest.skip("grouped_gemm is not installed")
    torch.manual_seed(10)
    counts = [5, 0, 11, 0]
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16)
    y = grouped_matmul(x, w, torch.tensor(counts, device="cuda"), gmm=gmm)
    torch.testing.assert_close(y.float(), per_group_reference(x.float(), w.float(), counts), rtol=2e-2, atol=2e-1)
    out = torch.randn(16, 128, device="cuda", dtype=torch.bfloat16)
    acc = accumulate_grouped_matmul(out, x, w, torch.tensor(counts, device="cuda"), gmm=gmm)
    torch.testing.assert_close(acc.float(), (out.float() + per_group_reference(x.float(), w.float(), counts)),
                               rtol=2e-2, atol=2e-1)
