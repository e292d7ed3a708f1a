"""gpt-oss's MoE pieces: the clamped SwiGLU, the router's bias, experts with biases, the softmax over the top-k logits.

Against transformers' GptOssMLP (router + experts) with copied weights (fp32, 1e-5) on the grouped_mm path and the
per-expert loop; the clamped SwiGLU against transformers' own gate function in the dense MLP and the shared experts;
experts with biases under LoREs (every mode) and token dropping against a per-token loop whose activation is
transformers'; the grouped_gemm and Megablocks layouts with biases on a CPU stand-in of gmm.

Shape legend: T tokens, D hidden, F an expert's width, E experts, K experts per token, U = 2F.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron.hf.gpt_oss import deinterleave, interleave
from megatron.model.activations import Activation
from megatron.model.gpt import MLP, GPTConfig
from megatron.model.moe import Capacity, LoREConfig, MoELayer, kernels
from megatron.model.moe.experts import SharedExperts

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssMLP  # noqa: E402

CLAMPED = Activation("clamped_swiglu", alpha=1.702, limit=7.0)


def hf_act(h_NU: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """transformers' gpt-oss gate function on our [value | gate] rows, through their interleaved layout."""
    return GptOssExperts._apply_gate(SimpleNamespace(alpha=alpha, limit=limit), interleave(h_NU))


def test_interleave_helpers_are_the_exact_permutation():
    """deinterleave takes gpt-oss's columns (gate at even ones, up at odd ones) to [up | gate]; interleave undoes it."""
    F_ = 5
    theirs = torch.arange(2 * F_).float()  # column j holds j
    ours = deinterleave(theirs)
    assert ours.tolist() == [1, 3, 5, 7, 9, 0, 2, 4, 6, 8]
    assert torch.equal(interleave(ours), theirs)
    w = torch.randn(3, 4, 2 * F_)
    assert torch.equal(interleave(deinterleave(w)), w) and torch.equal(deinterleave(interleave(w)), w)


@pytest.mark.parametrize(("alpha", "limit"), [(1.702, 7.0), (1.0, 0.5)])
def test_clamped_swiglu_equals_transformers_and_clamps(alpha, limit):
    torch.manual_seed(0)
    h_NU = torch.randn(64, 16) * 6  # many entries past the limit
    value, gate = h_NU.chunk(2, dim=-1)
    assert (gate > limit).any() and (value.abs() > limit).any()
    act = Activation("clamped_swiglu", alpha, limit)
    torch.testing.assert_close(act(h_NU), hf_act(h_NU, alpha, limit), rtol=0, atol=0)
    # closed form at chosen points: gate above the limit is the limit; value 0 passes gate * sigmoid(alpha gate)
    h = torch.tensor([[0.0, 100.0], [-100.0, 1.0]])  # rows [value, gate]
    g = min(1.0, limit)
    want = torch.tensor([[limit * torch.sigmoid(torch.tensor(alpha * limit))],
                         [(1 - limit) * g * torch.sigmoid(torch.tensor(alpha * g))]])
    torch.testing.assert_close(act(h), want)


def test_unknown_activation_and_bad_parameters_are_one_line():
    with pytest.raises(ValueError, match="activation: unknown 'swish'"):
        Activation("swish")
    with pytest.raises(ValueError, match="swiglu_alpha 0 and swiglu_limit 7.0 must be > 0"):
        Activation("clamped_swiglu", 0, 7.0)


