"""The tiny DeepSeek-V3- and gpt-oss-shaped configs (configs/tiny_deepseek_v3.yml, configs/tiny_gpt_oss.yml) as
shipped, at a test's batch and length, on the bundled corpus: each sets its full-size family file's switches and
builds every piece it names; through train.py the loss falls, a stop and resume repeats the straight run (every
logged metric and every parameter), expert parallelism on 2 gloo ranks equals one rank, LoREs on their gated experts
train and resume, LSH compression runs under EP=2 and, with no two rows in a bucket, is the identity at EP=1; each
exports as transformers' own class of its family with our logits."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.distributed import torchrun
from helpers.layouts import ONE_RANK, assert_same_parameters, final_parameters
from helpers.runs import read_metrics

from megatron.config import load_config
from megatron.data.bundled import ensure_bundled_dataset
from megatron.data.tokenizer import vocab_size_of
from megatron.model.attention import layer_window
from megatron.model.build import build_gpt
from megatron.model.gpt import MLP
from megatron.model.mla import MultiHeadLatentAttention
from megatron.model.moe import MoELayer
from megatron.model.rope import YarnRopeScaling
from megatron.training import checkpoint as ckpt
from megatron.training.lm_task import LMTask
from megatron.training.optim import build_optimizer
from megatron.training.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import train  # noqa: E402

VOCAB = str(REPO / "megatron" / "data" / "bundled" / "shakespeare_tokenizer.json")
FAMILY = {"tiny_deepseek_v3.yml": "families/deepseek_v3.yml", "tiny_gpt_oss.yml": "families/gpt_oss_20b.yml"}
TINY = list(FAMILY)
# a test's batch and length: 8 steps of 4 sequences of 32 tokens, evaluated and saved every 4
SMALL = {"seq_length": 32, "train_micro_batch_size_per_gpu": 4, "train_iters": 8, "eval_interval": 4, "eval_iters": 2,
         "log_interval": 1, "checkpoint_factor": 4}
# what a run logs about the machine and the clock rather than about the model
NOT_MODEL = ("tokens_per_sec", "tflops_per_rank", "mfu", "memory/")
SLOW = pytest.mark.slow  # kept out of CI's time budget


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The bundled Shakespeare corpus tokenised once for this module (what `prepare_data: shakespeare` makes)."""
    prefix = tmp_path_factory.mktemp("shakespeare") / "shakespeare_text_document"
    ensure_bundled_dataset("shakespeare", str(prefix), "HFTokenizer", VOCAB)
    return str(prefix)


