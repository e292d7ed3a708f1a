"""Small models saved through the real checkpoint writer, for the Hugging Face bridge and upcycling tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from helpers.runs import write_config

from megatron.config import load_config
from megatron.data.tokenizer import vocab_size_of
from megatron.model.build import build_gpt
from megatron.model.gpt import GPT
from megatron.training.seed_checkpoint import write_step0_checkpoint

REPO = Path(__file__).resolve().parents[2]
VOCAB_FILE = str(REPO / "megatron/data/bundled/shakespeare_tokenizer.json")
TOKENIZER = {"tokenizer_type": "HFTokenizer", "vocab_file": VOCAB_FILE, "make_vocab_size_divisible_by": 64}


def build(folder: Path, data_prefix: str, **overrides):
    """(args, model) of a config written into `folder`, weights as initialised."""
    args = load_config([str(write_config(folder, data_prefix, **{**TOKENIZER, **overrides}))])
    return args, build_gpt(args, vocab_size_of(args))


def saved_model(folder: Path, data_prefix: str, scramble: bool = True, zero: tuple[str, ...] = (),
                **overrides) -> tuple[Path, GPT]:
    """A model saved as SAVE/global_step0; `scramble`: every tensor it saves random (parameters, biases and norms
    too, and saved buffers such as the routers' loss-free balancing biases), so a wrong mapping of any tensor
    shows in the logits, except those whose names contain a `zero` string."""
    args, model = build(folder, data_prefix, **overrides)
    if scramble:
        gen = torch.Generator().manual_seed(1)
        saved = set(model.state_dict())
        tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers()
                                                  if n in saved and b.is_floating_point())]
        with torch.no_grad():
            for name, p in tensors:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
                if any(z in name for z in zero):
                    p.zero_()
    write_step0_checkpoint(args, model, args.save)
    return Path(args.save), model.eval()


def save_random(model, folder: Path, near_one=lambda name: "norm" in name):
    """Every parameter of a transformers model random from the current seed (those `near_one` names around 1,
    e.g. norm weights), saved to `folder` with the bundled tokenizer; the model, in eval mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if near_one(name) else 0.0) + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    shutil.copyfile(VOCAB_FILE, Path(folder) / "tokenizer.json")
    return model.eval()


def train_converted(tmp_path: Path, data_prefix: str):
    """train.py continues 3 steps from the step-0 checkpoint tools/convert_from_hf.py wrote to TMP/ours (its
    model.yml, our corpus at sequence 16) into TMP/continued; returns the TrainResult."""
    import yaml

    import train

    run = {"data_path": data_prefix, "split": "90,10,0", "train_micro_batch_size_per_gpu": 2,
           "gradient_accumulation_steps": 1, "train_iters": 3, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "eval_interval": 100, "eval_iters": 1, "log_interval": 1, "checkpoint_factor": 100,
           "log_dir": str(tmp_path / "logs"), "seed": 3}
    (tmp_path / "run.yml").write_text(yaml.safe_dump(run))
    return train.run([str(tmp_path / "ours/model.yml"), str(tmp_path / "run.yml"), "--load", str(tmp_path / "ours"),
                      "--save", str(tmp_path / "continued"), "--seq_length", "16"])
