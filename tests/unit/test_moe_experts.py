"""Grouped matmuls and the dropless experts: both code paths against plain per-group loops."""

import pytest
import torch
import torch.nn.functional as F
from helpers.reference import per_group_reference

from megatron.model.moe.experts import GroupedExperts
from megatron.model.moe.kernels import accumulate_grouped_matmul, grouped_matmul

COUNTS = [[3, 0, 7, 0], [0, 0, 0, 10], [1, 2, 3, 4], [10, 0, 0, 0]]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped_mm", "loop"])
def test_grouped_matmul_forward_and_grads_with_empty_groups(counts, use_grouped_mm):
    torch.manual_seed(0)
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    y = grouped_matmul(x, w, torch.tensor(counts), use_grouped_mm)
    y.sum().backward()  # a stride-0 gradient: grouped_mm's own backward rejects it
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_ref = per_group_reference(x, w, counts)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], w.grad)
    for g, n in enumerate(counts):
        if n == 0:
            assert grads[1][g].abs().sum() == 0


@pytest.mark.parametrize("counts", COUNTS)
def test_accumulate_grouped_matmul_adds_in_place_with_right_grads(counts):
    torch.manual_seed(1)
    base = torch.randn(10, 12, requires_grad=True)
    a = torch.randn(10, 4, requires_grad=True)
    w = torch.randn(4, 4, 12, requires_grad=True)
    grad_out = torch.randn(10, 12)
    out = accumulate_grouped_matmul(base * 1.0, a, w, torch.tensor(counts))
    grads = torch.autograd.grad(out, [base, a, w], grad_out)
    expected = base + per_group_reference(a, w, counts)
    torch.testing.assert_close(out, expected)
    for g, g_ref in zip(grads, torch.autograd.grad(expected, [base, a, w], grad_out)):
        torch.testing.assert_close(g, g_ref)


def expert_reference(experts: GroupedExperts, x, counts):
    rows, start = [], 0
    for e, n in enumerate(counts):
        h = F.gelu(x[start:start + n] @ experts.w_up_EDF[e])
        rows.append(h @ experts.w_down_EFD[e])
        start += n
    return torch.cat(rows)


@pytest.mark.parametrize("counts", [[5, 0, 6, 2], [0, 13, 0, 0], [1, 1, 1, 0]])
def test_grouped_and_loop_experts_agree_and_match_the_reference(counts):
    torch.manual_seed(2)
    grouped = GroupedExperts(4, 16, 32, init_std=0.3, output_init_std=0.3, use_grouped_mm=True)
    loop = GroupedExperts(4, 16, 32, use_grouped_mm=False)
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(sum(counts), 16)
    tokens = torch.tensor(counts)
    results = []
    for experts in (grouped, loop):
        xr = x.clone().requires_grad_(True)
        y, aux = experts(xr, tokens)
        assert aux is None
        grads = torch.autograd.grad(y.square().sum(), [xr, experts.w_up_EDF, experts.w_down_EFD])
        results.append((y, *grads))
    xr = x.clone().requires_grad_(True)
    y_ref = expert_reference(grouped, xr, counts)
    expected = (y_ref, *torch.autograd.grad(y_ref.square().sum(), [xr, grouped.w_up_EDF, grouped.w_down_EFD]))
    for got_grouped, got_loop, want in zip(*results, expected):
        torch.testing.assert_close(got_grouped, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_loop, want, rtol=1e-4, atol=1e-5)


def test_grouped_mm_falls_back_where_unsupported():
    x = torch.randn(6, 5, dtype=torch.float64)  # float64 and odd widths: grouped_mm cannot take them
    w = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(grouped_matmul(x, w, torch.tensor([2, 4])), per_group_reference(x, w, [2, 4]))


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="activation: unknown 'tanhh'"):
        GroupedExperts(2, 8, 16, activation="tanhh")
