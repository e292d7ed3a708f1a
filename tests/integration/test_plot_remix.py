"""tools/plot_remix.py on tiny trained runs: coefficients as trained, per-expert losses recomputed independently."""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.runs import plain_dit_without_remix_keys

from megatron.model.dit import DiT, GaussianDiffusion, mixed_state_dict, timestep_interval
from megatron.parallel import DistInfo
from megatron.training.dit_task import DiTTask
from megatron.training.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import plot_remix  # noqa: E402

import train  # noqa: E402

EXPERTS, BASES = 5, 3


def dit_config(folder: Path, **overrides) -> Path:
    """A tiny DiT / Remix-DiT run, as tests/integration/test_dit_task.py writes it; 2 steps, saved at the end."""
    config = {
        "model_type": "dit", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
        "image_size": 8, "image_channels": 1, "patch_size": 2, "num_classes": 10,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "warmup": 0.1,
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_iters": 2,
        "log_interval": 1, "eval_interval": 0, "checkpoint_factor": 2, "seed": 3,
        "remix_num_basis": BASES, "remix_num_experts": EXPERTS, "remix_prior_anneal_iters": 2,
        "remix_coeff_lr": 0.1,  # so that two steps move the coefficients visibly off their init
        "save": str(folder / "ckpt"), "load": str(folder / "ckpt"), "log_dir": str(folder / "logs"),
    }
    config = plain_dit_without_remix_keys({**config, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    return folder / "config.yml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: one thread, so another job on the machine cannot stall every op at a thread barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(one_thread, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plot_remix")
    variants = {"global": {}, "local": {"remix_coeff_scope": "local"}, "plain": {"remix_num_basis": 0}}
    for name, extra in variants.items():
        train.run([str(dit_config(root / name, **extra))])
    return {name: root / name / "ckpt" for name in variants}


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_the_coefficient_table_is_the_softmax_of_the_trained_logits(runs, scope):
    _, model, _ = load_pretrained(runs[scope])
    table = plot_remix.coefficient_table(model)
    if scope == "global":
        by_hand = softmax(model.remix_coeffs.logits.detach().double().numpy())
    else:  # the mean over the remixed linears' tables
        by_hand = np.mean([softmax(t.logits.detach().double().numpy()) for t in model.remix_coeffs], axis=0)
    assert table.shape == (EXPERTS, BASES)
    np.testing.assert_allclose(table, by_hand, rtol=1e-5, atol=1e-7)
    init = softmax(3.0 * np.eye(BASES)[[n * BASES // EXPERTS for n in range(EXPERTS)]])
    assert np.abs(table - init).max() > 1e-3  # the trained table, not the init


def test_a_plain_dit_has_no_coefficient_table(runs):
    _, model, _ = load_pretrained(runs["plain"])
    with pytest.raises(ValueError, match="plain DiT"):
        plot_remix.coefficient_table(model)


def test_validation_draws_are_the_held_out_images_at_timesteps_inside_each_interval(runs):
    args, _, _ = load_pretrained(runs["global"])
    draws = plot_remix.validation_draws(args, 4, 16)
    valid = DiTTask(args, DistInfo(0, 1, 0, torch.device("cpu"))).valid_data
    assert torch.equal(draws.images_MCHW, valid.images_NCHW[:16]) and torch.equal(draws.labels_M, valid.labels_N[:16])
    for i, (lo, hi) in enumerate(draws.intervals):
        assert (lo, hi) == (i * 250, (i + 1) * 250)
        assert lo <= int(draws.timesteps_IM[i].min()) and int(draws.timesteps_IM[i].max()) < hi
    again = plot_remix.validation_draws(args, 4, 16)
    assert torch.equal(again.timesteps_IM, draws.timesteps_IM) and torch.equal(again.noise_IMCHW, draws.noise_IMCHW)


def test_expert_losses_equal_an_independent_computation(runs):
    args, model, _ = load_pretrained(runs["global"])
    with torch.no_grad():  # two steps barely move the zero-initialised outputs: spread the experts apart
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    losses = plot_remix.expert_interval_losses(args, model, EXPERTS, max_images=24, batch_size=40)
    assert losses.shape == (EXPERTS, EXPERTS)
    draws = plot_remix.validation_draws(args, EXPERTS, 24)
    diffusion = GaussianDiffusion(args.diffusion_steps, args.beta_start, args.beta_end, args.learn_sigma)
    x0, y = draws.images_MCHW, draws.labels_M
    with torch.no_grad():
        for n in range(EXPERTS):  # the model's own routing: interval n's timesteps go to expert n
            assert draws.intervals[n] == timestep_interval(n, model.config.remix)
            mse = diffusion.training_losses(model, x0, draws.timesteps_IM[n], y, draws.noise_IMCHW[n])[0]["mse"]
            assert losses[n, n] == pytest.approx(float(mse.mean()), rel=1e-5)
        for n, i in [(0, 4), (4, 0), (2, 3)]:  # off its interval: expert n exported as a plain DiT
            plain = DiT(dataclasses.replace(model.config, remix=None)).eval()
            plain.load_state_dict(mixed_state_dict(model, n))
            mse = diffusion.training_losses(plain, x0, draws.timesteps_IM[i], y, draws.noise_IMCHW[i])[0]["mse"]
            assert losses[n, i] == pytest.approx(float(mse.mean()), rel=1e-5)
    assert np.ptp(losses, axis=0).min() > 1e-3 * losses.min()  # the experts do differ: the checks above bite


def test_the_tool_writes_the_png_and_the_json(runs, tmp_path, capsys):
    output = tmp_path / "figs" / "remix.png"
    figures = plot_remix.main([str(runs["global"]), str(runs["local"]), str(runs["plain"]), "--output", str(output),
                               "--intervals", "4", "--max-images", "8"])
    assert output.is_file() and output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(output.with_suffix(".json").read_text())
    assert (summary["intervals"], summary["max_images"]) == (4, 8)
    assert [r["scope"] for r in summary["runs"]] == ["global", "local", None]
    for record, fig in zip(summary["runs"], figures):
        np.testing.assert_allclose(record["losses"], fig.losses_NI)
    assert np.array(summary["runs"][0]["losses"]).shape == (EXPERTS, 4)
    assert np.array(summary["runs"][0]["coefficients"]).shape == (EXPERTS, BASES)
    assert np.array(summary["runs"][2]["losses"]).shape == (1, 4) and summary["runs"][2]["coefficients"] is None
    assert summary["runs"][0]["own_expert"] == [0, 1, 3, 4]  # middles 124, 374, 624, 874 of T=1000, N=5
    assert "own/best" in capsys.readouterr().out
