"""The GPT decoder: causality, a learning step, init and weight tying."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.model.gpt import GPT, GPTConfig, init_std
from megatron.model.moe import LoREConfig, MoEArchitecture
from megatron.model.rope import Rotary
from megatron.training.optim import build_optimizer

VARIANTS = {
    "rotary": dict(),
    "learned": dict(pos_emb="learned"),
    "partial_rotary_rmsnorm": dict(rotary_pct=0.25, norm="rmsnorm"),
    "gpt_j_untied": dict(gpt_j_residual=True, tie_embeddings=False),
    "moe": dict(moe=MoEArchitecture(num_experts=4, top_k=2, expert_interval=2)),
    "structmoe": dict(moe=MoEArchitecture(num_experts=4, top_k=1, lore=LoREConfig(4, 2, 1, "entangled"))),
}


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=64, num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=16)
    return GPTConfig(**{**base, **overrides})


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_token_changes_no_earlier_logit(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(**VARIANTS[variant])).eval()
    tokens = torch.randint(0, 64, (2, 12))
    changed = tokens.clone()
    t = 7
    changed[:, t] = (changed[:, t] + 1) % 64
    with torch.no_grad():
        before, _ = model(tokens)
        after, _ = model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=1e-6)
    assert (before[:, t:] - after[:, t:]).abs().max() > 1e-4  # the change is visible from t on


@pytest.mark.parametrize("variant", ["rotary", "moe", "structmoe"])
def test_one_optimizer_step_reduces_loss_on_a_fixed_batch(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(**VARIANTS[variant]))
    tokens = torch.randint(0, 64, (4, 13))
    optimizer = build_optimizer(model, 3e-3, (0.9, 0.95), 1e-8, 0.0, torch.device("cpu"))

    def loss_fn():
        logits, _ = model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    before = loss_fn()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_fn()
    assert after < before - 1e-3


@pytest.mark.parametrize("interval, first_layer, layout", [
    (1, 0, "MMMM"),
    (2, 0, "M-M-"),  # GPT-NeoX: layer i is MoE when i % interval == 0
    (2, 1, "-M-M"),  # fairseq and the StructMoE paper: (i + 1) % interval == 0
    (3, 0, "M--M"),
    (2, 3, "---M"),
])
def test_moe_layers_follow_the_interval_and_return_their_aux(interval, first_layer, layout):
    moe = MoEArchitecture(num_experts=4, expert_interval=interval, first_layer=first_layer)
    model = GPT(tiny_config(num_layers=4, moe=moe))
    kinds = "".join("M" if type(block.mlp).__name__ == "MoELayer" else "-" for block in model.blocks)
    assert kinds == layout
    _, aux = model(torch.randint(0, 64, (2, 8)))
    assert len(aux) == layout.count("M")


def test_weight_tying_shares_the_embedding():
    tied = GPT(tiny_config())
    untied = GPT(tiny_config(tie_embeddings=False))
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 64 * 32


def test_init_stds_follow_gpt_neox():
    assert init_std("normal", 0.02, 768, 12) == 0.02
    assert init_std("scaled_normal", 0.02, 768, 12) == pytest.approx(0.02 / math.sqrt(24))
    assert init_std("small_init", 0.02, 768, 12) == pytest.approx(math.sqrt(2 / (5 * 768)))
    assert init_std("wang_init", 0.02, 768, 12) == pytest.approx(2 / (12 * math.sqrt(768)))
    torch.manual_seed(0)
    model = GPT(tiny_config(hidden_size=256, num_layers=4, output_layer_init_method="wang_init"))
    measured = model.blocks[0].attention.dense.weight.std().item()
    assert measured == pytest.approx(2 / (4 * math.sqrt(256)), rel=0.05)


def test_rotary_rotates_pairs_by_position_times_frequency():
    rotary = Rotary(head_dim=4, rotary_pct=1.0, base=10000, max_positions=8)
    x = torch.zeros(1, 1, 3, 4)
    x[..., 0] = 1.0  # first component of the first rotated pair (dims 0 and 2)
    out = rotary(x)
    for pos in range(3):  # frequency of pair 0 is 1: rotated by angle `pos`
        assert out[0, 0, pos, 0].item() == pytest.approx(math.cos(pos), abs=1e-6)
        assert out[0, 0, pos, 2].item() == pytest.approx(math.sin(pos), abs=1e-6)


@pytest.mark.parametrize("variant", ["rotary", "structmoe"])
def test_activation_checkpointing_gives_the_same_gradients(variant):
    tokens = torch.randint(0, 64, (2, 9))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(tiny_config(checkpoint_activations=checkpointing, **VARIANTS[variant]))
        logits, _ = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed)
