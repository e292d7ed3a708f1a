"""How close granular upcycling (megatron/model/upcycle.py, tools/upcycle.py --granularity) keeps a model to its
dense source at step 0: max |logit difference| and validation loss, per construction.

    python benchmarks/upcycle_granular.py --json docs/results/upcycle_granular.json   # trains the source, measures
    python benchmarks/upcycle_granular.py --dense runs/tiny_llama                        # any dense Llama-shaped run
    python benchmarks/upcycle_granular.py --markdown docs/results/upcycle_granular.json  # the table, no measuring

The source is configs/tiny_llama.yml (F = 344) trained for --train-iters steps with train.py (or --dense: a
checkpoint of that shape). Each row upcycles it with tools/upcycle.py's own code path and the words in its
`options` column, and runs the source and the upcycled model in eval mode on the same validation samples of the
bundled corpus (the run's split and seq_length, --eval-batches micro-batches): the largest |logit difference|
over every token and vocabulary entry, and the mean validation loss of each; and the routings (token x MoE
layer) whose top-k did not take whole virtual groups. Rows marked exact are those the construction makes equal
(top-k a multiple of the routed shards, gates that sum to a known s; tools/upcycle.py refuses the others unless
--allow-inexact, and their figures are the gap). An exact row still splits a group where two groups' scores
come out equal in fp32 (a logit gap below the score's rounding): top-k then takes part of each, and that token
differs; the split routings column counts those.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tools"):
    if str(folder) not in sys.path:  # run as a script: the package and the tool are the repo's
        sys.path.insert(0, str(folder))

import upcycle as upcycle_tool  # noqa: E402

import train  # noqa: E402
from megatron.data.gpt_dataset import build_train_valid_test_datasets  # noqa: E402
from megatron.model.moe import MoELayer  # noqa: E402
from megatron.model.upcycle import inexact_reasons, shard_plan  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402

MIXTRAL = "configs/upcycle/llama_to_mixtral.yml"  # softmax top-k, renormalised gates, 8 experts
DEEPSEEK = "configs/upcycle/llama_to_deepseek.yml"  # sigmoid, expert bias, 1 shared of 4 shards, 12 routed, top-6
SIGMOID = ["--moe_router_score_function", "sigmoid", "--moe_renormalize_weights", "false"]
# (name, the tool's words after SOURCE OUT); the rows whose construction is inexact get --allow-inexact
ROWS: list[tuple[str, list[str]]] = [
    ("copies (Mixtral-style), top-2 of 8", [MIXTRAL]),
    ("4 shards, 2 groups, top-4", [MIXTRAL, "--granularity", "4", "--moe_top_k", "4"]),
    ("4 shards, 4 groups, top-8", [MIXTRAL, "--granularity", "4", "--moe_num_experts", "16", "--moe_top_k", "8"]),
    ("DeepSeek overlay: 1 shared + 3 routed x 4, sigmoid top-6", [DEEPSEEK]),
    ("the same, 4 router groups (top-2 groups), scaling 2.5",
     [DEEPSEEK, "--moe_router_num_groups", "4", "--moe_router_group_top_k", "2", "--moe_router_scaling_factor", "2.5"]),
    ("8 shards: 2 shared + 6 routed x 4, sigmoid top-6",
     [MIXTRAL, "--granularity", "8", "--shared-experts", "2", "--moe_num_experts", "24", "--moe_top_k", "6", *SIGMOID]),
    ("4 shards x 4, top-2 (half of each MLP)", [MIXTRAL, "--granularity", "4", "--moe_num_experts", "16",
                                                "--moe_top_k", "2"]),
    ("4 shards x 2, top-6 (one and a half groups)", [MIXTRAL, "--granularity", "4", "--moe_top_k", "6"]),
    ("8 shards x 4, top-4 (half of each MLP)", [MIXTRAL, "--granularity", "8", "--moe_num_experts", "32",
                                                "--moe_top_k", "4"]),
    ("DeepSeek overlay, top-2 (2 of 3 routed shards)", [DEEPSEEK, "--moe_top_k", "2"]),
    ("4 shards x 4, top-4, raw softmax (down x R E / k)",
     [MIXTRAL, "--granularity", "4", "--moe_num_experts", "16", "--moe_top_k", "4", "--moe_renormalize_weights",
      "false"]),
]


def train_dense(folder: Path, iters: int) -> Path:
    """configs/tiny_llama.yml trained for `iters` steps into folder/dense; returns the save folder."""
    save = folder / "dense"
    train.run([str(REPO / "configs/tiny_llama.yml"), "--train_iters", str(iters), "--save", str(save), "--load", "",
               "--log_dir", str(folder / "logs"), "--tensorboard_dir", "", "--eval_interval", "0",
               "--checkpoint_factor", str(iters)])
    return save


def validation_batches(args, batches: int) -> list[torch.Tensor]:
    """The first `batches` micro-batches of the run's validation split ([B, S+1] token ids each)."""
    micro = args.train_micro_batch_size_per_gpu
    _, valid, _ = build_train_valid_test_datasets([args.data_path], None, args.split, args.seq_length, args.seed,
                                                  (1, batches * micro, 0))
    return [torch.from_numpy(np.stack([np.asarray(valid[b * micro + j], dtype=np.int64) for j in range(micro)]))
            for b in range(batches)]