def tiny_config(tmp_path: Path, name: str, corpus: str, **overrides) -> Path:
    """The shipped config with SMALL's batch and length, its data, checkpoints and logs under tmp_path."""
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    config.update(SMALL, prepare_data=None, data_path=corpus, vocab_file=VOCAB, save=str(tmp_path / "ckpt"),
                  load=str(tmp_path / "ckpt"), log_dir=str(tmp_path / "logs"), tensorboard_dir=None)
    config.update(overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def logged(config: Path) -> dict[tuple[str, int], dict]:
    """Every record metrics.jsonl holds, by (train or eval, step), without the machine's and the clock's readings."""
    records = {}
    for r in read_metrics(Path(yaml.safe_load(config.read_text())["log_dir"])):
        kind = "eval" if any(key.startswith("val/") for key in r) else "train"
        assert (kind, r["step"]) not in records, f"{kind} step {r['step']} logged twice"
        records[kind, r["step"]] = {k: v for k, v in r.items() if not k.startswith(NOT_MODEL)}
    return records


def parameters_at(config: Path, step: int) -> dict[str, torch.Tensor]:
    """The parameters and buffers a one-rank run saved at `step`."""
    args = load_config([str(config)])
    task = LMTask(args, ONE_RANK)
    optimizer = build_optimizer(task.model, 1e-3, (0.9, 0.95), 1e-8, 0.0, torch.device("cpu"))
    ckpt.load_checkpoint(Path(args.save) / f"global_step{step}", task.model, optimizer, ONE_RANK)
    return {name: value.clone() for name, value in task.model.state_dict().items()}


def train_records(records: dict) -> list[dict]:
    return [r for (kind, _), r in sorted(records.items()) if kind == "train"]


# Switches (not sizes) each tiny config must set as its family file does; sizes (widths, counts, windows, the YaRN
# factor and context) are scaled down.
SWITCHES = ("activation", "swiglu_alpha", "swiglu_limit", "norm", "use_bias_in_norms", "use_bias_in_attn_linear",
            "pos_emb", "rotary_pct", "rotary_emb_base", "no_weight_tying", "qk_norm", "attention_sinks",
            "sliding_window_pattern", "moe_router_type", "moe_router_score_function", "moe_renormalize_weights",
            "moe_router_enable_expert_bias", "moe_router_bias_update_rate", "moe_router_scaling_factor",
            "moe_router_bias", "moe_use_bias_in_experts", "moe_num_shared_experts", "moe_expert_interval",
            "moe_lbl_scope", "mtp_num_modules", "lore_num_experts", "lsh_compression")
YARN_SWITCHES = ("type", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_sets_its_family_switches(name):
    tiny, family = (load_config([str(REPO / "configs" / path)]) for path in (name, FAMILY[name]))
    for key in SWITCHES:
        assert getattr(tiny, key) == getattr(family, key), f"{name}: {key}"
    for key in YARN_SWITCHES:
        assert getattr(tiny.rope_scaling, key) == getattr(family.rope_scaling, key), f"{name}: rope_scaling.{key}"
    # the shapes that make the family what it is, at the tiny size
    for args in (tiny, family):
        assert (args.kv_lora_rank is not None) == (args.q_lora_rank is not None) == (name == "tiny_deepseek_v3.yml")
        assert (args.moe_router_num_groups > args.moe_router_group_top_k > 1) == (name == "tiny_deepseek_v3.yml")
        assert (args.moe_first_layer > 0) == (name == "tiny_deepseek_v3.yml")
        if name == "tiny_deepseek_v3.yml":  # fine-grained experts: narrower than the dense layers' F (3 F given)
            assert args.moe_ffn_hidden_size * 3 < args.intermediate_size
        else:  # experts as wide as the model (gpt-oss: intermediate_size = hidden_size)
            assert args.moe_ffn_hidden_size == args.hidden_size
        if name == "tiny_gpt_oss.yml":
            assert args.head_dim * args.num_attention_heads != args.hidden_size
            assert args.num_kv_heads < args.num_attention_heads and args.sliding_window_width < args.seq_length


def test_tiny_deepseek_v3_builds_every_piece_it_names():
    args = load_config([str(REPO / "configs" / "tiny_deepseek_v3.yml")])
    model = build_gpt(args, vocab_size_of(args))
    cfg = model.cfg
    assert isinstance(cfg.rope_scaling, YarnRopeScaling) and cfg.rope_scaling.factor == 4
    for i, block in enumerate(model.blocks):
        attention = block.attention
        assert isinstance(attention, MultiHeadLatentAttention)
        assert attention.q_down.weight.shape == (48, 128) and attention.q_up.weight.shape == (4 * (32 + 16), 48)
        assert attention.kv_down.weight.shape == (32 + 16, 128) and attention.kv_up.weight.shape == (4 * 64, 32)
        if i == 0:  # the dense first layer, F = 768 / 3 (GPT-NeoX's rule for gated MLPs)
            assert isinstance(block.mlp, MLP) and block.mlp.down.weight.shape == (128, 256)
            continue
        moe = block.mlp
        assert isinstance(moe, MoELayer) and moe.num_experts == 8
        assert moe.experts.w_up_EDF.shape == (8, 128, 2 * 64) and moe.experts.b_up_EU is None  # SwiGLU, F = 64
        assert moe.shared_experts.down.weight.shape == (128, 64)  # one shared expert of F
        router = moe.router
        assert (router.score_function, router.num_groups, router.group_top_k, router.top_k) == ("sigmoid", 4, 2, 2)
        assert router.scaling_factor == 2.5 and router.expert_bias_E.shape == (8,) and router.gate.bias is None
    assert len(model.mtp) == 1 and isinstance(model.mtp[0].block.mlp, MoELayer)  # DeepSeek-V3's MTP layer is MoE
    assert model.lm_head is not None  # untied
    assert isinstance(model.final_norm, torch.nn.RMSNorm)


def test_tiny_gpt_oss_builds_every_piece_it_names():
    args = load_config([str(REPO / "configs" / "tiny_gpt_oss.yml")])
    model = build_gpt(args, vocab_size_of(args))
    cfg = model.cfg
    assert isinstance(cfg.rope_scaling, YarnRopeScaling) and not cfg.rope_scaling.truncate
    assert [layer_window(cfg, i) for i in range(4)] == [31, None, 31, None]
    for block in model.blocks:
        attention = block.attention
        # 4 query heads and 2 key/value heads of 32: 128 + 2 x 64 rows over d = 96, with biases, and a sink per head
        assert attention.qkv.weight.shape == (128 + 2 * 64, 96) and attention.qkv.bias is not None
        assert attention.dense.weight.shape == (96, 128) and attention.sinks.shape == (4,)
        moe = block.mlp
        assert isinstance(moe, MoELayer) and moe.shared_experts is None
        assert moe.experts.b_up_EU.shape == (8, 2 * 96) and moe.experts.b_down_ED.shape == (8, 96)
        assert moe.experts.act.name == "clamped_swiglu"
        router = moe.router
        assert router.gate.bias.shape == (8,) and router.score_function == "softmax" and router.renormalize
    assert not model.mtp and model.lm_head is not None


@pytest.mark.parametrize("name", TINY)
def test_loss_falls(tmp_path, corpus, name):
    """20 steps: training and validation loss fall (and DeepSeek-V3's MTP loss, and its loss-free bias moves)."""
    config = tiny_config(tmp_path, name, corpus, train_iters=20, eval_interval=10, eval_iters=4,
                         checkpoint_factor=20)
    result = train.run([str(config)])
    assert result.final_step == 20
    records = logged(config)
    losses = [r["loss"] for r in train_records(records)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert records["eval", 20]["val/loss"] < records["eval", 10]["val/loss"] < math.log(8192)
    if name == "tiny_deepseek_v3.yml":
        mtp = [r["mtp_loss"] for r in train_records(records)]
        assert sum(mtp[-5:]) / 5 < sum(mtp[:5]) / 5 - 1.0, mtp
        biases = {k: v for k, v in final_parameters(config).items() if k.endswith("router.expert_bias_E")}
        assert len(biases) == 4 and all(v.abs().sum() > 0 for v in biases.values())  # 3 MoE layers + MTP's


def assert_resume_repeats_the_straight_run(tmp_path: Path, name: str, corpus: str, **overrides) -> dict:
    """8 steps straight, and 4 + 4 with a restart: the same records (every logged metric, training and validation,
    bit for bit) and the same parameters and buffers. Returns the straight run's records."""
    straight = tiny_config(tmp_path / "straight", name, corpus, **overrides)
    train.run([str(straight)])
    resumed = tiny_config(tmp_path / "resumed", name, corpus, **overrides)
    assert len(train.run([str(resumed), "--exit_interval", "4"]).losses) == 4
    assert len(train.run([str(resumed)]).losses) == 4
    expected, got = logged(straight), logged(resumed)
    assert len(train_records(expected)) == 8 and ("eval", 8) in expected
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], key
    want = final_parameters(straight)
    for param_name, value in final_parameters(resumed).items():
        assert torch.equal(value, want[param_name]), param_name
    return expected


@pytest.mark.parametrize("name", TINY)
def test_stop_and_resume_repeats_the_straight_run(tmp_path, corpus, name):
    assert_resume_repeats_the_straight_run(tmp_path, name, corpus)


LORE = {"lore_num_experts": 4, "lore_rank": 4, "lore_loss_coeff": 0.01}


@pytest.mark.parametrize("name", TINY)
def test_lores_on_the_gated_experts_train_and_resume(tmp_path, corpus, name):
    """StructMoE on the family's experts (SwiGLU or the clamped SwiGLU, so each LoRE's B spans value and gate):
    the LoREs are routed, their balancing loss is logged, and the run resumes exactly."""
    records = train_records(assert_resume_repeats_the_straight_run(tmp_path, name, corpus, **LORE))
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]
    assert all(r["moe/lore_balancing_loss"] > 0 for r in records)
    lore_load = records[-1]["moe/layer0/lore_load"]
    assert len(lore_load) == 8 and all(len(row) == 4 for row in lore_load)
    straight = tmp_path / "straight" / "config.yml"
    at_4, at_8 = (parameters_at(straight, step) for step in (4, 8))
    lores = [k for k in at_8 if ".lore." in k]
    expected = {f"{i}.mlp.lore.{p}" for i in range(1 if name == "tiny_deepseek_v3.yml" else 0, 4)
                for p in ("A", "B", "router.weight")}
    assert {k.removeprefix("blocks.") for k in lores if k.startswith("blocks.")} == expected
    assert any(k.startswith("mtp.0.block.mlp.lore.") for k in lores) == (name == "tiny_deepseek_v3.yml")
    for k in lores:  # every LoRE weight trained (LoREs in the MTP module's layer too)
        assert torch.isfinite(at_8[k]).all() and not torch.equal(at_8[k], at_4[k]), k


# what only a run over several ranks logs: the bytes each rank sends, its busiest rank's rows, its slowest rank
LAYOUT_ONLY = ("exchange_bytes_sent", "max_rank_rows_over_mean", "stragglers/")
# 4 steps at lr 1e-3 and Adam's eps 1e-6: ranks sum gradients in another order, and Adam divides each gradient by
# its own RMS, so the rounding of an element whose gradient nearly cancels reaches its update at the scale of
# lr x rounding / (|g| + eps); at the configs' eps 1e-8 one embedding element of 786,432 ended 2.7e-5 apart
EP_STEPS = {"train_iters": 4, "eval_interval": 2, "checkpoint_factor": 4, "min_lr": 1e-4,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-6}}}


