"""Remix-DiT experts exported as plain DiTs: the same outputs and samples as runtime mixing, and the sampling tool."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers.runs import plain_dit_without_remix_keys
from PIL import Image

from megatron.config import ConfigError
from megatron.model.dit import DiT, ExpertSwitch, GaussianDiffusion, expert_of_timestep, timestep_interval
from megatron.parallel import DistInfo
from megatron.training.checkpoint import save_checkpoint
from megatron.training.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import export_remix_experts  # noqa: E402
import sample_dit  # noqa: E402

import train  # noqa: E402

STEPS = 20  # diffusion timesteps: 3 experts split them unevenly, [0, 6) [6, 13) [13, 20)


def tiny_dit_config(folder: Path, **overrides) -> Path:
    config = {
        "model_type": "dit", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
        "image_size": 8, "image_channels": 1, "patch_size": 2, "num_classes": 10, "learn_sigma": True,
        "diffusion_steps": STEPS, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "warmup": 0.1,
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_iters": 2,
        "log_interval": 1, "eval_interval": 100, "eval_timestep_intervals": 1, "checkpoint_factor": 2, "seed": 3,
        "remix_num_basis": 3, "remix_num_experts": 3, "remix_coeff_scope": "local",
        "save": str(folder / "ckpt"), "load": str(folder / "ckpt"), "log_dir": str(folder / "logs"),
    }
    config = plain_dit_without_remix_keys({**config, **overrides})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    return folder / "config.yml"


@torch.no_grad()
def perturb_and_save(save_dir: Path) -> None:
    """Random weights everywhere (adaLN and output linears off zero, coefficients off the prior), saved by the
    framework as the run's newest checkpoint, so the export reads a state nothing special-cases."""
    _, model, path = load_pretrained(save_dir)
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name.startswith("remix_coeffs."):  # softmax logits: a random mix, the prior's 3.0 forgotten
            param.copy_(noise)
        else:
            param.add_(0.05 * noise)
    save_checkpoint(save_dir, 3, model, torch.optim.SGD(model.parameters(), lr=0.0), {},
                    (path / "config.yml").read_text(), DistInfo(0, 1, 0, torch.device("cpu")))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards on a busy 2-core machine run ~100x faster on one intra-op thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("remix_export")
    train.run([str(tiny_dit_config(root / "remix"))])
    train.run([str(tiny_dit_config(root / "plain", remix_num_basis=0))])
    perturb_and_save(root / "remix" / "ckpt")
    manifest = export_remix_experts.export_experts(root / "remix" / "ckpt", root / "exported")
    _, model, path = load_pretrained(root / "remix" / "ckpt")
    return SimpleNamespace(root=root, remix_dir=root / "remix" / "ckpt", plain_dir=root / "plain" / "ckpt",
                           export_dir=root / "exported", manifest=manifest, model=model, checkpoint=path)


def inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=generator), torch.randint(0, 10, (batch,), generator=generator)


def test_the_state_is_far_from_init(runs):
    model = runs.model
    assert runs.checkpoint.name == "global_step3"
    for block in model.blocks:
        assert block.adaLN_modulation[1].weight.abs().min() > 0
    assert model.final_layer.linear.weight.abs().min() > 0
    prior_NK = model.remix_coeffs[0].prior_NK
    assert all((table.coefficients() - prior_NK).abs().max() > 0.2 for table in model.remix_coeffs)
    tables = torch.stack([table.coefficients() for table in model.remix_coeffs])
    assert (tables - tables[0]).abs().max() > 0.05  # local scope: the linears' tables differ


def test_export_writes_plain_dits_in_the_official_layout_and_a_manifest(runs):
    manifest = json.loads(runs.manifest.read_text())
    remix = runs.model.config.remix
    assert manifest["num_experts"] == 3 and manifest["num_timesteps"] == STEPS
    assert manifest["intervals"] == [[0, 6], [6, 13], [13, 20]]
    assert manifest["intervals"] == [list(timestep_interval(n, remix)) for n in range(3)]
    suffix = "safetensors" if importlib.util.find_spec("safetensors") else "pt"  # auto: safetensors when installed
    assert manifest["files"] == [f"expert{n:02d}.{suffix}" for n in range(3)]
    assert manifest["dit_config"]["learn_sigma"] is True and "remix" not in manifest["dit_config"]
    assert manifest["source"] == {"checkpoint": str(runs.checkpoint), "num_basis": 3, "mixer": "softmax",
                                  "scope": "local"}
    plain = DiT(export_remix_experts.DiTConfig(**manifest["dit_config"]))
    for name in manifest["files"]:
        state = torch.load(runs.export_dir / name, map_location="cpu", weights_only=True)
        own = plain.state_dict()
        assert set(state) == set(own) and all(state[k].shape == own[k].shape for k in own)
        plain.load_state_dict(state, strict=True)