def split_choices(expert_ids_TK: torch.Tensor, routed: int) -> int:
    """Rows whose chosen experts are not whole virtual groups (each group: `routed` consecutive experts)."""
    per_group = torch.zeros(expert_ids_TK.shape[0], int(expert_ids_TK.max()) // routed + 1, dtype=torch.long)
    per_group.scatter_add_(1, expert_ids_TK // routed, torch.ones_like(expert_ids_TK))
    return int(((per_group != 0) & (per_group != routed)).any(dim=1).sum())


@torch.no_grad()
def compare(dense: torch.nn.Module, moe: torch.nn.Module, batches: list[torch.Tensor], routed: int
            ) -> dict[str, float]:
    """Max |logit difference| over every position and vocabulary entry, both mean validation losses, and the
    routings (token x MoE layer) that did not choose whole virtual groups of `routed` experts."""
    worst, losses, split, routings = 0.0, {"dense": [], "moe": []}, [], []

    def count(module, inputs, routing):
        split.append(split_choices(routing.expert_ids_TK, routed))
        routings.append(routing.expert_ids_TK.shape[0])

    hooks = [b.mlp.router.register_forward_hook(count) for b in moe.blocks if isinstance(b.mlp, MoELayer)]
    for tokens_BS1 in batches:
        inputs, targets = tokens_BS1[:, :-1], tokens_BS1[:, 1:].flatten()
        logits = {name: model.eval()(inputs)[0].float() for name, model in (("dense", dense), ("moe", moe))}
        worst = max(worst, float((logits["moe"] - logits["dense"]).abs().max()))
        for name, value in logits.items():
            losses[name].append(float(F.cross_entropy(value.flatten(0, 1), targets)))
    for hook in hooks:
        hook.remove()
    return {"max_abs_logit_diff": worst, "dense_loss": float(np.mean(losses["dense"])),
            "val_loss": float(np.mean(losses["moe"])), "split_routings": sum(split), "routings": sum(routings)}


def describe(args, model: torch.nn.Module, width: int) -> dict:
    """The upcycled layout (from the model built) and whether the construction is exact."""
    layer = next(b.mlp for b in model.blocks if isinstance(b.mlp, MoELayer))
    plan = shard_plan(width, args.moe_ffn_hidden_size, args.moe_num_experts, args.moe_num_shared_experts)
    reasons = inexact_reasons(plan, layer.router)
    return {"granularity": plan.granularity, "shared": plan.shared, "experts": plan.num_experts,
            "top_k": args.moe_top_k, "scores": args.moe_router_score_function,
            "active_width": (plan.shared + args.moe_top_k) * plan.shard_width, "dense_width": width,
            "exact": not reasons, "inexact_because": reasons}


def measure(opts, command: str) -> dict:
    folder = Path(opts.folder or tempfile.mkdtemp(prefix="upcycle_granular_"))
    source = Path(opts.dense) if opts.dense else train_dense(folder, opts.train_iters)
    src_args, dense, path = load_pretrained(source)
    width = dense.blocks[0].mlp.down.weight.shape[1]
    batches = validation_batches(src_args, opts.eval_batches)
    rows = []
    for i, (name, words) in enumerate(ROWS):
        out = folder / f"up{i}"
        files, overrides = upcycle_tool.parse_command_line(words)
        changes = upcycle_tool.yaml_overrides([str(REPO / f) for f in files])
        granularity, overrides = upcycle_tool.pop_option(overrides, ("--granularity",))
        shared, overrides = upcycle_tool.pop_option(overrides, ("--shared-experts",))
        try:
            upcycle_tool.upcycle(path, out, changes + overrides, granularity=granularity and int(granularity),
                                 shared_experts=shared and int(shared))
            inexact = False
        except ValueError:  # refused as inexact: built anyway, the gap is the figure
            upcycle_tool.upcycle(path, out, changes + overrides, granularity=granularity and int(granularity),
                                 shared_experts=shared and int(shared), allow_inexact=True)
            inexact = True
        args, moe, _ = load_pretrained(out)
        row = {"name": name, "options": " ".join(words), **describe(args, moe, width)}
        row |= compare(dense, moe, batches, row["granularity"] - row["shared"])
        assert row["exact"] != inexact, name  # the tool refused exactly the rows the construction calls inexact
        row["loss_minus_dense"] = row["val_loss"] - row["dense_loss"]
        rows.append(row)
        print(f"{name}: max |dlogit| {row['max_abs_logit_diff']:.3g}, loss {row['val_loss']:.4f} "
              f"({row['loss_minus_dense']:+.4f})", flush=True)
    return {
        "command": command,
        "source": {"config": "configs/tiny_llama.yml", "checkpoint": path.name, "train_iters": opts.train_iters
                   if not opts.dense else None, "dense_width": width, "val_loss": rows[0]["dense_loss"]},
        "eval": {"micro_batches": opts.eval_batches, "sequences": sum(len(b) for b in batches),
                 "tokens": sum(b[:, 1:].numel() for b in batches), "seq_length": src_args.seq_length},
        "rows": rows,
        "torch": torch.__version__, "machine": platform.machine(),
    }


def signed(x: float) -> str:
    """x to 4 decimals with its sign; 0.0000 for what rounds to zero (no -0.0000)."""
    return f"{x:+.4f}" if round(x, 4) else "0.0000"


def markdown(recorded: dict) -> str:
    """The docs' table: one row per construction."""
    source = recorded["source"]
    trained = f"after {source['train_iters']} steps" if source["train_iters"] else f"({source['checkpoint']})"
    lines = [f"Source: `{source['config']}` {trained} (F = {source['dense_width']}), "
             f"validation loss {source['val_loss']:.4f} over {recorded['eval']['tokens']} tokens.", "",
             "| construction | G | shared | E | top-k | scores | active width | exact | split routings "
             "| max abs logit diff | val loss | loss - dense |",
             "|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    for r in recorded["rows"]:
        lines.append(f"| {r['name']} | {r['granularity']} | {r['shared']} | {r['experts']} | {r['top_k']} | "
                     f"{r['scores']} | {r['active_width']} | {'yes' if r['exact'] else 'no'} | "
                     f"{r['split_routings']:,} / {r['routings']:,} | {r['max_abs_logit_diff']:.2e} | "
                     f"{r['val_loss']:.4f} | {signed(r['loss_minus_dense'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", help="a dense tiny_llama-shaped checkpoint (default: train one)")
    parser.add_argument("--train-iters", type=int, default=200, help="steps of the dense source's training")
    parser.add_argument("--eval-batches", type=int, default=10, help="validation micro-batches compared")
    parser.add_argument("--folder", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="print the table of a recorded JSON and stop")
    opts = parser.parse_args(argv)
    if opts.markdown:
        recorded = json.loads(Path(opts.markdown).read_text())
        print(markdown(recorded))
        return recorded
    result = measure(opts, " ".join(["python benchmarks/upcycle_granular.py", *(argv or sys.argv[1:])]))
    print(markdown(result))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
