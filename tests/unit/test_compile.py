"""Regional torch.compile: the compiled model computes what the eager one does (loss and every gradient), for
dense, MoE and StructMoE blocks, and routing that changes the rows per expert from step to step recompiles nothing.
"""

import copy

import pytest
import torch
import torch._dynamo

from megatron.model.compile import compile_regions, compile_wanted
from megatron.model.gpt import GPT, GPTConfig
from megatron.model.moe import LoREConfig, MoEArchitecture, MoERuntime

VOCAB, SEQ = 64, 16
MODELS = {
    "dense": None,
    "moe_top2": MoEArchitecture(num_experts=4, top_k=2),
    "structmoe_l1": MoEArchitecture(num_experts=4, top_k=1, lore=LoREConfig(num_lores=4, rank=2)),
}


def tiny_gpt(moe: MoEArchitecture | None) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, num_layers=2, hidden_size=32, num_attention_heads=2,
                         max_position_embeddings=SEQ, tie_embeddings=False, moe=moe), MoERuntime(impl="native"))


def loss_and_grads(model: GPT, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
    model.zero_grad()
    loss, aux = model(tokens[:, :-1], tokens[:, 1:])
    total = loss + sum(0.01 * a.load_balancing_loss for a in aux)
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return total.detach(), grads, aux


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


IN_CI = {"structmoe_l1"}  # the others compile for ~30 s more on a cold cache: -m slow


@pytest.mark.parametrize("kind", [k if k in IN_CI else pytest.param(k, marks=pytest.mark.slow) for k in MODELS])
def test_compiled_regions_match_eager_loss_and_gradients(kind):
    eager = tiny_gpt(MODELS[kind])
    compiled = copy.deepcopy(eager)
    regions = compile_regions(compiled)
    assert "blocks.0.attention" in regions and "blocks.1.input_norm" in regions
    if kind == "dense":
        assert "blocks.0.mlp" in regions
    else:  # the experts stay eager, the router is compiled
        assert "blocks.0.mlp.router" in regions and "blocks.0.mlp" not in regions
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints are unchanged
    tokens = torch.randint(VOCAB, (3, SEQ + 1), generator=torch.Generator().manual_seed(1))
    loss_e, grads_e, _ = loss_and_grads(eager, tokens)
    loss_c, grads_c, _ = loss_and_grads(compiled, tokens)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


def test_changing_rows_per_expert_recompiles_nothing():
    model = tiny_gpt(MODELS["structmoe_l1"])
    compile_regions(model)
    generator = torch.Generator().manual_seed(2)
    counts_seen = set()
    graphs_after_first = None
    for step in range(4):
        tokens = torch.randint(VOCAB, (3, SEQ + 1), generator=generator)
        _, _, aux = loss_and_grads(model, tokens)
        counts_seen.add(tuple(aux[0].expert_slots_E.tolist()))
        if step == 0:
            graphs_after_first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert len(counts_seen) > 1, "the inputs should route different row counts to the experts"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_after_first


def test_auto_compiles_on_cuda_only():
    assert compile_wanted("auto", torch.device("cuda")) and not compile_wanted("auto", torch.device("cpu"))
    assert compile_wanted("on", torch.device("cpu")) and not compile_wanted("off", torch.device("cuda"))


def test_the_mtp_modules_blocks_are_compiled_like_the_models():
    """A multi-token prediction module's block gets the regions every block gets (its router, not its experts)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, num_layers=2, hidden_size=32, num_attention_heads=2,
                          max_position_embeddings=SEQ, moe=MODELS["moe_top2"], mtp_num_modules=2),
                MoERuntime(impl="native"))
    regions = compile_regions(model)
    for index in range(2):
        for region in ("attention", "input_norm", "post_attention_norm", "mlp.router"):
            assert f"mtp.{index}.block.{region}" in regions
        assert f"mtp.{index}.block.mlp" not in regions
    assert model.state_dict().keys() == GPT(model.cfg, MoERuntime(impl="native")).state_dict().keys()


@pytest.mark.slow
def test_compiled_mtp_training_matches_eager():
    torch.manual_seed(0)
    eager = GPT(GPTConfig(vocab_size=VOCAB, num_layers=2, hidden_size=32, num_attention_heads=2,
                          max_position_embeddings=SEQ, mtp_num_modules=1), MoERuntime(impl="native"))
    compiled = copy.deepcopy(eager)
    compile_regions(compiled)
    tokens = torch.randint(VOCAB, (3, SEQ + 1), generator=torch.Generator().manual_seed(1))
    for model in (eager, compiled):
        model.zero_grad()
        loss, _, mtp_M = model(tokens[:, :-1], tokens[:, 1:], mtp=True)
        (loss + 0.1 * mtp_M.mean()).backward()
    for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-6, msg=name)
