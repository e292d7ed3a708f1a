"""LSH-MoE: the hash, centroids by hand, exactness without collisions, gradients, and 2 ranks against 1."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers.distributed import assert_grads_match_one_rank, run_on_ranks

from megatron.model.moe import LoREConfig, MoELayer
from megatron.model.moe.lsh import CrossPolytopeHash, LSHConfig, compress, decompress
from megatron.model.moe.lsh_probes import CompressionErrorProbe
from megatron.parallel.expert_parallel import ExpertParallel


def test_hash_is_invariant_to_positive_scaling():
    hasher = CrossPolytopeHash(32, LSHConfig(num_hashes=3, hash_dim=8, seed=1))
    x = torch.randn(200, 32)
    keys = hasher(x)
    for scale in (1e-3, 0.5, 7.0, 1e4):
        assert torch.equal(hasher(x * scale), keys)
    assert not torch.equal(hasher(-x), keys)  # a negative scale flips the signs


def test_rotation_refresh_is_a_function_of_the_step():
    config = LSHConfig(num_hashes=2, hash_dim=4, seed=7, rotation_refresh_interval=3)
    walked, jumped = CrossPolytopeHash(16, config), CrossPolytopeHash(16, config)
    first = walked.rotation_DK.clone()
    for step in range(3):
        walked.at_step(step)
        assert torch.equal(walked.rotation_DK, first)
    walked.at_step(3)
    assert not torch.allclose(walked.rotation_DK, first)
    for step in range(4, 8):
        walked.at_step(step)
    jumped.at_step(7)  # a resumed run lands on step 7 directly
    assert torch.equal(walked.rotation_DK, jumped.rotation_DK)
    jumped.at_step(2)
    assert torch.equal(jumped.rotation_DK, first)
    never = CrossPolytopeHash(16, dataclasses.replace(config, rotation_refresh_interval=0))
    never.at_step(10**6)
    assert torch.equal(never.rotation_DK, first)


def test_close_vectors_share_buckets_and_far_ones_rarely_do():
    hasher = CrossPolytopeHash(64, LSHConfig(num_hashes=2, hash_dim=16, seed=2))
    torch.manual_seed(0)
    x = torch.randn(2000, 64)
    near = x + 1e-3 * x.norm(dim=1, keepdim=True) * torch.randn_like(x) / 8
    assert (hasher(near) == hasher(x)).float().mean() > 0.95
    assert (hasher(torch.randn(2000, 64)) == hasher(x)).float().mean() < 0.05  # 1024 buckets


def test_centroids_and_counts_by_hand():
    config = LSHConfig(num_hashes=1, hash_dim=4)
    hasher = CrossPolytopeHash(4, config)
    hasher.rotation_DK = torch.eye(4)  # bucket = 2 * argmax |x| + (sign < 0)
    x = torch.tensor([[3.0, 0, 0, 0], [1.0, 0.5, 0, 0], [-2.0, 0, 0, 0],  # expert 0: buckets 0, 0, 1
                      [0, 5.0, 0, 0], [2.0, 0, 0, 0]])  # expert 1: buckets 2, 0
    centroids, per_expert, compression = compress(x, torch.tensor([3, 2]), hasher, keep_residual=True)
    torch.testing.assert_close(centroids, torch.tensor([[2.0, 0.25, 0, 0], [-2.0, 0, 0, 0],
                                                        [0, 5.0, 0, 0], [2.0, 0, 0, 0]]))
    assert per_expert.tolist() == [2, 2]  # centroids in the order of their first row
    assert compression.centroid_of_row_N.tolist() == [0, 0, 1, 2, 3]
    y = torch.arange(4.0).unsqueeze(1).expand(4, 4)  # "expert output" c per centroid
    expected = y[[0, 0, 1, 2, 3]] + (x - centroids[[0, 0, 1, 2, 3]])
    torch.testing.assert_close(decompress(y, compression), expected)
    torch.testing.assert_close(compression.residual_ND[2:], torch.zeros(3, 4))  # alone in their buckets
    plain = compress(x, torch.tensor([3, 2]), hasher, keep_residual=False)[2]
    torch.testing.assert_close(decompress(y, plain), y[[0, 0, 1, 2, 3]])


FINE = LSHConfig(num_hashes=6, hash_dim=16)  # 32^6 buckets: random rows never collide


@pytest.mark.parametrize("lore", [None, LoREConfig(4, 3, top_l=1), LoREConfig(4, 3, top_l=2)],
                         ids=["plain", "structmoe_l1", "structmoe_l2"])
def test_one_row_per_bucket_equals_the_exact_layer_bit_for_bit(lore):
    layers = []
    for lsh in (None, FINE):
        torch.manual_seed(0)
        layers.append(MoELayer.build(16, 24, 4, 2, lore=lore, lsh=lsh))
    exact, compressed = layers
    x = torch.randn(40, 16, requires_grad=True)
    y_exact, _ = exact(x)
    y_exact.square().sum().backward()
    grad_exact = x.grad.clone()
    x.grad = None
    y_comp, _ = compressed(x)
    y_comp.square().sum().backward()
    assert torch.equal(y_comp, y_exact)
    assert torch.equal(x.grad, grad_exact)
    for (name, p), q in zip(exact.named_parameters(), compressed.parameters()):
        assert torch.equal(p.grad, q.grad), name


def reference_layer(layer: MoELayer, x: torch.Tensor, hasher: CrossPolytopeHash, compensate: bool) -> torch.Tensor:
    """The same math written out token by token: each (expert, bucket) group's mean through the expert MLP,
    back to every member with its residual, weighted by the gate."""
    probs = F.softmax(x @ layer.router.gate.weight.T, dim=-1)
    gates, experts = torch.topk(probs, layer.router.top_k, dim=-1)
    keys = hasher(x)
    out = torch.zeros_like(x)
    w_up, w_down = layer.experts.w_up_EDF, layer.experts.w_down_EFD
    for e in range(layer.num_experts):
        rows, slots = (experts == e).nonzero(as_tuple=True)
        for key in keys[rows].unique():
            members = rows[keys[rows] == key]
            member_slots = slots[keys[rows] == key]
            centroid = x[members].mean(dim=0)
            y_c = F.gelu(centroid @ w_up[e]) @ w_down[e]
            for token, slot in zip(members.tolist(), member_slots.tolist()):
                y = y_c + (x[token] - centroid if compensate else 0)
                out = out.index_add(0, torch.tensor([token]), (gates[token, slot] * y).unsqueeze(0))
    return out


@pytest.mark.parametrize("compensate", [True, False])
def test_compressed_layer_and_its_gradients_match_a_hand_written_reference(compensate):
    config = LSHConfig(num_hashes=1, hash_dim=2, error_compensation=compensate)  # 4 buckets: many collisions
    torch.manual_seed(0)
    layer = MoELayer.build(8, 12, 3, 2, lsh=config)
    hasher = CrossPolytopeHash(8, config)
    x = torch.randn(30, 8, requires_grad=True)
    y, _ = layer(x)
    assert layer.dispatcher.hasher(x).unique().numel() < 30  # rows really share buckets
    weights = torch.randn_like(y)
    grads = torch.autograd.grad((y * weights).sum(), [x, *layer.parameters()])
    y_ref = reference_layer(layer, x, hasher, compensate)
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), [x, *layer.parameters()], allow_unused=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, atol=1e-5, rtol=1e-4)


def _compressed_on_ranks(rank: int, world: int) -> None:
    """Each rank compresses its own rows; the experts on 2 EP ranks see the same centroids one rank would."""
    torch.set_default_dtype(torch.float64)
    config = LSHConfig(num_hashes=1, hash_dim=3)
    layers = []
    for ep in (None, ExpertParallel(world, rank, dist.group.WORLD)):
        torch.manual_seed(0)
        layers.append(MoELayer.build(8, 12, 4, 2, lore=LoREConfig(3, 2, top_l=1), lsh=config, expert_parallel=ep))
    full, part = layers
    torch.manual_seed(1)
    x = torch.randn(2 * 16, 8)
    halves = [slice(r * 16, (r + 1) * 16) for r in range(world)]
    weights = torch.linspace(-1, 1, x.shape[0]).unsqueeze(1)
    outputs = [full(x[h]) for h in halves]  # one rank, each rank's batch in turn
    sum((y * weights[h]).sum() for (y, _), h in zip(outputs, halves)).backward()
    y_part, _ = part(x[halves[rank]])
    (y_part * weights[halves[rank]]).sum().backward()
    torch.testing.assert_close(y_part, outputs[rank][0], atol=1e-10, rtol=1e-10)
    assert_grads_match_one_rank(full, part, "lsh")


def test_two_rank_compressed_exchange_equals_one_rank():
    run_on_ranks(_compressed_on_ranks, 2)


def test_error_probe_measures_against_the_exact_layer():
    coarse = LSHConfig(num_hashes=1, hash_dim=2)
    torch.manual_seed(0)
    layer = MoELayer.build(8, 12, 3, 1, lore=LoREConfig(4, 2), lsh=coarse)
    probe = CompressionErrorProbe(layer)
    x = torch.randn(40, 8)
    y_before, _ = layer(x)  # not armed: nothing measured
    assert probe.pop() == {}
    probe.arm()
    y_armed, _ = layer(x)
    errors = probe.pop()
    assert torch.equal(y_armed, y_before)  # measuring leaves the training forward alone
    exact_layer, plain_layer = (MoELayer.build(8, 12, 3, 1, lore=LoREConfig(4, 2), lsh=lsh)
                                for lsh in (None, dataclasses.replace(coarse, error_compensation=False)))
    exact_layer.load_state_dict(layer.state_dict())
    plain_layer.load_state_dict(layer.state_dict())
    exact = exact_layer(x)[0]
    expected = {"with_compensation": y_before, "without_compensation": plain_layer(x)[0]}
    for name, y in expected.items():
        want = float(((y - exact).norm() / exact.norm()).detach())
        assert errors[f"moe/layer0/lsh_error_{name}"] == pytest.approx(want, rel=1e-5)
        assert want > 0
    # at init the experts' outputs are ~1e-3 while x - c is O(1): the residual swamps the output
    assert errors["moe/layer0/lsh_error_with_compensation"] > 10 * errors["moe/layer0/lsh_error_without_compensation"]


def test_error_probe_reads_zero_without_collisions():
    torch.manual_seed(0)
    layer = MoELayer.build(16, 24, 4, 2, lsh=FINE)
    probe = CompressionErrorProbe(layer)
    probe.arm()
    layer(torch.randn(40, 16))
    assert probe.pop() == {"moe/layer0/lsh_error_with_compensation": 0.0,
                           "moe/layer0/lsh_error_without_compensation": 0.0}
