"""Grouped-matmul kernels of the MoE layer, and the choice of experts backend for the run's device.

Shape legend: N sorted rows, G groups, K/M/O matmul dims.

Which grouped kernel runs where (`resolve_moe_impl` decides once, when the model is built, for the device
the run will use; nothing here queries CUDA in forward):
- CUDA sm90 / sm100 (H100, B200): torch's `grouped_mm`. Its fused kernel takes bf16 only, so under bf16
  autocast the operands are cast to bf16 first (autocast does not cover `grouped_mm`); fp32 operands
  take torch's fallback (see the host syncs below).
- other CUDA devices from sm80 on (A100 sm80, A10/L4 sm86/sm89, sm120): torch's `grouped_mm` has no fused
  kernel there (pytorch issue 186620: a per-group loop after a device-to-host copy), so `auto` takes
  `gmm` from the `grouped_gemm` package (the kernel behind Megablocks' grouped MLP) when it imports, on
  the native weight layout (`moe_impl: grouped_gemm`); gmm takes bf16 only, other dtypes go to torch.
  Without the package `auto` keeps torch's path and warns once. A plain `pip install grouped_gemm` build
  runs one cuBLAS GEMM per group from the host (no device-to-host copy inside); built with
  `GROUPED_GEMM_CUTLASS=1` it runs one CUTLASS grouped kernel.
- CUDA before sm80 (no bf16 tensor cores): torch's path, no warning.
- CPU: torch's `grouped_mm` where dtype and shape allow, else a per-group loop; the LoRE B term is a
  per-group in-place addmm loop (memory-bound there, and measured faster than one grouped call).

Host syncs left in the MoE layer on a GPU (each stalls the host until the device has done the queued
work), and why each is there. Counts use `router.count_ids` (a scatter-add of known size), never
`torch.bincount` (which reads its input's maximum on the host), and every `repeat_interleave` is given its
`output_size`; tests/unit/test_host_syncs.py runs the layer's GPU path on the CPU and finds no other sync:
- `AllToAllDispatcher.exchange` (dispatcher.py, expert parallelism only): one `.tolist()` of the send and
  receive split sizes, because `all_to_all_single` takes Python ints (the received row count that sizes
  the regrouping index comes from those, not from another sync).
- gmm (`grouped_gemm` and `megablocks` backends): the group sizes go to the host (`.cpu()`), because a
  default grouped_gemm build plans its per-group GEMMs on the host (only a CUTLASS build takes them on
  the device). The experts do it once per forward for both projections, the LoRE B term once more; the
  backward reuses them.
- torch's `grouped_mm` outside its fused case (fp32/fp16 operands, or a GPU other than sm90/sm100): torch
  copies the offsets to the host and loops over the groups, in each forward and backward call. With
  `moe_impl: grouped_gemm` the LoRE router and A projection (lore.py) still run here.
- the per-group loops: `grouped_matmul` where no grouped kernel takes the dtype/shape (fp16, or widths
  that are not multiples of 16 bytes) and `accumulate_grouped_matmul` on CPU: `rows_per_group.tolist()`.
- `LSHDispatcher` (LSH-MoE only): `torch.unique` of the bucket keys sizes the centroids on the host.
- token dropping only (`capacity.keep_within_capacity`): the number of slots kept, read once per layer call,
  because it sizes the rows the dispatcher gathers.
- `SinkhornRouter` in training: one `.item()`-like test per Sinkhorn iteration, as GPT-NeoX has it.
The LoRE B term on CUDA in bf16 (`accumulate_grouped_matmul`) is one grouped call on device offsets: on
sm90/sm100 it has no host sync (fp32 keeps the in-place loop and its one `.tolist()`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

MOE_IMPLS = ("auto", "native", "grouped_gemm", "megablocks")
TORCH_FUSED_GROUPED_MM_MAJORS = (9, 10)  # torch's fused bf16 grouped_mm: sm90 and sm100 only
CUDA_GROUPED_MM_MAX_GROUPS = 1023  # torch's CUDA grouped_mm rejects 1024 groups or more (the CPU one does not)
GMM_DEVICE_TYPES = ("cuda",)  # where gmm runs (tests add "cpu" to drive the gmm path with a stand-in)
GMM_NEEDS = "moe_impl: grouped_gemm needs CUDA and the grouped_gemm package (pip install grouped_gemm)"
SLOW_GROUPED_MM = (
    "moe_impl: auto on CUDA sm{major}{minor}: torch's grouped_mm has no fused kernel on this GPU (it copies the "
    "offsets to the host and runs one matmul per group: pytorch issue 186620), and the grouped_gemm package "
    "is not installed, so the experts and LoREs take that slow path. Fix: pip install grouped_gemm (then "
    "moe_impl: auto uses its gmm kernel; build it with GROUPED_GEMM_CUTLASS=1 for one fused kernel per call)."
)
_warned_slow_grouped_mm = False


# -- backend choice (build time) ------------------------------------------------------------------

def load_gmm() -> Callable | None:
    """`grouped_gemm.ops.gmm(a, b, batch_sizes, trans_b=False)`, or None when the package does not import.

    The same function Megablocks calls (`megablocks.grouped_gemm_util.ops` is `grouped_gemm.ops`).
    """
    try:
        from grouped_gemm import ops
    except (ImportError, OSError, RuntimeError):  # absent, or built against another torch/CUDA
        return None
    return getattr(ops, "gmm", None)


def require_gmm() -> Callable:
    gmm = load_gmm() if torch.cuda.is_available() else None
    if gmm is None:
        raise RuntimeError(GMM_NEEDS)
    return gmm


def warn_slow_grouped_mm_once(capability: tuple[int, int]) -> None:
    global _warned_slow_grouped_mm
    if not _warned_slow_grouped_mm:
        _warned_slow_grouped_mm = True
        warnings.warn(SLOW_GROUPED_MM.format(major=capability[0], minor=capability[1]), stacklevel=3)


def resolve_moe_impl(requested: str, device: torch.device | str | None = None) -> str:
    """The experts backend for a run on `device`: "native", "grouped_gemm" or "megablocks".

    `device` is the run's device: a torch.device, "cpu", "cuda", or "auto"/None (CUDA when available, as
    `device: auto` picks). Only `auto` depends on it; an explicit choice is returned as given (the layer
    checks that it can be built). Called when the model is built, never in forward.
    """
    if requested not in MOE_IMPLS:
        raise ValueError(f"moe_impl: {requested!r} is not one of {', '.join(MOE_IMPLS)}")
    if requested != "auto":
        return requested
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "native"
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability[0] in TORCH_FUSED_GROUPED_MM_MAJORS or capability < (8, 0):  # pre-Ampere: no bf16 kernels
        return "native"
    if load_gmm() is not None:
        return "grouped_gemm"
    warn_slow_grouped_mm_once(capability)
    return "native"


# -- kernels ----------------------------------------------------------------------------------------

def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on x in (x's own outside autocast), found without casting."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_operands(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What autocast does to a matmul's operands, for the grouped kernels it does not cover. Operands
    already in that dtype pass through uncopied, so callers cast once and hand the result on."""
    dtype = compute_dtype(x)
    return x.to(dtype), w.to(dtype)