def assert_close_records(parallel: dict, single: dict, steps: int = 4) -> None:
    """The 2-rank run's records equal the one-rank run's, metric by metric (to rounding), for the first `steps`
    steps; the metrics only a multi-rank run logs are the only ones more."""
    parallel = {key: r for key, r in parallel.items() if key[1] <= steps}
    single = {key: r for key, r in single.items() if key[1] <= steps}
    assert parallel.keys() == single.keys()
    for key, expected in single.items():
        extra = parallel[key].keys() - expected.keys()
        assert expected.keys() <= parallel[key].keys(), key
        assert all(any(part in k for part in LAYOUT_ONLY) for k in extra), (key, extra)
        for metric, value in expected.items():
            assert parallel[key][metric] == pytest.approx(value, rel=1e-5, abs=1e-5), (key, metric)


def run_one_and_two_ranks(tmp_path: Path, name: str, corpus: str, **overrides) -> tuple[Path, Path]:
    """1 rank with accumulation 4 and 2 gloo ranks with EP=2 and accumulation 2 (the same global batch of 16
    sequences), EP_STEPS: the configs of both runs."""
    one = tiny_config(tmp_path / "one", name, corpus, gradient_accumulation_steps=4, **EP_STEPS, **overrides)
    two = tiny_config(tmp_path / "two", name, corpus, gradient_accumulation_steps=2, moe_expert_parallel_size=2,
                      **EP_STEPS, **overrides)
    train.run([str(one)])
    torchrun(two, 2)
    return one, two