def test_each_expert_equals_the_remix_model_on_its_interval(runs):
    x, y = inputs(4, 1)
    manifest = json.loads(runs.manifest.read_text())
    config = export_remix_experts.DiTConfig(**manifest["dit_config"])
    for n, (lo, hi) in enumerate(manifest["intervals"]):
        expert = DiT(config).eval()
        expert.load_state_dict(torch.load(runs.export_dir / manifest["files"][n], weights_only=True))
        for t in (lo, (lo + hi) // 2, hi - 1):
            t_B = torch.full((4,), t)
            with torch.no_grad():
                mixed, aux = runs.model(x, t_B, y)
                plain, plain_aux = expert(x, t_B, y)
            assert "prior_loss" in aux and plain_aux == {}
            torch.testing.assert_close(plain, mixed, atol=1e-5, rtol=0)
        other = (hi % STEPS)  # a timestep of the next expert: another mix, another output
        with torch.no_grad():
            assert (expert(x, torch.full((4,), other), y)[0] - runs.model(x, torch.full((4,), other), y)[0]
                    ).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_sampling_with_exported_experts_equals_runtime_mixing(runs, sampler, cfg_scale):
    switch = export_remix_experts.load_exported_experts(runs.export_dir)
    in_memory = ExpertSwitch.from_remix(runs.model)
    diffusion = GaussianDiffusion(STEPS, learn_sigma=True)
    _, y = inputs(4, 2)

    def draw(model):
        generator = torch.Generator().manual_seed(5)
        if sampler == "ddim":
            return diffusion.ddim_sample(model, (4, 1, 8, 8), y, steps=5, generator=generator, cfg_scale=cfg_scale)
        return diffusion.ddpm_sample(model, (4, 1, 8, 8), y, generator=generator, cfg_scale=cfg_scale)

    mixed = draw(runs.model)
    torch.testing.assert_close(draw(switch), mixed, atol=1e-4, rtol=0)
    torch.testing.assert_close(draw(in_memory), mixed, atol=1e-4, rtol=0)


def test_rows_of_different_experts_in_one_batch(runs):
    switch = export_remix_experts.load_exported_experts(runs.export_dir)
    t_B = torch.tensor([19, 0, 6, 12, 5, 13, 7, 2])
    assert set(switch.expert_of(t_B).tolist()) == {0, 1, 2}
    assert torch.equal(switch.expert_of(torch.arange(STEPS)), expert_of_timestep(torch.arange(STEPS),
                                                                                 runs.model.config.remix))
    x, y = inputs(8, 3)
    with torch.no_grad():
        out, aux = switch(x, t_B, y)
        assert aux == {}
        for row in range(8):
            alone, _ = switch.experts[int(switch.expert_of(t_B[row:row + 1]))](x[row:row + 1], t_B[row:row + 1],
                                                                                  y[row:row + 1])
            torch.testing.assert_close(out[row:row + 1], alone, atol=1e-6, rtol=0)
        torch.testing.assert_close(out, runs.model(x, t_B, y)[0], atol=1e-5, rtol=0)
        x2, t2, y2 = torch.cat([x, x]), torch.cat([t_B, t_B]), torch.cat([y, torch.full_like(y, 10)])
        guided = runs.model.forward_with_cfg(x2, t2, y2, 3.0)
        torch.testing.assert_close(switch.forward_with_cfg(x2, t2, y2, 3.0), guided, atol=1e-5, rtol=0)


def test_a_failed_export_leaves_no_folder_and_a_full_one_is_refused(runs, tmp_path, monkeypatch):
    """The third expert's file fails (a full disk): no folder is left and the same command then succeeds;
    an output folder holding files is refused before any work."""
    write, written = export_remix_experts.save_state, []

    def full_disk(state, path, metadata):
        if len(written) == 2:
            raise OSError(28, "No space left on device", str(path))
        written.append(path)
        write(state, path, metadata)

    monkeypatch.setattr(export_remix_experts, "save_state", full_disk)
    with pytest.raises(SystemExit, match="export_remix_experts: .*No space left on device"):
        export_remix_experts.main([str(runs.remix_dir), "--output", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its hidden staging copy
    monkeypatch.setattr(export_remix_experts, "save_state", write)
    export_remix_experts.main([str(runs.remix_dir), "--output", str(tmp_path / "out")])
    assert export_remix_experts.read_manifest(tmp_path / "out") == json.loads(runs.manifest.read_text())
    with pytest.raises(SystemExit, match=r"export_remix_experts: .*out: not empty"):
        export_remix_experts.main([str(runs.remix_dir), "--output", str(tmp_path / "out")])


def test_bad_inputs_are_one_line_errors(runs, tmp_path):
    with pytest.raises(ConfigError, match="not a Remix-DiT run") as err:
        export_remix_experts.export_experts(runs.plain_dir, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="export_remix_experts: .*not a Remix-DiT run"):
        export_remix_experts.main([str(runs.plain_dir), "--output", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="missing: no such folder"):
        export_remix_experts.export_experts(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing: no such folder"):
        export_remix_experts.load_exported_experts(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no experts.json"):
        export_remix_experts.load_exported_experts(tmp_path)
    plain = load_pretrained(runs.plain_dir)[1]
    with pytest.raises(ValueError, match="plain DiT"):
        ExpertSwitch.from_remix(plain)
    with pytest.raises(ValueError, match=r"expert 1's interval \[7, 20\)"):
        ExpertSwitch([plain, plain], [(0, 6), (7, 20)])
    switch = export_remix_experts.load_exported_experts(runs.export_dir)
    with pytest.raises(ValueError, match=r"timesteps: range \[0, 20\]"):
        switch.expert_of(torch.tensor([0, 20]))


@pytest.mark.parametrize("use_experts", [False, True], ids=["runtime-mixing", "exported"])
def test_sample_dit_writes_a_png(runs, tmp_path, capsys, use_experts):
    output = tmp_path / "grid.png"
    argv = [str(runs.remix_dir), "--output", str(output), "--num", "4", "--steps", "2", "--labels", "0,1",
            "--cfg-scale", "2"]
    sample_dit.main(argv + (["--experts", str(runs.export_dir)] if use_experts else []))
    with Image.open(output) as image:
        assert image.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2 columns (labels) x 2 rows of 8x8 digits at 4x
    printed = capsys.readouterr().out
    assert "4 images, ddim 2 steps" in printed and ("exported experts" in printed) == use_experts
    with pytest.raises(SystemExit, match="--labels 0,12: 12 is not a class id"):
        sample_dit.main([str(runs.remix_dir), "--output", str(output), "--labels", "0,12"])
