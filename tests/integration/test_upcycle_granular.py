"""Granular upcycling (tools/upcycle.py --granularity, --shared-experts): a dense MLP cut into narrower experts
computes the dense model's logits at step 0 where every shard is chosen, each expert holds its slice of the
dense weights, and impossible or inexact requests are refused in one line."""

import sys

import pytest
import torch
from helpers.hf_models import REPO, saved_model

sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))
import upcycle  # noqa: E402

import train  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402

TOKENS = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(0))
LLAMA = {"norm": "rmsnorm", "activation": "swiglu", "rotary_pct": 1.0, "num_kv_heads": 2,
         "use_bias_in_attn_linear": False, "use_bias_in_mlp": False, "use_bias_in_norms": False,
         "intermediate_size": 1024, "mlp_multiple_of": 8}  # the dense MLP's width F = 344, as configs/tiny_llama.yml's
F = 344
DEEPSEEK = str(REPO / "configs/upcycle/llama_to_deepseek.yml")
MIXTRAL = str(REPO / "configs/upcycle/llama_to_mixtral.yml")
TOPK = ["--moe_router_type", "topk", "--moe_renormalize_weights", "true"]


def logits(model):
    with torch.no_grad():
        return model(TOKENS)[0]


def moe_layers(model):
    return [(i, b.mlp) for i, b in enumerate(model.blocks) if type(b.mlp).__name__ == "MoELayer"]


@pytest.fixture
def llama(tmp_path, data_prefix):
    """A Llama-shaped dense checkpoint with every weight random (so a wrong slice shows), and the model."""
    return saved_model(tmp_path / "dense", data_prefix, **LLAMA)


@pytest.mark.parametrize("request_", [
    [MIXTRAL, "--granularity", "4", "--moe_top_k", "4"],  # 2 groups of the 4 shards, one chosen whole
    [MIXTRAL, "--granularity", "2", "--moe_top_k", "4", "--moe_expert_interval", "2"],  # 2 of 4 groups, every 2nd
    [DEEPSEEK],  # shard 0 shared, 3 routed x 4, sigmoid top-6 (two groups), expert bias, layer 0 dense
    [MIXTRAL, "--granularity", "8", "--shared-experts", "2", "--moe_num_experts", "12", "--moe_top_k", "6"],
    [DEEPSEEK, "--moe_router_num_groups", "4", "--moe_router_group_top_k", "2", "--moe_router_scaling_factor", "2.5"],
], ids=["g4_top4", "g2_top4_every2", "deepseek_overlay", "g8_shared2_top6", "deepseek_groups_scaling"])
def test_granular_upcycle_keeps_the_logits(tmp_path, llama, request_):
    save, dense = llama
    upcycle.main([str(save), str(tmp_path / "moe"), *request_])
    args, moe, _ = load_pretrained(tmp_path / "moe")
    assert args.moe_ffn_hidden_size < F and moe_layers(moe)
    torch.testing.assert_close(logits(moe), logits(dense), atol=1e-5, rtol=0)


def test_a_plain_gelu_mlp_cut_into_shards_keeps_the_logits(tmp_path, data_prefix):
    """A GPT-NeoX-shaped dense model (gelu, not gated; F = 4 x 32 = 128) into 16 experts of width 32."""
    save, dense = saved_model(tmp_path / "dense", data_prefix, zero=("mlp.up.bias", "mlp.down.bias"))
    upcycle.main([str(save), str(tmp_path / "moe"), *TOPK, "--granularity", "4", "--moe_num_experts", "16",
                  "--moe_top_k", "8"])
    args, moe, _ = load_pretrained(tmp_path / "moe")
    assert args.moe_ffn_hidden_size == 32 and moe.blocks[0].mlp.experts.w_up_EDF.shape == (16, 32, 32)
    torch.testing.assert_close(logits(moe), logits(dense), atol=1e-5, rtol=0)


