"""Downstream evaluation speed: our lm-eval adapter (megatron/evaluation/lm_eval_adapter.py) against lm-eval's
HFLM on the Hugging Face export of the same checkpoint, and the evaluation's wall time against training steps,
side by side in one run.

    python benchmarks/lm_eval_speed.py                       # configs/tiny.yml and tiny_structmoe.yml, 40 docs a task
    python benchmarks/lm_eval_speed.py --limit 4 --repeats 1 --configs tiny.yml            # quick
    python benchmarks/lm_eval_speed.py --threads 1 --json docs/results/lm_eval_speed.json  # the committed figures
    python benchmarks/lm_eval_speed.py --markdown docs/results/lm_eval_speed.json          # their table, no measuring

Each config's model (random weights from its seed: speed does not depend on them) is saved as a step-0
checkpoint and exported with tools/convert_to_hf.py (StructMoE as remote code). Both models answer the four
local tasks of tests/data/lm_eval_tasks (multiple choice, last word, rolling perplexity, generation) with the
same batch size, one task at a time, alternating ours and HFLM each repeat; the fastest repeat is kept (as
timeit does: on a shared machine, other work only ever adds time). Tokens are those the
requests hold, the same for both: a scored context and continuation (cut to the context window), a perplexity
document's tokens, a prompt and its generated text. For training, one step of the run's micro batch (forward,
backward, AdamW) is timed; the evaluation is set against as many training steps as it ran forward batches, and
as a count of training steps (its wall time over one step's).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.config import load_config  # noqa: E402
from megatron.data.tokenizer import tokenizer_of, vocab_size_of  # noqa: E402
from megatron.evaluation.lm_eval_tasks import lm_eval_module, quiet_lm_eval, task_manager  # noqa: E402
from megatron.hf.export import convert_to_hf  # noqa: E402
from megatron.model.build import build_gpt  # noqa: E402
from megatron.runtime import keep_freed_memory_in_process  # noqa: E402
from megatron.training.seed_checkpoint import write_step0_checkpoint  # noqa: E402

TASKS_DIR = REPO / "tests/data/lm_eval_tasks"
TASKS = ["shakespeare_next_line", "shakespeare_last_word", "shakespeare_passages", "shakespeare_continue_line"]


def save_and_export(config: str, folder: Path) -> tuple[object, Path, Path, dict]:
    """(args, checkpoint, export folder, export report) of `config`'s model at initialisation."""
    args = load_config([str(REPO / "configs" / config)], ["--save", str(folder / "ckpt"), "--load", "",
                                                          "--log_dir", str(folder / "logs")])
    torch.manual_seed(args.seed)
    write_step0_checkpoint(args, build_gpt(args, vocab_size_of(args)), args.save)
    report = convert_to_hf(args.save, folder / "hf")
    return args, Path(args.save), folder / "hf", report


def request_tokens(samples: list[dict], encode, window: int) -> int:
    """Tokens the task's requests hold (module docstring), counted from lm-eval's logged samples."""
    total = 0
    for sample in samples:
        for arguments, responses in zip(sample["arguments"], sample["resps"]):
            if len(arguments) == 1:  # a perplexity document: each token predicted once
                total += len(encode(arguments[0]))
            elif isinstance(arguments[1], dict):  # a prompt and what was generated
                total += min(len(encode(arguments[0])), window) + len(encode(responses[0]))
            else:  # a context and continuation, cut to the window as both models cut them
                total += min(len(encode(arguments[0] + arguments[1])), window + 1) - 1
    return total


def timed_requests(lm) -> list[float]:
    """Wraps the model's three request methods (on this instance) to add the seconds spent in them to the
    returned one-item list: the model's own time, without lm-eval's task building and metrics."""
    spent = [0.0]

    def timer(method):
        def timed(requests, *args, **kwargs):
            start = time.perf_counter()
            out = method(requests, *args, **kwargs)
            spent[0] += time.perf_counter() - start
            return out
        return timed

    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, name, timer(getattr(lm, name)))
    return spent