@pytest.mark.parametrize("name", TINY)
def test_expert_parallel_two_ranks_equal_one_rank(tmp_path, corpus, name):
    """EP=2 (4 experts a rank: DeepSeek-V3's groups 2 a rank) == 1 rank: every logged metric (losses, the MTP
    loss, the gradient norm, aux losses, each layer's expert load, the loss-free bias's movement, validation)
    and every parameter and buffer after 4 steps."""
    one, two = run_one_and_two_ranks(tmp_path, name, corpus)
    single, parallel = logged(one), logged(two)
    assert len(train_records(single)) == 4 and ("eval", 4) in single
    assert all(r["moe/layer0/exchange_bytes_sent"] > 0 for r in train_records(parallel))
    assert_close_records(parallel, single)
    assert_same_parameters(final_parameters(two), final_parameters(one))


# ~15 s each (a torchrun of 2 ranks); gpt-oss's kept out of CI's time budget, DeepSeek-V3's has more pieces
@pytest.mark.parametrize("name", ["tiny_deepseek_v3.yml", pytest.param("tiny_gpt_oss.yml", marks=SLOW)])
def test_lsh_compression_under_expert_parallelism(tmp_path, corpus, name):
    """lsh_compression at EP=2 (1 hash of 4 dims: 8 buckets, so rows really merge): finite losses that fall, a rate
    well below 1, bytes sent. Each rank compresses its own micro-batch as one rank does, so the first step equals
    one rank's; later steps only to the hash's discontinuity: rounding-level differences the layouts' reduction
    order leaves in the weights can move a row across a bucket boundary (seen: gpt-oss's step 3 loss 4.5e-5 apart)."""
    lsh = {"lsh_compression": True, "lsh_num_hashes": 1, "lsh_hash_dim": 4}
    one, two = run_one_and_two_ranks(tmp_path, name, corpus, **lsh)
    single, parallel = logged(one), logged(two)
    records = train_records(parallel)
    assert len(records) == 4 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    rates = [v for r in records for k, v in r.items() if k.endswith("lsh_compression_rate")]
    assert len(rates) == 4 * 4 and all(0 < v < 0.5 for v in rates)  # 4 steps, 4 MoE layers (DeepSeek-V3: MTP's)
    assert all(r["moe/layer0/exchange_bytes_sent"] > 0 for r in records)
    assert_close_records(parallel, single, steps=1)