def test_each_expert_is_its_slice_of_the_dense_mlp(tmp_path, llama):
    """Granularity 4, one shared: expert e holds shard 1 + e % 3 (value rows and gate rows of up, its columns of down,
    the latter x3), the shared expert shard 0, and the experts of a virtual group share one router row."""
    save, dense = llama
    upcycle.main([str(save), str(tmp_path / "moe"), MIXTRAL, "--granularity", "4", "--shared-experts", "1",
                  "--moe_num_experts", "6", "--moe_top_k", "3"])
    _, moe, _ = load_pretrained(tmp_path / "moe")
    f = F // 4
    for i, layer in moe_layers(moe):
        up, down = dense.blocks[i].mlp.up.weight, dense.blocks[i].mlp.down.weight  # [2F, D] (value; gate), [D, F]
        for e in range(6):
            s = 1 + e % 3
            value, gate = up[s * f:(s + 1) * f], up[F + s * f:F + (s + 1) * f]
            assert torch.equal(layer.experts.w_up_EDF[e], torch.cat([value, gate]).T), (i, e)
            assert torch.equal(layer.experts.w_down_EFD[e], (3 * down[:, s * f:(s + 1) * f]).T), (i, e)
        assert torch.equal(layer.shared_experts.up.weight, torch.cat([up[:f], up[F:F + f]]))
        assert torch.equal(layer.shared_experts.down.weight, down[:, :f])
        rows = layer.router.gate.weight
        assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2]) and torch.equal(rows[3], rows[5])
        assert not torch.equal(rows[0], rows[3])


def test_one_train_step_from_the_granular_checkpoint(tmp_path, llama):
    """The written config.yml builds the upcycled model again: train.py continues it."""
    save, _ = llama
    upcycle.main([str(save), str(tmp_path / "moe"), DEEPSEEK])
    result = train.run([str(tmp_path / "moe/global_step0/config.yml"), "--train_iters", "1", "--eval_interval", "0"])
    assert result.final_step == 1
    args, _, path = load_pretrained(tmp_path / "moe")
    assert path.name == "global_step1" and (args.moe_ffn_hidden_size, args.moe_num_shared_experts) == (86, 1)


@pytest.mark.parametrize("request_, message", [
    (["--granularity", "5"], "--granularity 5: the dense MLP's width 344 is not a multiple of it"),
    (["--moe_ffn_hidden_size", "100"], "moe_ffn_hidden_size 100: the dense MLP's width 344 is not a multiple of it"),
    (["--granularity", "4", "--moe_num_experts", "6"], "moe_num_experts 6: not a multiple of the 4 routed shards"),
    (["--granularity", "4", "--shared-experts", "4"], "moe_num_shared_experts 4: granularity 4 cuts each MLP into 4"),
    (["--shared-experts", "1"], "moe_num_shared_experts 1: granularity 1"),
    (["--granularity", "4", "--moe_top_k", "2"], "moe_top_k 2: not a multiple of the 4 routed shards per virtual"),
    (["--granularity", "4", "--moe_top_k", "4", "--moe_renormalize_weights", "false"],
     "moe_renormalize_weights: false"),
    (["--granularity", "4", "--moe_ffn_hidden_size", "86"], "--granularity 4 and --moe_ffn_hidden_size: give one"),
    (["--granularity", "2", "--moe_top_k", "4", "--moe_router_num_groups", "8", "--moe_router_group_top_k", "4"],
     "moe_router_num_groups 8: router groups of 1 expert(s) split the virtual groups of 2"),
], ids=["granularity", "expert_width", "experts", "all_shared", "shared_without_shards", "top_k", "raw_softmax",
        "both", "router_groups"])
def test_impossible_or_inexact_requests_are_refused_in_one_line(tmp_path, llama, capsys, request_, message):
    save, _ = llama
    with pytest.raises(SystemExit) as refused:
        upcycle.main([str(save), str(tmp_path / "moe"), MIXTRAL, *request_])
    text = str(refused.value)
    assert text.startswith("upcycle: ") and message in text and "\n" not in text, text
    assert not (tmp_path / "moe").exists()


def test_an_moe_source_is_not_cut_again(tmp_path, data_prefix):
    save, _ = saved_model(tmp_path / "run", data_prefix, moe_num_experts=4, moe_top_k=2)
    with pytest.raises(SystemExit, match="--granularity 2: the source is an MoE model"):
        upcycle.main([str(save), str(tmp_path / "moe"), "--granularity", "2"])