class _GroupedMM(torch.autograd.Function):
    """F.grouped_mm with a backward that accepts any incoming gradient.

    torch 2.13's own grouped_mm backward rejects a non-contiguous gradient (e.g. the stride-0 gradient
    of `y.sum()`) with "Invalid strides/sizes"; here it is made contiguous first. Being a Function of
    its own (not a view-returning wrapper) also lets the LoRE term be added into the output in place.
    """

    @staticmethod
    def forward(ctx, x_NK, w_GKM, offsets_G):
        ctx.save_for_backward(x_NK, w_GKM, offsets_G)
        return F.grouped_mm(x_NK, w_GKM, offs=offsets_G)

    @staticmethod
    def backward(ctx, grad_NM):
        x_NK, w_GKM, offsets_G = ctx.saved_tensors
        grad_NM = grad_NM.contiguous()
        grad_x = F.grouped_mm(grad_NM, w_GKM.transpose(-2, -1), offs=offsets_G) if ctx.needs_input_grad[0] else None
        grad_w = F.grouped_mm(x_NK.T, grad_NM, offs=offsets_G) if ctx.needs_input_grad[1] else None  # 0 if empty
        return grad_x, grad_w, None


def grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """grouped_mm wants fp32/bf16, rows whose byte strides are multiples of 16, and on CUDA fewer than 1024
    groups (local experts x LoREs can reach that: 8 experts of 128 LoREs; those take the per-group loop)."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16) or w.dtype != x.dtype:
        return False
    if not grouped_mm_takes_groups(x.device.type, w.shape[0]):
        return False
    return all(size * x.element_size() % 16 == 0 for size in (x.shape[-1], w.shape[-1], w.shape[-2]))


def grouped_mm_takes_groups(device_type: str, groups: int) -> bool:
    return device_type != "cuda" or groups <= CUDA_GROUPED_MM_MAX_GROUPS


def gmm_available(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """grouped_gemm's gmm takes bf16 CUDA tensors (2-D rows, 3-D weights) only; its CUTLASS build wants
    rows of 8-element multiples (16 bytes), the same rule as torch's grouped_mm. `dtype`: the one both
    operands will have (`compute_dtype`), to ask before casting them."""
    x_dtype, w_dtype = (x.dtype, w.dtype) if dtype is None else (dtype, dtype)
    if x.device.type not in GMM_DEVICE_TYPES or x_dtype != torch.bfloat16 or w_dtype != torch.bfloat16:
        return False
    return x.dim() == 2 and w.dim() == 3 and all(size % 8 == 0 for size in (x.shape[-1], w.shape[-1], w.shape[-2]))


def gmm_matmul(gmm: Callable, x_NK: torch.Tensor, w_GKM: torch.Tensor, batch_sizes_G: torch.Tensor) -> torch.Tensor:
    """`gmm` on our operands: it wants contiguous tensors and host int64 group sizes; a weight whose
    transpose is contiguous (a transposed view) goes in as that transpose with `trans_b=True`."""
    batch_sizes_G = batch_sizes_G.to(device="cpu", dtype=torch.int64)  # a host sync if on the device
    x_NK = x_NK.contiguous()
    if not w_GKM.is_contiguous() and w_GKM.transpose(-2, -1).is_contiguous():
        return gmm(x_NK, w_GKM.transpose(-2, -1), batch_sizes_G, trans_b=True)
    return gmm(x_NK, w_GKM.contiguous(), batch_sizes_G, trans_b=False)


def grouped_matmul(
    x_NK: torch.Tensor,
    w_GKM: torch.Tensor,
    rows_per_group_G: torch.Tensor,
    use_grouped_mm: bool | None = None,
    gmm: Callable | None = None,
    gmm_batch_sizes_G: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row block g of x (rows_per_group_G[g] rows, in order) times w[g]: [N, M].

    use_grouped_mm: None picks a grouped kernel where one supports the dtype/shape, False forces the loop.
    gmm: grouped_gemm's kernel, used first where it applies (bf16 on CUDA); `gmm_batch_sizes_G` are the
    group sizes already on the host, to share one sync between calls.
    """
    if use_grouped_mm is None or use_grouped_mm:
        xg, wg = autocast_operands(x_NK, w_GKM)
        if gmm is not None and gmm_available(xg, wg):
            sizes = rows_per_group_G if gmm_batch_sizes_G is None else gmm_batch_sizes_G
            return gmm_matmul(gmm, xg, wg, sizes)
        if grouped_mm_available(xg, wg):
            offsets = torch.cumsum(rows_per_group_G, dim=0).to(torch.int32)  # cumulative ends, on the device
            return _GroupedMM.apply(xg, wg, offsets)
    # unbind, not w[g]: indexing one group at a time would make backward build a full-size zero
    # gradient per group, which is quadratic in the number of groups.
    blocks = torch.split(x_NK, rows_per_group_G.tolist())
    return torch.cat([block @ w for block, w in zip(blocks, w_GKM.unbind(0))], dim=0)


