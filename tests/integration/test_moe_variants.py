"""The MoE variants (gated experts and LoREs, shared experts, Sinkhorn routing) in whole models: closed-form
parameter counts against the built model, total and active; the matched baseline keeps the shared experts;
training with expert parallelism and ZeRO-3 on 2 ranks equals one rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from megatron.config import load_config
from megatron.data.tokenizer import vocab_size_of
from megatron.model.build import build_gpt
from megatron.model.gpt import GPT, GPTConfig
from megatron.model.moe import LoREConfig, MoEArchitecture, MoELayer
from megatron.sizing.params import count_parameters

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import match_baseline  # noqa: E402

EVERY_LAYER = ["--moe_expert_interval", "1", "--moe_first_layer", "0"]  # every layer MoE (no dense MLP here)
VARIANTS = {
    "moe_swiglu": ("tiny_moe.yml", ["--activation", "swiglu", "--mlp_multiple_of", "4"]),
    "moe_geglu_shared2_top2": ("tiny_moe.yml", ["--activation", "geglu", "--mlp_multiple_of", "4",
                                                "--moe_num_shared_experts", "2", "--moe_top_k", "2"]),
    "moe_shared1_sinkhorn": ("tiny_moe.yml", ["--moe_num_shared_experts", "1", "--moe_router_type", "sinkhorn"]),
    "structmoe_swiglu_shared1": ("tiny_structmoe.yml", ["--activation", "swiglu", "--mlp_multiple_of", "4",
                                                        "--moe_num_shared_experts", "1"]),
    "structmoe_swiglu_l2": ("tiny_structmoe.yml", ["--activation", "swiglu", "--mlp_multiple_of", "4",
                                                   "--lore_top_k", "2"]),
    "router_free_geglu": ("tiny_structmoe_router_free.yml", ["--activation", "geglu", "--mlp_multiple_of", "4"]),
    "standalone_swiglu_shared2": ("tiny_structmoe_standalone.yml", ["--activation", "swiglu", "--mlp_multiple_of", "4",
                                                                     "--moe_num_shared_experts", "2"]),
}


def active_from_model(model: GPT) -> int:
    """What one token computes with, read off the built model: top_k / E of each layer's experts, and of
    those experts' LoREs top_l / M (router-free: all); routers, shared experts and the rest always."""
    active = 0
    for name, p in model.named_parameters():
        layer = model.get_submodule(name.split(".experts.")[0].split(".lore.")[0]) if (
            ".experts." in name or ".lore." in name) else None
        if not isinstance(layer, MoELayer) or name.endswith("lore.router.weight"):
            active += p.numel()
            continue
        share = layer.router.top_k / layer.num_experts
        if ".lore." in name and layer.lore.routed:
            share *= layer.lore.config.top_l / layer.lore.config.num_lores
        active += p.numel() * share
    return round(active)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_counts_equal_the_built_model(variant):
    config, overrides = VARIANTS[variant]
    args = load_config([f"configs/{config}"], [*EVERY_LAYER, *overrides])
    model = build_gpt(args, vocab_size_of(args))
    counts = count_parameters(args)
    assert counts.total == sum(p.numel() for p in model.parameters())
    shared = sum(p.numel() for n, p in model.named_parameters() if ".shared_experts." in n)
    assert counts.shared_experts == shared and (shared > 0) == (args.moe_num_shared_experts > 0)
    assert counts.active == pytest.approx(active_from_model(model), abs=args.num_layers)  # rounding per layer