def test_allow_inexact_upcycles_with_a_gap(tmp_path, llama):
    """top-k 2 < 4 shards per group: refused above, built with --allow-inexact, and then not the dense model; a raw
    softmax gets its down-projections scaled by R E / k = 4 x 16 / 4 (the chosen gates' sum k / E at a uniform
    router), which leaves a gap of the order of the router's spread."""
    save, dense = llama
    upcycle.main([str(save), str(tmp_path / "top2"), MIXTRAL, "--granularity", "4", "--moe_num_experts", "16",
                  "--moe_top_k", "2", "--allow-inexact"])
    _, top2, _ = load_pretrained(tmp_path / "top2")
    assert (logits(top2) - logits(dense)).abs().max() > 1e-2
    upcycle.main([str(save), str(tmp_path / "raw"), MIXTRAL, "--granularity", "4", "--moe_num_experts", "16",
                  "--moe_top_k", "4", "--moe_renormalize_weights", "false", "--allow-inexact"])
    _, raw, _ = load_pretrained(tmp_path / "raw")
    f, down = F // 4, dense.blocks[0].mlp.down.weight
    torch.testing.assert_close(raw.blocks[0].mlp.experts.w_down_EFD[5], 16.0 * down[:, f:2 * f].T, atol=0, rtol=1e-6)
    gap = (logits(raw) - logits(dense)).abs().max()
    assert 0 < gap < 0.5 * (logits(top2) - logits(dense)).abs().max()


@pytest.mark.parametrize("request_", [
    ["--granularity", "2", "--moe_num_experts", "4", "--moe_top_k", "2"],
    ["--granularity", "4", "--shared-experts", "1", "--moe_num_experts", "6", "--moe_top_k", "3"],
], ids=["g2", "g4_shared1"])
def test_dense_biases_go_to_experts_with_biases(tmp_path, data_prefix, request_):
    """A dense MLP with random biases (gelu, F = 128) into experts with biases (moe_use_bias_in_experts, gpt-oss):
    the up-projection's bias cut with its shard, the down-projection's added once; without expert biases: refused."""
    save, dense = saved_model(tmp_path / "dense", data_prefix)  # every bias random
    assert dense.blocks[0].mlp.down.bias.abs().sum() > 0
    upcycle.main([str(save), str(tmp_path / "moe"), *TOPK, "--moe_use_bias_in_experts", "true", *request_])
    _, moe, _ = load_pretrained(tmp_path / "moe")
    torch.testing.assert_close(logits(moe), logits(dense), atol=1e-5, rtol=0)
    with pytest.raises(SystemExit, match="use_bias_in_mlp: layer 0's dense MLP has non-zero biases"):
        upcycle.main([str(save), str(tmp_path / "plain"), *TOPK, *request_])


@pytest.mark.slow
def test_the_documented_granular_commands_run_as_written(tmp_path, data_prefix):
    """docs/architectures.md's commands, word for word, from a folder laid out as the repo whose runs/tiny_llama is
    a Llama-shaped checkpoint with tiny_llama's F (smaller otherwise): both upcycles keep the logits, and train.py
    continues the DeepSeek-shaped one."""
    from test_upcycle import documented_commands, run_as_written

    for name in ("configs", "megatron", "tools", "train.py"):
        (tmp_path / name).symlink_to(REPO / name)
    save, dense = saved_model(tmp_path / "source", data_prefix, **LLAMA)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/tiny_llama").symlink_to(save)
    commands = documented_commands(REPO / "docs/architectures.md", "tools/upcycle.py")
    page = REPO / "docs/architectures.md"
    trains = [c for c in documented_commands(page, "train.py") if c[2].startswith("runs/tiny_llama_ds")]
    assert len(commands) == 2 and len(trains) == 1
    for command in commands:
        run_as_written(command, tmp_path)
        _, moe, _ = load_pretrained(tmp_path / command[3])
        torch.testing.assert_close(logits(moe), logits(dense), atol=1e-5, rtol=0)
    run_as_written(trains[0], tmp_path, "--train_iters", "1", "--eval_interval", "0")
    assert (tmp_path / "runs/tiny_llama_ds/global_step1").is_dir()
