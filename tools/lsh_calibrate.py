"""Choose LSH-MoE settings for a trained model: compression rate and output error per setting, measured.

Shape legend: B sequences, S sequence.

    python tools/lsh_calibrate.py runs/tiny_structmoe
    python tools/lsh_calibrate.py runs/my_run --settings 1x16,2x8,2x16 --tokens 2048,16384 --target 0.2
    python tools/lsh_calibrate.py docs/lsh_calibration.json --markdown   # docs/lsh.md's table, from its JSON

How many rows an LSH bucket merges depends on the model's hidden states (how clustered the rows an expert
receives are), on the rows per expert in one exchange (more rows, more collisions) and on the setting
(`lsh_num_hashes` x `lsh_hash_dim`: (2 x hash_dim)^num_hashes buckets per expert). This loads a run's
checkpoint, runs held-out validation sequences through it, and for every MoE layer, setting and number of
tokens per exchange (the tokens one rank routes in one micro-batch) reports, with the layer's own LSH
seed as in training:

- the compression rate, centroids / rows (what crosses the exchange, relative to the exact one);
- the relative error of the layer output against the exact layer, with and without error compensation.

It prints a table, marks the setting nearest `--target` at the run's own micro-batch, and writes the
figures as JSON and a PNG (`--output`). One process, the model whole, no expert parallelism needed:
compression is per source rank, so one rank's tokens give the rates each rank would see.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron.config import ConfigError  # noqa: E402
from megatron.model.moe.dispatcher import LSHDispatcher  # noqa: E402
from megatron.model.moe.lsh import LSHConfig  # noqa: E402
from megatron.model.moe.lsh_probes import outputs_under, relative_error  # noqa: E402

DEFAULT_SETTINGS = "1x8,1x16,1x32,1x64,2x4,2x8,2x16,2x32"


def parse_settings(text: str) -> list[tuple[int, int]]:
    settings = []
    for item in text.split(","):
        try:
            hashes, dims = (int(part) for part in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--settings: '{item}' is not NUM_HASHESxHASH_DIM (for example 2x16)") from None
        settings.append((hashes, dims))
    return settings


def validation_tokens(args, num_sequences: int) -> torch.Tensor:
    """Held-out sequences: the validation split, which training never steps on."""
    from megatron.data.gpt_dataset import build_train_valid_test_datasets

    _, valid, _ = build_train_valid_test_datasets(
        data_prefixes=[args.data_path] if args.data_path else None, weights=None, split=args.split,
        seq_length=args.seq_length, seed=args.seed, num_samples=(0, num_sequences, 0),
        valid_prefixes=args.valid_data_paths, valid_weights=args.valid_data_weights)
    if valid is None or len(valid) == 0:
        raise SystemExit(f"{args.data_path}: no validation split to calibrate on (split '{args.split}')")
    return torch.from_numpy(np.stack([np.asarray(valid[i], dtype=np.int64) for i in range(num_sequences)]))


def moe_inputs(model, tokens_BS1: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each MoE layer's input on these sequences, by transformer-layer index."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [block.mlp.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].detach()))
             for i, block in enumerate(model.blocks) if hasattr(block.mlp, "dispatcher")]
    try:
        with torch.no_grad():
            model(tokens_BS1[:, :-1])
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def measure(layer, x: torch.Tensor, config: LSHConfig) -> dict[str, float]:
    exact_dispatcher = getattr(layer.dispatcher, "inner", layer.dispatcher)
    lsh = LSHDispatcher(exact_dispatcher, x.shape[-1], config)
    out = outputs_under(layer, x, {"exact": exact_dispatcher, "with": lsh.with_compensation(True),
                                   "without": lsh.with_compensation(False)})
    exact = out["exact"][0]
    return {"compression_rate": out["with"][1].dispatch_stats["lsh_compression_rate"],
            "error_with_compensation": relative_error(out["with"][0], exact),
            "error_without_compensation": relative_error(out["without"][0], exact)}


def calibrate(run: str, settings: list[tuple[int, int]], token_counts: list[int] | None,
              precision: str = "fp32") -> dict:
    from megatron.training.pretrained import load_pretrained

    args, model, path = load_pretrained(run)
    if args.moe_num_experts <= 1:
        raise SystemExit(f"{path}: not an MoE model (moe_num_experts {args.moe_num_experts})")
    own_tokens = args.train_micro_batch_size_per_gpu * args.seq_length
    token_counts = token_counts or [own_tokens, 4 * own_tokens, 16 * own_tokens]
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    results = []
    for tokens in token_counts:
        sequences = -(-tokens // args.seq_length)
        batch = validation_tokens(args, sequences)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            inputs = moe_inputs(model, batch)
            for layer_idx, x in inputs.items():
                x = x.reshape(-1, x.shape[-1])[:tokens]
                layer = model.blocks[layer_idx].mlp
                for hashes, dims in settings:
                    config = LSHConfig(hashes, dims, seed=args.seed + layer_idx)  # the layer's seed in training
                    row = {"layer": layer_idx, "tokens": tokens, "num_hashes": hashes, "hash_dim": dims,
                           "rows_per_expert": tokens * args.moe_top_k / args.moe_num_experts,
                           **measure(layer, x, config)}
                    results.append(row)
                    print(f"  layer {layer_idx:2d}  {tokens:6d} tokens  {hashes}x{dims:<3d}  "
                          f"rate {row['compression_rate']:.3f}  error {row['error_with_compensation']:.3f} / "
                          f"{row['error_without_compensation']:.3f}", flush=True)
    return {"checkpoint": str(path), "precision": precision, "own_tokens": own_tokens,
            "lore": args.lore_num_experts, "experts": args.moe_num_experts, "top_k": args.moe_top_k,
            "hidden_size": args.hidden_size, "results": results}


def layer_mean(results: list[dict], tokens: int, setting: tuple[int, int], key: str) -> float:
    values = [r[key] for r in results if r["tokens"] == tokens and (r["num_hashes"], r["hash_dim"]) == setting]
    return sum(values) / len(values)


def nearest(report: dict, settings: list[tuple[int, int]], target: float) -> tuple[int, int]:
    tokens = report["own_tokens"] if any(r["tokens"] == report["own_tokens"] for r in report["results"]) \
        else report["results"][0]["tokens"]
    return min(settings, key=lambda s: (abs(layer_mean(report["results"], tokens, s, "compression_rate") - target),
                                        (2 * s[1]) ** s[0]))


def print_table(report: dict, settings: list[tuple[int, int]], target: float) -> None:
    results = report["results"]
    token_counts = sorted({r["tokens"] for r in results})
    print(f"\n{report['checkpoint']}: mean over the {len({r['layer'] for r in results})} MoE layers; "
          f"error = relative layer-output error with / without compensation; {report['precision']}")
    print(f"{'setting':>8s} " + " ".join(f"{f'{t} tokens':>28s}" for t in token_counts))
    for setting in settings:
        cells = []
        for t in token_counts:
            rate = layer_mean(results, t, setting, "compression_rate")
            with_c = layer_mean(results, t, setting, "error_with_compensation")
            without = layer_mean(results, t, setting, "error_without_compensation")
            cells.append(f"{rate:7.3f}  {with_c:.3f} / {without:.3f}")
        print(f"{setting[0]}x{setting[1]:<6d} " + " ".join(f"{c:>28s}" for c in cells))
    best = nearest(report, settings, target)
    print(f"\nnearest to compression rate {target} at this run's micro-batch ({report['own_tokens']} tokens): "
          f"--lsh_num_hashes {best[0]} --lsh_hash_dim {best[1]}")


def markdown_summary(report: dict, default: tuple[int, int] = (2, 16)) -> str:
    """The calibration as the Markdown table and counts docs/lsh.md quotes, computed from the JSON alone."""
    results = report["results"]
    token_counts = sorted({r["tokens"] for r in results})
    settings = sorted({(r["num_hashes"], r["hash_dim"]) for r in results})
    own = report["own_tokens"]
    header = ["setting"] + [f"rate, {t} tokens" for t in token_counts] + [f"error with / without comp., {own}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting in settings:
        rates = [f"{layer_mean(results, t, setting, 'compression_rate'):.3f}" for t in token_counts]
        with_c = layer_mean(results, own, setting, "error_with_compensation")
        without = layer_mean(results, own, setting, "error_without_compensation")
        cells = [f"{setting[0]}x{setting[1]}" + (" (default)" if setting == default else "")] + rates + [
            f"{with_c:.3f} / {without:.3f}"]
        if setting == default:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    changes = [r["error_with_compensation"] - r["error_without_compensation"] for r in results]
    lowered = sum(c < 0 for c in changes)
    own_errors = [r[k] for r in results if r["tokens"] == own
                  for k in ("error_with_compensation", "error_without_compensation")]
    centroids = {t: [r["compression_rate"] * r["rows_per_expert"] for r in results
                     if r["tokens"] == t and (r["num_hashes"], r["hash_dim"]) == default] for t in token_counts}
    rows = {t: next(r["rows_per_expert"] for r in results if r["tokens"] == t) for t in token_counts}
    first, last = token_counts[0], token_counts[-1]
    lines += [
        "",
        f"Mean over the {len({r['layer'] for r in results})} MoE layers, {report['precision']}. Per layer, setting "
        f"and tokens ({len(results)} cases), the compensation lowered the layer-output error in {lowered} and "
        f"raised it in {len(results) - lowered}; the largest change was {min(changes):+.3f} / {max(changes):+.3f}. "
        f"The error at {own} tokens is {min(own_errors):.2f}-{max(own_errors):.2f}. "
        f"{default[0]}x{default[1]} leaves {min(centroids[first]):.0f}-{max(centroids[first]):.0f} centroids per "
        f"expert at {rows[first]:.0f} rows, {min(centroids[last]):.0f}-{max(centroids[last]):.0f} at "
        f"{rows[last]:.0f}.",
    ]
    return "\n".join(lines)


def plot(report: dict, settings: list[tuple[int, int]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    token_counts = sorted({r["tokens"] for r in results})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for setting in settings:
        label = f"{setting[0]}x{setting[1]}"
        rates = [layer_mean(results, t, setting, "compression_rate") for t in token_counts]
        left.plot(token_counts, rates, marker="o", label=label)
        right.scatter([layer_mean(results, t, setting, "compression_rate") for t in token_counts],
                      [layer_mean(results, t, setting, "error_with_compensation") for t in token_counts],
                      marker="o", color="C0")
        right.scatter([layer_mean(results, t, setting, "compression_rate") for t in token_counts],
                      [layer_mean(results, t, setting, "error_without_compensation") for t in token_counts],
                      marker="x", color="C3")
    left.axhline(target, color="gray", linestyle="--", linewidth=1)
    left.set_xscale("log")
    left.set_xticks(token_counts, [str(t) for t in token_counts], minor=False)
    left.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    left.set(yscale="log", xlabel="tokens per exchange (one rank, one micro-batch)",
             ylabel="compression rate (centroids / rows)", title="compression per setting (hashes x dims)")
    left.legend(fontsize=7, ncol=2)
    right.scatter([], [], marker="o", color="C0", label="with compensation")
    right.scatter([], [], marker="x", color="C3", label="without compensation")
    right.set(xscale="log", xlabel="compression rate", ylabel="relative layer-output error",
              title="error against the exact layer")
    right.legend(fontsize=8)
    fig.suptitle(Path(report["checkpoint"]).parent.name + f" ({report['precision']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a save folder (its latest checkpoint) or a global_stepN folder; or a JSON "
                        "this tool wrote, to print its tables again without measuring")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="NUM_HASHESxHASH_DIM, comma-separated")
    parser.add_argument("--tokens", default=None,
                        help="tokens per exchange, comma-separated (default: the run's micro-batch, x4, x16)")
    parser.add_argument("--target", type=float, default=0.2, help="compression rate to aim for")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--output", default=None, help="PNG path; the JSON goes beside it (default: none)")
    parser.add_argument("--markdown", action="store_true", help="also print the Markdown table docs/lsh.md quotes")
    opts = parser.parse_args(argv)
    settings = parse_settings(opts.settings)
    if opts.run.endswith(".json"):
        report = json.loads(Path(opts.run).read_text())
        measured = sorted({(r["num_hashes"], r["hash_dim"]) for r in report["results"]})
        print_table(report, [s for s in settings if s in measured], opts.target)
        if opts.markdown:
            print("\n" + markdown_summary(report))
        return
    tokens = [int(t) for t in opts.tokens.split(",")] if opts.tokens else None
    try:
        report = calibrate(opts.run, settings, tokens, opts.precision)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    print_table(report, settings, opts.target)
    if opts.markdown:
        print("\n" + markdown_summary(report))
    if opts.output:
        output = Path(opts.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.with_suffix(".json").write_text(json.dumps(report, indent=1))
        plot(report, settings, opts.target, output)
        print(f"wrote {output} and {output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