class _AccumulateGroupedMatmul(torch.autograd.Function):
    """out[rows of g] += a[rows of g] @ w[g], in place, for many small groups.

    Made for the LoRE up-projection (a is [N, R], w is [G, R, F] with G = E*M groups of a few rows):
    that matmul is bound by reading w and writing its gradient, not by FLOPs. Adding straight into the
    expert's [N, F] output saves allocating, writing and re-reading an [N, F] term; backward writes each
    group's weight gradient once, with no per-group zero tensors or stacking.
    """

    @staticmethod
    def forward(ctx, out_NO, a_NK, w_GKO, rows_per_group: list[int]):
        start = 0
        for g, rows in enumerate(rows_per_group):
            if rows:
                out_NO[start:start + rows].addmm_(a_NK[start:start + rows], w_GKO[g])
            start += rows
        ctx.mark_dirty(out_NO)
        ctx.save_for_backward(a_NK, w_GKO)
        ctx.rows_per_group = rows_per_group
        return out_NO

    @staticmethod
    def backward(ctx, grad_NO):
        a_NK, w_GKO = ctx.saved_tensors
        grad_a = torch.empty_like(a_NK) if ctx.needs_input_grad[1] else None
        grad_w = torch.empty_like(w_GKO) if ctx.needs_input_grad[2] else None
        start = 0
        for g, rows in enumerate(ctx.rows_per_group):
            block = slice(start, start + rows)
            if grad_a is not None and rows:
                torch.mm(grad_NO[block], w_GKO[g].T, out=grad_a[block])
            if grad_w is not None:
                if rows:
                    torch.mm(a_NK[block].T, grad_NO[block], out=grad_w[g])
                else:
                    grad_w[g].zero_()
            start += rows
        return grad_NO, grad_a, grad_w, None