def test_match_baseline_keeps_the_shared_experts(tmp_path):
    """The plain baseline matched to a StructMoE config with shared experts keeps them, and its count is still
    the nearest; the tool's written config carries moe_num_shared_experts."""
    raw = yaml.safe_load((REPO / "configs" / "tiny_structmoe.yml").read_text())
    raw.update(moe_num_shared_experts=2, activation="swiglu", mlp_multiple_of=4, moe_expert_interval=1,
               moe_first_layer=0)
    config = tmp_path / "structmoe_shared.yml"
    config.write_text(yaml.safe_dump(raw))
    args = load_config([str(config)])
    experts, total, target = match_baseline.matched_expert_count(args)
    plain = args.model_copy(update={"lore_num_experts": 0, "moe_num_experts": experts})
    assert count_parameters(plain).total == total and count_parameters(plain).shared_experts > 0
    assert count_parameters(args).total == target
    neighbours = [count_parameters(plain.model_copy(update={"moe_num_experts": n})).total for n in
                  (experts - 1, experts + 1)]
    assert all(abs(total - target) <= abs(other - target) for other in neighbours)
    out = tmp_path / "matched.yml"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package, whatever is installed
    subprocess.run([sys.executable, str(REPO / "tools" / "match_baseline.py"), str(config), "--output", str(out)],
                   check=True, capture_output=True, cwd=REPO, env=env)
    written = yaml.safe_load(out.read_text())
    assert written["moe_num_shared_experts"] == 2 and written["moe_num_experts"] == experts
    assert "lore_num_experts" not in written


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 3], ids=["ddp", "zero3"])
def test_gated_shared_sinkhorn_structmoe_on_two_ranks_ep2_equals_one_rank(tmp_path, data_prefix, zero_stage):
    """EP=2 with DDP or ZeRO-3 (shared experts reduced / sharded with the non-expert parameters, gated experts
    and LoREs per expert) == one rank with the same global batch; the EP checkpoint loads into one rank."""
    from helpers.distributed import torchrun
    from helpers.layouts import STEPS, STRUCT_L1, assert_same_parameters, final_parameters
    from helpers.runs import read_metrics, train_losses, write_config

    import train

    moe = {**STRUCT_L1, "activation": "swiglu", "moe_num_shared_experts": 1, "moe_router_type": "sinkhorn"}
    one = write_config(tmp_path / "one", data_prefix, gradient_accumulation_steps=4, **STEPS, **moe)
    two = write_config(tmp_path / "two", data_prefix, gradient_accumulation_steps=2, zero_stage=zero_stage,
                       moe_expert_parallel_size=2, **STEPS, **moe)
    train.run([str(one)])
    torchrun(two, 2)
    single, parallel = (read_metrics(tmp_path / name / "logs") for name in ("one", "two"))
    assert train_losses(parallel) == pytest.approx(train_losses(single), abs=1e-5)
    assert_same_parameters(final_parameters(two), final_parameters(one))
    assert any(".shared_experts." in name for name in final_parameters(one))


def test_shared_experts_are_not_expert_parameters():
    from megatron.parallel.data_parallel import expert_parameter_names

    args = load_config(["configs/tiny_structmoe.yml"], [*EVERY_LAYER, "--moe_num_shared_experts", "1"])
    model = build_gpt(args, 384)
    names = expert_parameter_names(model)
    assert names and not any("shared_experts" in name for name in names)
    assert all(".experts." in name or ".lore." in name for name in names)


def tiny_gpt(checkpointing: bool = False) -> GPT:
    moe = MoEArchitecture(num_experts=4, top_k=2, router_type="sinkhorn", num_shared_experts=1,
                          lore=LoREConfig(4, 2, 1, "entangled"))
    return GPT(GPTConfig(vocab_size=64, num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=16,
                         activation="swiglu", mlp_multiple_of=4, checkpoint_activations=checkpointing, moe=moe))


def test_sinkhorn_gated_shared_model_is_causal_in_eval_and_recomputes_exactly():
    """Evaluation routes each token alone, so no logit sees a later token; in training Sinkhorn balances the
    whole batch (a token's expert may depend on later tokens, as in NeoX), and activation checkpointing's
    recompute makes the same choices, so the gradients are the same."""
    torch.manual_seed(0)
    model = tiny_gpt().eval()
    tokens = torch.randint(0, 64, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 64
    with torch.no_grad():
        before, after = model(tokens)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=1e-6)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_gpt(checkpointing)
        logits, _ = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert any(".shared_experts." in name for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=lambda m, n=name: f"{n}: {m}")
