"""A trained Remix-DiT's experts as plain DiTs: every expert's weights mixed once and written in DiT's own layout.

    python tools/export_remix_experts.py runs/remix_study/remix_digits_4x20_s1234 --output exported/remix_4x20

RUN_DIR is a save folder (its `latest` is read) or one global_stepN folder. The output folder (new or empty; a
failed export leaves none) gets one file per expert, `expert{n:02d}.safetensors` (or `.pt`, a plain torch.save'd
state dict, when safetensors is not installed), each a plain DiT state dict with the official names and shapes
(facebookresearch/DiT's models.py loads it with load_state_dict), and `experts.json`:

    {"format": "remix-dit-experts", "version": 1, "dit_config": {image_size, in_channels, patch_size, depth,
     hidden_size, num_heads, mlp_ratio, num_classes, class_dropout_prob, learn_sigma},
     "num_experts": N, "num_timesteps": T, "intervals": [[lo, hi), ...], "files": ["expert00.pt", ...],
     "diffusion": {"beta_start", "beta_end"}, "source": {"checkpoint", "num_basis", "mixer", "scope"}}

`load_exported_experts(folder)` reads it back as an ExpertSwitch: sampling costs a plain DiT per step (the
mixing was done here, once), at N plain DiTs' memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import ConfigError  # noqa: E402
from megatron.model.dit import (  # noqa: E402
    DiT,
    DiTConfig,
    ExpertSwitch,
    load_official_dit_state_dict,
    mixed_state_dict,
    timestep_interval,
)
from megatron.outputs import check_output_folder, new_output_folder  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402

FORMAT, VERSION = "remix-dit-experts", 1
MANIFEST = "experts.json"
FORMATS = ("auto", "safetensors", "pt")


def has_safetensors() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def save_state(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors for a `.safetensors` path (metadata in its header), torch.save otherwise (a bare state dict,
    as official DiT checkpoints are)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    else:
        torch.save(state, path)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        if not has_safetensors():
            raise ImportError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)")
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def export_experts(run_dir: str | Path, output: str | Path, file_format: str = "auto") -> Path:
    """Writes every expert of the Remix-DiT run at `run_dir` into `output` (new or empty) and returns experts.json's
    path. The folder appears whole or not at all (megatron/outputs.py): a failure half-way leaves nothing."""
    run_dir, output = Path(run_dir), Path(output)
    if file_format not in FORMATS:
        raise ValueError(f"--format {file_format!r}: expected one of {', '.join(FORMATS)}")
    if file_format == "safetensors" and not has_safetensors():
        raise ValueError("--format safetensors: the safetensors package is not installed (pip install safetensors)")
    suffix = ".safetensors" if file_format == "safetensors" or (file_format == "auto" and has_safetensors()) else ".pt"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such folder (expected a run's save folder or one global_stepN)")
    check_output_folder(output)  # refused before the checkpoint is read
    args, model, checkpoint = load_pretrained(run_dir)
    if args.model_type != "dit" or not args.remix_num_basis:
        raise ConfigError(f"{run_dir}: not a Remix-DiT run (model_type {args.model_type}, remix_num_basis "
                          f"{getattr(args, 'remix_num_basis', None)}); there are no experts to export")
    remix = model.config.remix
    intervals = [timestep_interval(n, remix) for n in range(remix.num_experts)]
    files = [f"expert{n:02d}{suffix}" for n in range(remix.num_experts)]
    plain = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "remix"}
    manifest = {
        "format": FORMAT, "version": VERSION, "dit_config": plain,
        "num_experts": remix.num_experts, "num_timesteps": remix.num_timesteps,
        "intervals": [list(interval) for interval in intervals], "files": files,
        "diffusion": {"beta_start": args.beta_start, "beta_end": args.beta_end},
        "source": {"checkpoint": str(checkpoint), "num_basis": remix.num_basis, "mixer": remix.mixer,
                   "scope": remix.scope},
    }
    with new_output_folder(output) as staging:
        for n, (name, (lo, hi)) in enumerate(zip(files, intervals, strict=True)):
            save_state(mixed_state_dict(model, n), staging / name, {"expert": str(n), "interval": f"[{lo}, {hi})"})
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return output / MANIFEST


def read_manifest(folder: str | Path) -> dict:
    """experts.json of an export folder, checked for what the loader reads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected one written by tools/export_remix_experts.py)")
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST} (expected a folder written by tools/export_remix_experts.py)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r} "
                         f"(expected {FORMAT!r} version {VERSION})")
    n = manifest["num_experts"]
    if len(manifest["files"]) != n or len(manifest["intervals"]) != n:
        raise ValueError(f"{path}: {len(manifest['files'])} files and {len(manifest['intervals'])} intervals for "
                         f"num_experts {n} (expected as many)")
    if manifest["intervals"][-1][1] != manifest["num_timesteps"]:
        raise ValueError(f"{path}: intervals end at {manifest['intervals'][-1][1]}, num_timesteps is "
                         f"{manifest['num_timesteps']} (expected equal)")
    return manifest


def load_exported_experts(folder: str | Path) -> ExpertSwitch:
    """The experts written by `export_experts` as one ExpertSwitch (CPU, float32, eval mode); every file is checked
    key by key and shape by shape against the plain DiT of experts.json's config."""
    manifest = read_manifest(folder)
    config = DiTConfig(**manifest["dit_config"])
    experts = []
    for name in manifest["files"]:
        expert = DiT(config)
        try:
            load_official_dit_state_dict(expert, load_state(Path(folder) / name))
        except ValueError as err:
            raise ValueError(f"{Path(folder) / name}: {err}") from None
        experts.append(expert)
    return ExpertSwitch(experts, [tuple(interval) for interval in manifest["intervals"]]).eval()


def main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a Remix-DiT save folder (its `latest`) or one global_stepN")
    parser.add_argument("--output", type=Path, required=True, help="the folder to write the experts into")
    parser.add_argument("--format", dest="file_format", choices=FORMATS, default="auto",
                        help="auto: safetensors if installed, else .pt")
    options = parser.parse_args(argv)
    try:
        path = export_experts(options.run_dir, options.output, options.file_format)
    except (ConfigError, OSError, ValueError) as err:  # OSError: a non-empty output folder, a full disk
        sys.exit(f"export_remix_experts: {err}")
    manifest = json.loads(path.read_text())
    print(f"export_remix_experts: {manifest['num_experts']} experts of {manifest['source']['checkpoint']} -> "
          f"{options.output} ({manifest['files'][0]} ...)")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