def grouped_kernel_applies(a_NK: torch.Tensor, w_GKO: torch.Tensor, gmm: Callable | None = None) -> bool:
    """Whether one grouped call (gmm or torch's grouped_mm) can take these operands (already autocast)."""
    return (gmm is not None and gmm_available(a_NK, w_GKO)) or grouped_mm_available(a_NK, w_GKO)


def accumulate_grouped_matmul(
    out_NO: torch.Tensor,
    a_NK: torch.Tensor,
    w_GKO: torch.Tensor,
    rows_per_group_G: torch.Tensor,
    use_grouped_kernel: bool | None = None,
    gmm: Callable | None = None,
) -> torch.Tensor:
    """`out + grouped_matmul(a, w)`; the loop computes it in place into `out` (not to be needed elsewhere).

    use_grouped_kernel: None takes one grouped call (`out + grouped_matmul(a, w)`: torch's grouped_mm on
    device offsets, or gmm) for bf16 CUDA operands, and the per-group in-place addmm loop otherwise: on CPU,
    where it is faster, and for fp32/fp16 on CUDA, where no fused grouped kernel exists and torch's fallback
    would sync in forward and twice in backward where the loop syncs once. True / False force one or the
    other (True still takes the loop where no grouped kernel supports the dtype/shape).
    """
    a_NK, w_GKO = autocast_operands(a_NK, w_GKO)  # the fp32 weight cast once per call, not once per question
    if use_grouped_kernel is None:
        use_grouped_kernel = out_NO.device.type == "cuda" and a_NK.dtype == torch.bfloat16
    if use_grouped_kernel and grouped_kernel_applies(a_NK, w_GKO, gmm):
        return out_NO + grouped_matmul(a_NK, w_GKO, rows_per_group_G, gmm=gmm)
    # addmm_ needs one dtype: under autocast `out` and `a` come out of autocast's matmuls, w does not
    a_NK, w_GKO = a_NK.to(out_NO.dtype), w_GKO.to(out_NO.dtype)
    return _AccumulateGroupedMatmul.apply(out_NO, a_NK, w_GKO, rows_per_group_G.tolist())