def evaluate(lm, spent: list[float], manager, task: str, limit: int) -> tuple[float, float, list[dict]]:
    """(wall seconds of lm-eval's simple_evaluate, seconds inside the model's requests, the logged samples)."""
    simple_evaluate = lm_eval_module("lm_eval.evaluator").simple_evaluate
    spent[0] = 0.0
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, bootstrap_iters=0,
                          log_samples=True)
    return time.perf_counter() - start, spent[0], out["samples"][task]


def train_step_seconds(args, model: torch.nn.Module, steps: int) -> float:
    """Wall time of a training step (the fastest of `steps`): the run's micro batch, forward, backward and AdamW."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model.cfg.vocab_size, (args.train_micro_batch_size_per_gpu, args.seq_length + 1))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss, aux = model(tokens[:, :-1], tokens[:, 1:])
        loss = loss + sum(a.loss for a in aux if getattr(a, "loss", None) is not None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - start)
    model.eval()
    return min(times)


def bench_config(config: str, opts, manager, folder: Path) -> dict:
    from megatron.evaluation.lm_eval_adapter import MegatronLM

    HFLM = lm_eval_module("lm_eval.models.huggingface").HFLM
    args, save, hf_folder, report = save_and_export(config, folder)
    ours = MegatronLM.from_checkpoint(save, device="cpu", batch_size=opts.batch_size)
    theirs = HFLM(pretrained=str(hf_folder), trust_remote_code=True, batch_size=opts.batch_size, device="cpu")
    forwards = [0]
    ours.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    models = {"ours": (ours, timed_requests(ours)), "hflm": (theirs, timed_requests(theirs))}
    encode, window = tokenizer_of(args).encode, ours.max_length
    for task in TASKS:  # warm-up: allocator, lazily built kernels, dataset caches
        for lm, spent in models.values():
            evaluate(lm, spent, manager, task, 2)
    rows = {}
    for task in TASKS:
        times: dict[str, list[tuple[float, float]]] = {"ours": [], "hflm": []}
        for _ in range(opts.repeats):
            forwards[0] = 0
            for name, (lm, spent) in models.items():
                wall, model_seconds, samples = evaluate(lm, spent, manager, task, opts.limit)
                times[name].append((wall, model_seconds))
                if name == "ours":
                    tokens, batches = request_tokens(samples, encode, window), forwards[0]
        row = {"documents": len(samples), "tokens": tokens, "forward_batches": batches}
        for name, pairs in times.items():
            row[f"{name}_wall_seconds"] = min(wall for wall, _ in pairs)
            row[f"{name}_model_seconds"] = min(model for _, model in pairs)
            row[f"{name}_tokens_per_s"] = tokens / row[f"{name}_model_seconds"]
        row["ours_over_hflm"] = row["ours_tokens_per_s"] / row["hflm_tokens_per_s"]
        rows[task] = row
    step = train_step_seconds(args, ours.model, opts.train_steps)
    total = {key: sum(row[key] for row in rows.values()) for key in
             ("tokens", "forward_batches", "ours_wall_seconds", "ours_model_seconds", "hflm_wall_seconds",
              "hflm_model_seconds")}
    for name in ("ours", "hflm"):
        total[f"{name}_tokens_per_s"] = total["tokens"] / total[f"{name}_model_seconds"]
    total["ours_over_hflm"] = total["ours_tokens_per_s"] / total["hflm_tokens_per_s"]
    return {"config": config, "export": f"{report['format']} ({report['class']})", "tasks": rows, "total": total,
            "training": {"micro_batch": args.train_micro_batch_size_per_gpu, "seq_length": args.seq_length,
                         "step_seconds": step, "seconds_of_as_many_steps": total["forward_batches"] * step,
                         "evaluation_in_steps": total["ours_wall_seconds"] / step}}


def report(result: dict) -> None:
    print(f"\n{result['config']} (export: {result['export']}), batch size {result['batch_size']}; model s: inside "
          "the requests, wall s: lm-eval's whole call; tok/s on model time")
    print(f"  {'task':<27}{'docs':>5}{'tokens':>8}{'ours model s':>13}{'HFLM model s':>13}{'ours tok/s':>11}"
          f"{'HFLM tok/s':>11}{'ours/HFLM':>10}{'ours wall s':>12}{'HFLM wall s':>12}")
    for task, row in {**result["tasks"], "all four": result["total"]}.items():
        print(f"  {task:<27}{row.get('documents', ''):>5}{row['tokens']:>8}{row['ours_model_seconds']:>13.2f}"
              f"{row['hflm_model_seconds']:>13.2f}{row['ours_tokens_per_s']:>11.0f}{row['hflm_tokens_per_s']:>11.0f}"
              f"{row['ours_over_hflm']:>9.2f}x{row['ours_wall_seconds']:>12.2f}{row['hflm_wall_seconds']:>12.2f}")
    train, total = result["training"], result["total"]
    print(f"  training step ({train['micro_batch']} x {train['seq_length']} tokens, forward + backward + AdamW): "
          f"{train['step_seconds']:.3f} s. The evaluation: {total['ours_wall_seconds']:.2f} s wall for "
          f"{total['forward_batches']} forward batches; as many training steps: "
          f"{train['seconds_of_as_many_steps']:.2f} s; the evaluation costs {train['evaluation_in_steps']:.1f} "
          "training steps")


def markdown(recorded: dict) -> str:
    """The figures docs/evaluation.md quotes, as a table and one line per config (tests/unit/test_docs_figures.py
    checks the page against the JSON)."""
    lines = ["| config (export) | task | docs | tokens | ours tok/s | HFLM tok/s | ours / HFLM | ours wall s "
             "| HFLM wall s |", "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for result in recorded["results"]:
        for task, row in {**result["tasks"], "all four": result["total"]}.items():
            lines.append(f"| {result['config']} ({result['export']}) | {task} | {row.get('documents', '')} | "
                         f"{row['tokens']} | {row['ours_tokens_per_s']:.0f} | {row['hflm_tokens_per_s']:.0f} | "
                         f"{row['ours_over_hflm']:.2f}x | {row['ours_wall_seconds']:.2f} | "
                         f"{row['hflm_wall_seconds']:.2f} |")
    lines.append("")
    for result in recorded["results"]:
        train, total = result["training"], result["total"]
        lines.append(f"- {result['config']}: a training step ({train['micro_batch']} x {train['seq_length']} tokens) "
                     f"takes {train['step_seconds']:.3f} s; the evaluation, {total['ours_wall_seconds']:.2f} s for "
                     f"{total['forward_batches']} forward batches, against as many training steps: "
                     f"{train['seconds_of_as_many_steps']:.2f} s; it costs {train['evaluation_in_steps']:.1f} "
                     "training steps.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny.yml", "tiny_structmoe.yml"])
    parser.add_argument("--limit", type=int, default=40, help="documents a task (the local tasks hold 37-40)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--markdown", type=Path, default=None, metavar="JSON",
                        help="print the docs' table of a recorded JSON, measuring nothing")
    opts = parser.parse_args()
    if opts.markdown:
        print(markdown(json.loads(opts.markdown.read_text())))
        return
    if opts.threads:
        torch.set_num_threads(opts.threads)
    keep_freed_memory_in_process()
    quiet_lm_eval()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    manager = task_manager(TASKS, [TASKS_DIR])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in opts.configs:
            result = {"batch_size": opts.batch_size,
                      **bench_config(config, opts, manager, Path(tmp) / config.removesuffix(".yml"))}
            report(result)
            results.append(result)
    if opts.json:
        lm_eval_version = lm_eval_module("lm_eval").__version__
        machine = {"torch": torch.__version__, "lm_eval": lm_eval_version, "threads": torch.get_num_threads(),
                   "processor": platform.processor() or platform.machine(), "device": "cpu"}
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine, "limit": opts.limit,
                                         "repeats": opts.repeats, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