def test_dense_mlp_applies_the_clamped_swiglu():
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=8, hidden_size=16, intermediate_size=48, activation="clamped_swiglu",
                    swiglu_alpha=1.5, swiglu_limit=2.0)
    mlp = MLP(cfg)
    assert mlp.up.weight.shape == (32, 16) and mlp.up.bias is not None  # gated: 2/3 of 48 = 32 = 2 x 16
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 1.0)
    x = torch.randn(5, 16)
    expected = hf_act(x @ mlp.up.weight.T + mlp.up.bias, 1.5, 2.0) @ mlp.down.weight.T + mlp.down.bias
    torch.testing.assert_close(mlp(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_shared_experts_apply_the_clamped_swiglu_with_biases():
    torch.manual_seed(2)
    shared = SharedExperts(2, 16, 8, CLAMPED, init_std=1.0, output_init_std=1.0, bias=True)
    with torch.no_grad():
        shared.up.bias.normal_()
        shared.down.bias.normal_()
    x = torch.randn(5, 16)
    expected = hf_act(x @ shared.up.weight.T + shared.up.bias) @ shared.down.weight.T + shared.down.bias
    torch.testing.assert_close(shared(x), expected, rtol=1e-5, atol=1e-5)


# -- against transformers' GptOssMLP ----------------------------------------------------------------------------

def gpt_oss_pair(E=8, K=3, D=32, F_=16, **settings):
    """transformers' GptOssMLP with random weights, and our MoELayer (softmax top-k, renormalised, router bias,
    experts with biases, clamped SwiGLU) with them copied; `settings` are MoELayer.build's."""
    config = transformers.GptOssConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E,
                                       num_experts_per_tok=K, swiglu_limit=7.0)
    config._experts_implementation = "eager"  # transformers' per-expert loop, the reference
    theirs = GptOssMLP(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 1.0)
        theirs.experts.down_proj.mul_(0.2)
    ours = MoELayer.build(D, F_, E, K, CLAMPED, router_type="topk", renormalize=True, router_bias=True,
                          expert_biases=True, **settings).eval()
    copy_gpt_oss_weights(theirs, ours)
    return theirs, ours


def copy_gpt_oss_weights(theirs, ours: MoELayer) -> None:
    with torch.no_grad():
        ours.router.gate.weight.copy_(theirs.router.weight)
        ours.router.gate.bias.copy_(theirs.router.bias)
        experts = theirs.experts
        ours.experts.w_up_EDF.copy_(deinterleave(experts.gate_up_proj))
        ours.experts.b_up_EU.copy_(deinterleave(experts.gate_up_proj_bias))
        ours.experts.w_down_EFD.copy_(experts.down_proj)
        ours.experts.b_down_ED.copy_(experts.down_proj_bias)


@pytest.mark.parametrize("use_grouped_mm", [None, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize(("E", "K"), [(8, 3), (4, 1), (6, 6)])
def test_moe_block_equals_transformers_gpt_oss(E, K, use_grouped_mm):
    torch.manual_seed(E + K)
    theirs, ours = gpt_oss_pair(E, K, use_grouped_mm=use_grouped_mm)
    assert ours.router.gate.bias.shape == (E,)
    assert ours.experts.b_up_EU.shape == (E, 32) and ours.experts.b_down_ED.shape == (E, 32)
    x_BSD = torch.randn(2, 9, 32)
    with torch.no_grad():
        y_theirs, scores_TK = theirs(x_BSD)
        y_ours, _ = ours(x_BSD)
        h_theirs = x_BSD.reshape(-1, 32) @ theirs.experts.gate_up_proj[0] + theirs.experts.gate_up_proj_bias[0]
    assert (h_theirs[:, ::2] > 7).any() and (h_theirs[:, 1::2].abs() > 7).any()  # both clamps act
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    routing = ours.router(x_BSD.reshape(-1, 32))
    torch.testing.assert_close(routing.weights_TK.sum(dim=1), torch.ones(18))  # softmax over the chosen logits
    torch.testing.assert_close(routing.weights_TK.sort(dim=1).values, scores_TK.sort(dim=1).values)


@pytest.mark.parametrize("missing", ["router_bias", "expert_biases", "renormalize", "activation"])
def test_the_comparison_sees_each_piece(missing):
    """Dropping any one piece (the router's bias, the experts' biases, the renormalised gate, the clamp) makes the
    block differ from transformers', so the equality above checks each."""
    torch.manual_seed(4)
    theirs, ours = gpt_oss_pair()
    x_TD = torch.randn(24, 32)
    with torch.no_grad():
        if missing == "router_bias":
            ours.router.gate.bias.zero_()
        elif missing == "expert_biases":
            ours.experts.b_up_EU.zero_()
            ours.experts.b_down_ED.zero_()
        elif missing == "renormalize":
            ours.router.renormalize = False
        else:
            ours.experts.act = Activation("swiglu")
        assert not torch.allclose(ours(x_TD)[0], theirs(x_TD.unsqueeze(0))[0].squeeze(0), rtol=1e-3, atol=1e-3)


def test_expert_biases_learn_and_default_off():
    torch.manual_seed(5)
    plain = MoELayer.build(16, 8, 4, 2)
    assert plain.experts.b_up_EU is None and plain.experts.b_down_ED is None and plain.router.gate.bias is None
    fresh = MoELayer.build(16, 8, 4, 2, CLAMPED, router_bias=True, expert_biases=True, num_shared_experts=1)
    assert not fresh.experts.b_up_EU.any() and not fresh.router.gate.bias.any()
    assert fresh.shared_experts.up.bias is not None
    y, _ = fresh(torch.randn(10, 16))
    y.square().sum().backward()
    for name in ("experts.b_up_EU", "experts.b_down_ED", "router.gate.bias", "shared_experts.up.bias"):
        assert dict(fresh.named_parameters())[name].grad.abs().sum() > 0, name


# -- experts with biases under LoREs and token dropping, against a per-token loop ------------------------------

def per_token_reference(layer: MoELayer, x_TD: torch.Tensor, kept: list[list[bool]] | None = None) -> torch.Tensor:
    """Token by token: the biased router's softmax over its top-k logits, each chosen expert's biased up-projection
    (+ its LoRE term when entangled), transformers' clamped SwiGLU, the biased down-projection (+ the standalone
    LoRE term), weighted and summed; a slot not kept adds nothing."""
    router, experts, lore = layer.router, layer.experts, layer.lore
    logits_TE = x_TD @ router.gate.weight.T + router.gate.bias
    top_TK, ids_TK = torch.topk(logits_TE, router.top_k, dim=-1)
    gates_TK = F.softmax(top_TK, dim=-1)
    out = []
    for t in range(x_TD.shape[0]):
        x, y = x_TD[t], torch.zeros_like(x_TD[t])
        for k in range(router.top_k):
            if kept is not None and not kept[t][k]:
                continue
            e = int(ids_TK[t, k])
            h = x @ experts.w_up_EDF[e] + experts.b_up_EU[e]
            term = 0
            if lore is not None:
                if lore.routed:
                    M = lore.lores_per_expert
                    pi = F.softmax(x @ lore.router.weight[e * M:(e + 1) * M].T, dim=-1)
                    pis, chosen = torch.topk(pi, lore.config.top_l)
                    term = sum(pis[j] * (x @ lore.A[e, int(i)]) @ lore.B[e, int(i)] for j, i in enumerate(chosen))
                else:
                    term = (x @ lore.A[e, 0]) @ lore.B[e, 0]
            if lore is not None and lore.entangled:
                h, term = h + term, 0
            y = y + gates_TK[t, k] * (hf_act(h) @ experts.w_down_EFD[e] + experts.b_down_ED[e] + term)
        out.append(y)
    return torch.stack(out)


def biased_layer(seed: int, **settings) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer.build(16, 8, 4, 2, CLAMPED, router_type="topk", renormalize=True, router_bias=True,
                           expert_biases=True, init_std=0.8, output_init_std=0.3, **settings).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("b_up_EU", "b_down_ED", "gate.bias")):
                p.normal_(0, 2.0)
            elif name.endswith(".B"):
                p.normal_(0, 0.5)  # a LoRE term of the experts' size, so that its place matters
    return layer


@pytest.mark.parametrize("lore", [LoREConfig(3, 2, 1, "entangled"), LoREConfig(3, 2, 2, "entangled"),
                                  LoREConfig(3, 2, 1, "router_free"), LoREConfig(3, 2, 2, "standalone")],
                         ids=lambda c: f"{c.mode}-l{c.top_l}")
@pytest.mark.parametrize("use_grouped_mm", [None, False], ids=["grouped_mm", "loop"])
def test_biased_experts_with_lores_match_the_per_token_loop(lore, use_grouped_mm):
    layer = biased_layer(6, lore=lore, use_grouped_mm=use_grouped_mm)
    x_TD = torch.randn(21, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x_TD)[0], per_token_reference(layer, x_TD), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_biased_experts_with_token_dropping_match_the_per_token_loop(policy):
    from helpers.reference import reference_capacity, reference_kept

    layer = biased_layer(7, capacity=Capacity(0.5, 0.5, 1, policy))
    x_TD = torch.randn(30, 16)
    with torch.no_grad():
        routing = layer.router(x_TD)
        capacity = reference_capacity(30, 2, 4, 0.5, 1)
        kept = reference_kept(routing.weights_TK, routing.expert_ids_TK, 4, capacity, policy)
        assert not all(all(row) for row in kept)  # some slots are dropped
        # the reference takes the top-k of the logits in the same order as ours (of their softmax)
        logits_TE = x_TD @ layer.router.gate.weight.T + layer.router.gate.bias
        assert torch.equal(torch.topk(logits_TE, 2, dim=-1).indices, routing.expert_ids_TK)
        torch.testing.assert_close(layer(x_TD)[0], per_token_reference(layer, x_TD, kept), rtol=1e-5, atol=1e-5)


# -- the GPU kernels' layouts with biases, on a CPU stand-in of grouped_gemm's gmm --------------------------------

class StandInGmm:
    """grouped_gemm.ops.gmm's signature (bf16, host int64 sizes), in torch ops on the CPU."""

    def __init__(self):
        self.calls = 0

    def __call__(self, a, b, batch_sizes, trans_b=False):
        assert a.dtype == b.dtype == torch.bfloat16 and batch_sizes.device.type == "cpu"
        self.calls += 1
        w = b.transpose(-2, -1) if trans_b else b
        return torch.cat([blk.float() @ wg.float() for blk, wg in zip(torch.split(a, batch_sizes.tolist()),
                                                                         w.unbind(0))]).to(a.dtype)


@pytest.mark.parametrize("impl", ["grouped_gemm", "megablocks"])
def test_biased_experts_on_the_gmm_layouts_match_native(monkeypatch, impl):
    from megatron.model.moe.megablocks import native_to_megablocks

    gmm = StandInGmm()
    monkeypatch.setattr(kernels, "GMM_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "load_gmm", lambda: gmm)
    native = biased_layer(8, impl="native", lore=LoREConfig(3, 2, 1, "entangled"))
    other = MoELayer.build(16, 8, 4, 2, CLAMPED, router_type="topk", renormalize=True, router_bias=True,
                           expert_biases=True, impl=impl, lore=LoREConfig(3, 2, 1, "entangled")).eval()
    state = native.state_dict()
    other.load_state_dict(native_to_megablocks(state) if impl == "megablocks" else state)
    x_TD = torch.randn(24, 16)
    with torch.no_grad():
        torch.testing.assert_close(other(x_TD)[0], native(x_TD)[0], rtol=1e-5, atol=1e-5)  # fp32: torch's kernel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_other, y_native = other(x_TD)[0], native(x_TD)[0]
    assert gmm.calls >= 2  # bf16: the stand-in ran the experts' projections
    torch.testing.assert_close(y_other.float(), y_native.float(), rtol=5e-2, atol=5e-2 * float(y_native.abs().max()))


@pytest.mark.parametrize(("gated", "shared", "lore"), [(True, 0, None), (True, 2, LoREConfig(3, 2)),
                                                       (False, 1, None)])
def test_closed_form_counts_hold_the_biases(gated, shared, lore):
    from megatron.model.moe import moe_param_counts

    layer = MoELayer.build(16, 8, 4, 2, CLAMPED if gated else "gelu", router_bias=True, expert_biases=True,
                           num_shared_experts=shared, lore=lore)
    counts = moe_param_counts(16, 8, 4, lore, gated, shared, biases=True, router_bias=True)
    assert sum(counts.values()) == sum(p.numel() for p in layer.parameters())
    if shared:
        assert counts["shared"] == sum(p.numel() for p in layer.shared_experts.parameters())