@pytest.mark.parametrize("name", TINY)
def test_lsh_with_compensation_is_the_identity_without_collisions(name):
    """Every MoE layer the config builds (DeepSeek-V3's groups, scaled sigmoid gates with a non-zero loss-free bias,
    shared expert and MTP layer; gpt-oss's router bias, biased experts and clamped SwiGLU), with 6 hashes of 16 dims
    (32^6 buckets) and compensation, against the same layer without LSH on distinct rows: each row alone in its
    bucket, where docs/lsh.md says the compressed layer is the exact one, outputs and every gradient bit for bit.
    In a training run it does not apply: a token repeated in a sequence gives near-equal rows at init, which share
    a bucket even at 32^6 (seen: compression rates of 0.96-0.99)."""
    config = str(REPO / "configs" / name)
    fine = ["--lsh_compression", "true", "--lsh_num_hashes", "6", "--lsh_hash_dim", "16"]
    models = []
    for overrides in ([], fine):
        args = load_config([config], overrides)
        torch.manual_seed(0)
        models.append(build_gpt(args, vocab_size_of(args)))
    layers = [[m for m in model.modules() if isinstance(m, MoELayer)] for model in models]
    assert len(layers[0]) == len(layers[1]) == 4  # DeepSeek-V3: 3 MoE layers and the MTP module's
    for i, (exact, compressed) in enumerate(zip(*layers)):
        assert compressed.load_state_dict(exact.state_dict(), strict=False).unexpected_keys == []
        if name == "tiny_deepseek_v3.yml":  # a bias that moves the choice (the gates stay the unbiased scores)
            bias_E = torch.linspace(-0.05, 0.05, 8)
            exact.router.expert_bias_E.copy_(bias_E)
            compressed.router.expert_bias_E.copy_(bias_E)
        torch.manual_seed(i)
        x = torch.randn(48, exact.router.gate.in_features, requires_grad=True)
        assert compressed.dispatcher.hasher(x).unique().numel() == 48  # every row alone in its bucket
        weights = torch.randn(48, x.shape[1])
        results = []
        for layer in (exact, compressed):
            y, _ = layer(x)
            results.append((y, torch.autograd.grad((y * weights).sum(), [x, *layer.parameters()])))
        (y_exact, grads_exact), (y_comp, grads_comp) = results
        assert torch.equal(y_comp, y_exact), f"layer {i}"
        for (param, _), want, got in zip([("x", x), *exact.named_parameters()], grads_exact, grads_comp):
            assert torch.equal(got, want), f"layer {i}: {param}"


@pytest.mark.parametrize("name, hf_class", [("tiny_deepseek_v3.yml", "DeepseekV3ForCausalLM"),
                                            ("tiny_gpt_oss.yml", "GptOssForCausalLM")])
def test_trained_tiny_model_exports_as_its_family(tmp_path, corpus, name, hf_class):
    """After 2 steps, tools/convert_to_hf.py writes transformers' own class (no remote code), whose logits equal
    ours over 64 tokens: past gpt-oss's 31-key window and both configs' YaRN context of 32."""
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "tools"))
    import convert_to_hf

    config = tiny_config(tmp_path, name, corpus, train_iters=2, eval_interval=0, checkpoint_factor=2)
    train.run([str(config)])
    report = convert_to_hf.main([str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    assert report["format"] == "native" and report["class"] == hf_class, report
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    _, model, _ = load_pretrained(tmp_path / "ckpt")
    tokens = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model.eval()(tokens)[0], atol=1e-5, rtol=0)
