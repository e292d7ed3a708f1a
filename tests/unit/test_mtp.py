"""Multi-token prediction (megatron/model/mtp.py): each module's inputs and targets against a loop over the token
rows, its loss against a reference written out from the same weights and against transformers' own MTP drafter
(MtpModel) with copied weights, where its gradients go, and a model with MTP modules that evaluates and generates
exactly as the same model without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.modeling_layers import MtpModel

from megatron.hf.llama import llama_config, ours_to_llama
from megatron.model.generation import generate
from megatron.model.gpt import GPT, GPTConfig
from megatron.model.moe import MoEArchitecture
from megatron.model.mtp import module_inputs

V, D = 64, 32
MOE = MoEArchitecture(num_experts=4, top_k=2, first_layer=1)  # layer 0 dense, layer 1 and the MTP blocks MoE
VARIANTS = {
    "dense_rmsnorm": dict(norm="rmsnorm", mtp_num_modules=1),
    "moe_untied_two_modules": dict(moe=MOE, tie_embeddings=False, mtp_num_modules=2),
    "moe_chunked_recompute": dict(moe=MOE, mtp_num_modules=3, checkpoint_activations=True),
}
CHUNKS = {"dense_rmsnorm": 0, "moe_untied_two_modules": 0, "moe_chunked_recompute": 7}


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=V, num_layers=2, hidden_size=D, num_attention_heads=4, max_position_embeddings=16)
    return GPTConfig(**{**base, **overrides})


def test_module_inputs_and_targets_are_the_tokens_d_and_d_plus_one_after_the_next():
    rows = torch.randint(0, V, (3, 13))
    tokens_BS, targets_BS = rows[:, :-1], rows[:, 1:]
    S = tokens_BS.shape[1]
    for depth in (1, 2, 3):
        inputs, targets = module_inputs(tokens_BS, targets_BS, depth)
        expected_inputs = [[row[i + depth] for i in range(S - depth)] for row in rows.tolist()]
        expected_targets = [[row[i + depth + 1] for i in range(S - depth)] for row in rows.tolist()]
        assert inputs.tolist() == expected_inputs and targets.tolist() == expected_targets


def reference_losses(model: GPT, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The main loss and each module's, written out: shifted tokens by a loop over the rows, the projection as its
    two halves (embedding columns first), each depth reading the previous one's final-normed state, and the
    cross-entropy token by token."""
    tokens_BS = rows[:, :-1]
    S = tokens_BS.shape[1]
    weight_VD = model.embed.weight if model.lm_head is None else model.lm_head.weight
    h_BSD = model.embed(tokens_BS)
    for block in model.blocks:
        h_BSD, _ = block(h_BSD)

    def mean_nll(hidden_BRD: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        logprobs_BRV = F.log_softmax(hidden_BRD @ weight_VD.T, dim=-1)
        terms = [-logprobs_BRV[b, i, t] for b, row in enumerate(targets) for i, t in enumerate(row)]
        return torch.stack(terms).mean()

    h_BSD = model.final_norm(h_BSD)
    main = mean_nll(h_BSD, [[row[i + 1] for i in range(S)] for row in rows.tolist()])
    losses = []
    for depth, module in enumerate(model.mtp, start=1):
        R = S - depth
        ahead_BR = torch.tensor([[row[i + depth] for i in range(R)] for row in rows.tolist()])
        w_e, w_h = module.eh_proj.weight[:, :D], module.eh_proj.weight[:, D:]
        u_BRD = module.enorm(model.embed(ahead_BR)) @ w_e.T + module.hnorm(h_BSD[:, :R]) @ w_h.T
        h_BSD = module.final_norm(module.block(u_BRD)[0])
        losses.append(mean_nll(h_BSD, [[row[i + depth + 1] for i in range(R)] for row in rows.tolist()]))
    return main, losses


@pytest.mark.parametrize("variant", VARIANTS)
def test_losses_equal_a_reference_from_the_same_weights(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(**VARIANTS[variant]))  # training mode: activation checkpointing acts
    rows = torch.randint(0, V, (2, 13))
    loss, moe_aux, mtp_loss_M = model(rows[:, :-1], rows[:, 1:], CHUNKS[variant], mtp=True)
    main, expected = reference_losses(model, rows)
    torch.testing.assert_close(loss, main, atol=1e-5, rtol=0)
    assert mtp_loss_M.shape == (model.cfg.mtp_num_modules,)
    torch.testing.assert_close(mtp_loss_M, torch.stack(expected), atol=1e-5, rtol=0)
    moe_layers = sum(model.cfg.moe.is_moe_layer(i) for i in range(2 + model.cfg.mtp_num_modules)) if model.cfg.moe \
        else 0
    assert len(moe_aux) == moe_layers  # the MTP blocks' aux after the main layers'


def test_two_modules_equal_transformers_mtp_drafter_with_copied_weights():
    """transformers' MtpModel (generate(use_mtp=True)'s drafter) on a Llama-shaped model with our weights: the main
    model's last hidden state into layer 0, each layer's output into the next, the shared head; its cross-entropy
    per depth equals ours."""
    torch.manual_seed(0)
    cfg = tiny_config(norm="rmsnorm", activation="swiglu", intermediate_size=192, use_bias_in_mlp=False,
                      use_bias_in_attn_linear=False, tie_embeddings=False, mtp_num_modules=2)
    model = GPT(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that which state each one scales matters
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    state = model.state_dict()
    hf_config = transformers.LlamaConfig(**llama_config(cfg))
    hf_config.num_mtp_layers = 2
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(ours_to_llama({k: v for k, v in state.items() if not k.startswith("mtp.")}, cfg))
    drafter = MtpModel(hf, 2).eval()
    # the MTP blocks converted as if they were layers 0 and 1 of a Llama model
    as_blocks = {k.replace(f"mtp.{d}.block.", f"blocks.{d}."): v for d in range(2) for k, v in state.items()
                 if k.startswith(f"mtp.{d}.block.")}
    layers = ours_to_llama(as_blocks | {k: state[k] for k in ("embed.weight", "final_norm.weight", "lm_head.weight")},
                           cfg)
    theirs = {}
    for d in range(2):
        theirs |= {k.replace(f"model.layers.{d}.", f"layers.{d}.mtp_block."): v for k, v in layers.items()
                   if k.startswith(f"model.layers.{d}.")}
        theirs |= {f"layers.{d}.{name}.weight": state[f"mtp.{d}.{ours}.weight"] for name, ours in
                   (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"), ("post_norm", "final_norm"))}
    missing, unexpected = drafter.load_state_dict(theirs, strict=False)
    assert sorted(missing) == ["embed_tokens.weight", "shared_head.weight"] and not unexpected  # the main model's
    rows = torch.randint(0, V, (2, 13))
    tokens_BS, targets_BS = rows[:, :-1], rows[:, 1:]
    S = tokens_BS.shape[1]
    with torch.no_grad():
        loss, _, mtp_loss_M = model(tokens_BS, targets_BS, mtp=True)
        h_BSD = hf.model(tokens_BS).last_hidden_state
        expected = []
        for d in (1, 2):
            positions = torch.arange(d, S)[None].expand(2, -1)  # as drafting shifts them (rotary: only distances)
            h_BSD = drafter.forward_layer(d - 1, h_BSD[:, :S - d], positions, None, input_ids=tokens_BS[:, d:])
            logits_BRV = drafter._project_to_logits(h_BSD)
            expected.append(F.cross_entropy(logits_BRV.flatten(0, 1), targets_BS[:, d:].flatten()))
        torch.testing.assert_close(loss, F.cross_entropy(hf(tokens_BS).logits.flatten(0, 1), targets_BS.flatten()),
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(mtp_loss_M, torch.stack(expected), atol=1e-5, rtol=0)


def test_gradient_reaches_every_mtp_parameter_the_shared_embedding_and_head_and_the_main_blocks():
    torch.manual_seed(0)
    model = GPT(tiny_config(tie_embeddings=False, mtp_num_modules=2))
    rows = torch.randint(0, V - 1, (2, 13))
    rows[0, -2] = V - 1  # the last input token of row 0, and nowhere else: only module 1's embedding lookup reads it
    _, _, mtp_loss_M = model(rows[:, :-1], rows[:, 1:], mtp=True)
    mtp_loss_M.mean().backward()  # the MTP loss alone
    for name, param in model.named_parameters():
        if name.startswith(("mtp.", "lm_head.", "blocks.0.")):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.embed.weight.grad[V - 1].abs().sum() > 0  # through the MTP modules' own use of the embedding
    assert model.final_norm.weight.grad.abs().sum() > 0  # the first module reads the final-normed state


@pytest.mark.parametrize("moe", [None, MOE], ids=["dense", "moe"])
def test_evaluation_and_generation_equal_the_same_model_without_mtp(moe):
    torch.manual_seed(0)
    with_mtp = GPT(tiny_config(moe=moe, mtp_num_modules=2)).eval()
    torch.manual_seed(0)
    without = GPT(tiny_config(moe=moe)).eval()
    main = {k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")}
    assert main.keys() == without.state_dict().keys() and len(main) < len(with_mtp.state_dict())
    for name, value in without.state_dict().items():  # the MTP modules are drawn after the rest
        assert torch.equal(main[name], value), name
    rows = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        assert torch.equal(with_mtp(rows[:, :-1])[0], without(rows[:, :-1])[0])
        assert torch.equal(with_mtp(rows[:, :-1], rows[:, 1:])[0], without(rows[:, :-1], rows[:, 1:])[0])
        assert len(with_mtp(rows[:, :-1])[1]) == len(without(rows[:, :-1])[1])  # no MTP aux either
    for use_cache in (True, False):
        got = generate(with_mtp, rows[:, :4], 6, temperature=0.0, use_cache=use_cache)
        expected = generate(without, rows[:, :4], 6, temperature=0.0, use_cache=use_cache)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_mtp_names_what_it_needs():
    model = GPT(tiny_config(mtp_num_modules=2))
    rows = torch.randint(0, V, (2, 13))
    with pytest.raises(ValueError, match="mtp: multi-token prediction needs targets"):
        model(rows, mtp=True)
    with pytest.raises(ValueError, match=r"mtp_num_modules > 0 \(got 0\)"):
        GPT(tiny_config())(rows[:, :-1], rows[:, 1:], mtp=True)
    with pytest.raises(ValueError, match="a sequence needs more than 2 tokens; got 2"):
        model(rows[:, :2], rows[:, 1:3], mtp=True)


def test_under_bf16_autocast_the_mtp_residual_stream_stays_fp32():
    """As the main model's (gpt.py): the blocks' input in fp32 whatever autocast computes the projections in."""
    torch.manual_seed(0)
    model = GPT(tiny_config(norm="rmsnorm", moe=MOE, mtp_num_modules=2, checkpoint_activations=True))
    rows = torch.randint(0, V, (2, 13))
    expected = model(rows[:, :-1], rows[:, 1:], 5, mtp=True)[2]
    seen = []
    for module in model.mtp:
        module.block.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, mtp_loss_M = model(rows[:, :-1], rows[:, 1:], 5, mtp=True)
    (loss + mtp_loss_M.mean()).backward()
    assert seen == [torch.float32] * 4  # two modules, each run again by the recompute
    torch.testing.assert_close(mtp_loss_M, expected, atol=0.02, rtol=0)
    assert all(torch.isfinite(p.grad).all() for name, p in model.named_parameters() if name.startswith("mtp."))
