"""One GPU check of the whole project: tests marked cuda, numerics, speed, Hugging Face side by side, memory,
LSH-MoE, Remix-DiT and FSDP2 steps, written as JSON + Markdown + PNG.

    python benchmarks/gpu_check.py                   # on a GPU node: ~6 minutes on one H100
    python benchmarks/gpu_check.py --cpu             # the same steps on the CPU at toy sizes (CI, < 60 s)
    python benchmarks/gpu_check.py --render docs/results/gpu_check/gpu_check.json   # Markdown + PNG again

Why one script: a lent GPU is precious and bare (no package registry), so every GPU-only path is exercised
in one run, each section wrapped so that a failure (an exception, an OOM) is recorded as
{"status": "error", "error": "<one line>"} and the run goes on; the JSON is rewritten after every section,
so a killed run keeps what it had. Without CUDA (or with --cpu) the same code runs at toy sizes, so the
script never meets its first GPU untested. On a bare node, `bash benchmarks/gpu_wheels.sh` (on a machine
with PyPI) fills `.gpu_wheels/`, which this script installs with pip --no-index when pydantic is missing.
See docs/gpu_check.md for what each section measures and the targets.

Shape legend: B batch (micro-batch), S sequence, N tokens (B x S), D hidden, V vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
WHEELS = REPO / ".gpu_wheels"
DEFAULT_OUT = REPO / "docs" / "results" / "gpu_check"
SECTIONS = ("cuda_tests", "numerics", "speed", "hf", "memory", "lsh_step", "dit_step", "fsdp2")
GIB = 2**30

for _path in (REPO, BENCHMARKS):  # run as a script or imported by the tests: the repo's package and benchmarks
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


# -- sizes ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU toy run: only sizes, steps and budgets."""

    toy: bool
    numerics_steps: int
    numerics_overrides: tuple[str, ...]
    speed_overrides: tuple[str, ...]  # on top of the 125M configs
    structmoe_overrides: tuple[str, ...]  # and on top of the StructMoE config only
    micro_batches: tuple[int, ...]
    warmup_steps: int
    timed_steps: int
    hf: dict[str, int]
    loss_tokens: int
    loss_hidden: int | None  # None: the 410M config's
    loss_vocab: int | None
    loss_chunk: int | None  # None: the config's loss_chunk_tokens
    small_lm: dict[str, int]  # the LSH and FSDP2 models
    budgets_s: dict[str, float] = field(default_factory=dict)


def gpu_sizes() -> Sizes:
    return Sizes(
        toy=False, numerics_steps=20, numerics_overrides=(),
        speed_overrides=(), structmoe_overrides=(),
        micro_batches=(1, 2, 4, 8, 16, 32), warmup_steps=3, timed_steps=8,
        hf={"hidden": 768, "layers": 12, "heads": 12, "batch": 4, "seq": 2048, "vocab": 32000, "lores": 32,
            "lore_rank": 64, "repeats": 5, "warmup": 2},
        loss_tokens=8 * 2048, loss_hidden=None, loss_vocab=None, loss_chunk=None,
        small_lm={"hidden": 256, "layers": 2, "heads": 4, "seq": 512, "batch": 8, "vocab": 8192, "experts": 8},
        budgets_s={"cuda_tests": 90, "numerics": 75, "speed": 140, "hf": 75, "memory": 30, "lsh_step": 20,
                   "dit_step": 30, "fsdp2": 30},
    )


def toy_sizes() -> Sizes:
    toy_model = ("--num_layers", "2", "--hidden_size", "64", "--num_attention_heads", "4", "--seq_length", "64",
                 "--max_position_embeddings", "64")
    return Sizes(
        toy=True, numerics_steps=3,
        numerics_overrides=(*toy_model, "--train_micro_batch_size_per_gpu", "2", "--lore_num_experts", "8",
                            "--lore_rank", "4"),
        speed_overrides=(*toy_model, "--vocab_size", "512", "--loss_chunk_tokens", "64"),
        structmoe_overrides=("--lore_num_experts", "8", "--lore_rank", "4"),
        micro_batches=(1, 2), warmup_steps=1, timed_steps=2,
        hf={"hidden": 96, "layers": 2, "heads": 4, "batch": 2, "seq": 32, "vocab": 512, "lores": 4, "lore_rank": 4,
            "repeats": 2, "warmup": 1},
        loss_tokens=2048, loss_hidden=64, loss_vocab=16384, loss_chunk=256,
        small_lm={"hidden": 64, "layers": 2, "heads": 4, "seq": 64, "batch": 2, "vocab": 512, "experts": 4},
        budgets_s={name: 60.0 for name in SECTIONS},
    )


# -- wheels for a bare node -------------------------------------------------------------------------------------

def install_wheels(folder: Path = WHEELS, mode: str = "auto") -> str:
    """Makes the project importable on a node without a package registry: pip-installs the wheels of
    benchmarks/gpu_wheels.sh (no index, no deps); where pip cannot, unpacks them into folder/site and puts
    that on sys.path and PYTHONPATH (wheels are zip files laid out as site-packages). Returns what it did."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if mode == "no" or not wheels:
        return "not needed" if mode != "no" else "off"
    if mode == "auto" and importlib.util.find_spec("pydantic") is not None:
        return "not needed"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
               *map(str, wheels)]
    done = subprocess.run(command, capture_output=True, text=True)
    importlib.invalidate_caches()
    if done.returncode == 0:
        return f"pip installed {len(wheels)} wheels from {folder}"
    site = folder / "site"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    return f"unpacked {len(wheels)} wheels into {site} (pip failed: {first_line(done.stderr)})"


# -- small pure helpers (unit-tested) ---------------------------------------------------------------------------

def first_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line[:limit]


def error_line(err: BaseException) -> str:
    return first_line(f"{type(err).__name__}: {err}")


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ('2 passed, 1 skipped, 3 deselected in 4.2s')."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0, "xfailed": 0, "xpassed": 0}
    lines = [line for line in text.splitlines() if re.search(r"\bin [\d.]+s\b", line)]
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                                   lines[-1] if lines else ""):
        counts["errors" if word.startswith("error") else word] += int(number)
    return counts


def parse_junit(path: Path) -> dict[str, int]:
    """passed/failed/skipped/errors from a pytest --junitxml report."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "skipped": total["skipped"], "errors": total["errors"]}


def sync_location(stack: list[traceback.FrameSummary], package_dir: str) -> str:
    """Where a host sync comes from: the innermost frame inside the megatron package, as 'path:line (function)'
    relative to the repo; 'outside megatron' when no frame is (the caller's own code)."""
    package_dir = os.path.normpath(package_dir)
    for frame in reversed(stack):
        filename = os.path.normpath(frame.filename)
        if filename.startswith(package_dir + os.sep):
            relative = os.path.relpath(filename, os.path.dirname(package_dir)).replace(os.sep, "/")
            return f"{relative}:{frame.lineno} ({frame.name})"
    return "outside megatron"


def group_sync_locations(stacks: list[list[traceback.FrameSummary]], package_dir: str) -> dict[str, int]:
    """Count of host syncs per location, most frequent first."""
    counts = Counter(sync_location(stack, package_dir) for stack in stacks)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def verdict(value: float | None, op: str, goal: float | None) -> bool | None:
    """Whether a measured value meets its goal; None when either is absent (a failed or skipped section)."""
    if value is None or goal is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if op == ">=":
        return value >= goal
    if op == "<=":
        return value <= goal
    raise ValueError(f"unknown comparison {op!r}")


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def pick_micro_batch(estimates_bytes: dict[int, int], capacity_bytes: float) -> int:
    """The largest candidate micro-batch whose estimated peak fits; the smallest when none does."""
    fitting = [mb for mb, need in estimates_bytes.items() if need <= capacity_bytes]
    return max(fitting) if fitting else min(estimates_bytes)


# -- targets ----------------------------------------------------------------------------------------------------

# (target name, section, path inside the section's JSON, comparison, goal)
TARGETS: tuple[tuple[str, str, tuple[str, ...], str, float], ...] = (
    ("cuda tests: failed + errors", "cuda_tests", ("failed_or_errors",), "<=", 0),
    ("numerics: fp32 device vs CPU, step 1 (relative)", "numerics", ("fp32_vs_cpu_first",), "<=", 1e-5),
    ("numerics: fp32 device vs CPU, last step (relative)", "numerics", ("fp32_vs_cpu_last",), "<=", 1e-3),
    ("numerics: bf16 vs fp32, last step (relative)", "numerics", ("bf16_vs_fp32_last",), "<=", 0.02),
    ("numerics: every moe_impl vs native, bf16 (max relative)", "numerics", ("impls_max_relative",), "<=", 0.02),
    ("speed: ours MoE / Mixtral grouped_mm (tokens/s)", "hf", ("ratios", "moe_vs_mixtral_grouped_mm"), ">=", 1.3),
    ("speed: ours MoE / Mixtral eager (tokens/s)", "hf", ("ratios", "moe_vs_mixtral_eager"), ">=", 2.0),
    ("speed: StructMoE step / plain MoE step (time)", "hf", ("ratios", "structmoe_step_vs_moe_step"), "<=", 1.15),
    ("memory: chunked / full loss peak", "memory", ("loss", "chunked_vs_full_peak"), "<=", 0.25),
    ("memory: chunked vs full loss value (relative)", "memory", ("loss", "loss_relative_difference"), "<=", 1e-3),
    ("lsh_step: finite loss and gradients", "lsh_step", ("finite",), ">=", 1),
    ("dit_step: finite loss", "dit_step", ("finite",), ">=", 1),
    ("fsdp2: finite losses, sharded", "fsdp2", ("finite_and_sharded",), ">=", 1),
    ("fsdp2: asynchronous checkpoint of the sharded state", "fsdp2", ("async_save",), ">=", 1),
    ("speed: dense MFU, eager", "speed", ("models", "dense", "eager", "mfu"), ">=", 0.35),
    ("speed: MoE 8x MFU, eager", "speed", ("models", "MoE 8x", "eager", "mfu"), ">=", 0.25),
    ("speed: StructMoE MFU, eager", "speed", ("models", "StructMoE 125M", "eager", "mfu"), ">=", 0.25),
    # top-k routing on torch's fused grouped_mm: kernels.py lists no host sync left in the MoE layer there
    ("speed: host syncs in the MoE layer per step, MoE 8x", "speed", ("models", "MoE 8x", "host_syncs",
                                                                     "in_moe_layer"), "<=", 0),
    ("speed: host syncs in the MoE layer per step, StructMoE", "speed", ("models", "StructMoE 125M", "host_syncs",
                                                                        "in_moe_layer"), "<=", 0),
)


def lookup(section: dict | None, path: tuple[str, ...]) -> Any:
    node: Any = section
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def evaluate_targets(sections: dict[str, dict]) -> list[dict]:
    """Each target with its value (None where its section failed or did not report it) and whether it is met."""
    rows = []
    for name, section, path, op, goal in TARGETS:
        value = lookup(sections.get(section), path)
        if isinstance(value, bool):
            value = int(value)
        value = value if isinstance(value, (int, float)) else None
        rows.append({"name": name, "section": section, "value": value, "op": op, "target": goal,
                     "met": verdict(value, op, goal)})
    return rows


# -- Markdown and PNG (from the JSON alone) ---------------------------------------------------------------------

def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def section_summary(name: str, section: dict) -> str:
    """One line of the section's main numbers."""
    if section.get("status") != "ok":
        return section.get("error") or section.get("reason") or ""
    if name == "cuda_tests":
        return f"{section['passed']} passed, {section['failed']} failed, {section['skipped']} skipped"
    if name == "numerics":
        impls = ", ".join(section.get("impls", {}))
        return (f"{section['steps']} steps; fp32 device/CPU step 1 {fmt(section['fp32_vs_cpu_first'])}, last "
                f"{fmt(section['fp32_vs_cpu_last'])}; bf16/fp32 {fmt(section['bf16_vs_fp32_last'])}; impls: {impls}")
    if name == "speed":
        return "; ".join(f"{m}: {fmt(r.get('eager', {}).get('tokens_per_s'))} tok/s" for m, r in
                         section.get("models", {}).items())
    if name == "hf":
        return "; ".join(f"{k} {fmt(v)}" for k, v in section.get("ratios", {}).items())
    if name == "memory":
        loss, est = section.get("loss", {}), section.get("estimator", {})
        return (f"loss peak chunked/full {fmt(loss.get('chunked_vs_full_peak'))}; estimator measured/estimated "
                f"{fmt(est.get('measured_vs_estimated'))}")
    if name == "lsh_step":
        return f"loss {fmt(section.get('loss'))}, dispatchers {section.get('dispatchers')}"
    if name == "dit_step":
        return f"loss {fmt(section.get('loss'))} on {section.get('dataset')}"
    if name == "fsdp2":
        return f"{section.get('backend')}, losses {', '.join(fmt(v) for v in section.get('losses', []))}"
    return ""


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def render_markdown(result: dict) -> str:
    """The report as Markdown, a function of the JSON alone (docs are regenerated from the committed JSON)."""
    env = result.get("environment", {})
    sections = result.get("sections", {})
    lines = [f"# GPU check: {env.get('device', 'unknown device')}", ""]
    lines.append(f"Mode {result.get('mode')}; torch {env.get('torch')}, CUDA {env.get('cuda')}, transformers "
                 f"{env.get('transformers')}, driver {env.get('driver')}, Python {env.get('python')}; "
                 f"started {result.get('started')}, {fmt(result.get('seconds'))} s; "
                 f"`{result.get('command')}`.")
    lines += ["", "## Sections", ""]
    rows = [[name, s.get("status", "?"), fmt(s.get("seconds")), section_summary(name, s)]
            for name, s in sections.items()]
    lines += table(["section", "status", "seconds", "summary"], rows)
    speed = sections.get("speed", {})
    if speed.get("models"):
        lines += ["", f"## Speed: shipped configs, {speed.get('precision')} autocast, sequence {speed.get('seq')}", ""]
        rows = []
        for model, r in speed["models"].items():
            syncs = r.get("host_syncs")
            sync_text = syncs if isinstance(syncs, str) else fmt((syncs or {}).get("per_step"))
            for mode in ("eager", "compiled"):
                m = r.get(mode) or {}
                if m.get("skipped") or m.get("error"):
                    rows.append([model, fmt(r.get("micro_batch")), mode, m.get("skipped") or m.get("error"),
                                 "", "", ""])
                    continue
                rows.append([model, fmt(r.get("micro_batch")), mode, fmt(m.get("tokens_per_s")),
                             fmt(m.get("mfu")), fmt(m.get("peak_gib")), sync_text if mode == "eager" else ""])
        lines += table(["model", "micro-batch", "torch.compile", "tokens/s", "MFU", "peak GiB", "host syncs/step"],
                       rows)
        locations = {m: r["host_syncs"]["locations"] for m, r in speed["models"].items()
                     if isinstance(r.get("host_syncs"), dict) and r["host_syncs"].get("locations")}
        if locations:
            lines += ["", "Host syncs per step by location (innermost frame in megatron/):", ""]
            lines += table(["model", "location", "count"],
                           [[m, loc, fmt(n)] for m, locs in locations.items() for loc, n in locs.items()])
    hf = sections.get("hf", {})
    if hf.get("models"):
        lines += ["", f"## Ours vs Hugging Face: {hf.get('shape')}", ""]
        lines += table(["model", "params (M)", "step (s)", "tokens/s", "MFU"],
                       [[m, fmt(r.get("params_m")), fmt(r.get("step_s")), r.get("error") or fmt(r.get("tokens_per_s")),
                         fmt(r.get("mfu"))] for m, r in hf["models"].items()])
    lines += ["", "## Targets", ""]
    rows = []
    for t in result.get("targets", []):
        state = {True: "met", False: "MISSED", None: "absent"}[t.get("met")]
        rows.append([t["name"], fmt(t.get("value")), f"{t['op']} {fmt(t['target'])}", state])
    lines += table(["target", "value", "goal", "verdict"], rows)
    return "\n".join(lines) + "\n"


def render_png(result: dict, path: Path) -> bool:
    """Tokens/s and MFU per model, ours (blue) vs Hugging Face (orange); False when there is nothing to plot."""
    bars = []  # (label, tokens/s, mfu, is_hf)
    for model, r in result.get("sections", {}).get("speed", {}).get("models", {}).items():
        for mode in ("eager", "compiled"):
            m = r.get(mode) or {}
            if m.get("tokens_per_s"):
                bars.append((f"{model} ({mode})", m["tokens_per_s"], m.get("mfu") or 0.0, False))
    for model, r in result.get("sections", {}).get("hf", {}).get("models", {}).items():
        if r.get("tokens_per_s"):
            bars.append((f"[HF side by side] {model}", r["tokens_per_s"], r.get("mfu") or 0.0, model.startswith("HF")))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * max(len(bars), 4) + 1.5), sharey=True)
    labels = [b[0] for b in bars]
    colors = ["tab:orange" if b[3] else "tab:blue" for b in bars]
    for ax, values, title in ((axes[0], [b[1] for b in bars], "tokens/s"),
                              (axes[1], [100 * b[2] for b in bars], "MFU (%)")):
        ax.barh(range(len(bars)), values, color=colors)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(bars)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"{result.get('environment', {}).get('device', '')} ({result.get('mode')}): ours blue, HF orange")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return bool(bars)


def write_reports(result: dict, out: Path) -> None:
    (out / "gpu_check.md").write_text(render_markdown(result))
    render_png(result, out / "gpu_check.png")


# -- running sections -------------------------------------------------------------------------------------------

class Context:
    """What every section needs: the device, sizes, the output folder and the deadline of the section."""

    def __init__(self, device, sizes: Sizes, out: Path, work: Path, opts: argparse.Namespace):
        self.device, self.sizes, self.out, self.work, self.opts = device, sizes, out, work, opts
        self.deadline = math.inf
        self.results: dict[str, dict] = {}
        self.cuda_tests: subprocess.Popen | None = None  # started early in the toy run

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @functools.cached_property
    def peak(self) -> tuple[float, str]:
        """bf16 peak TFLOP/s of the device and its source (on a CPU a matmul probe: measured once)."""
        from megatron.sizing.flops import peak_tflops

        return peak_tflops(self.device, "bfloat16")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def synchronize(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()


@contextlib.contextmanager
def quiet(log_path: Path) -> Iterator[None]:
    """A training run's console output (logging, tqdm) into a file; logging back to warnings-only afterwards."""
    import logging

    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            yield
        finally:
            logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)


def training_losses(ctx: Context, name: str, config: str, overrides: list[str]) -> dict[int, float]:
    """Trains `config` through train.py's run() into a fresh folder; returns the losses of its metrics.jsonl."""
    import train

    folder = ctx.work / name
    folder.mkdir(parents=True, exist_ok=True)
    argv = [config, "--log_interval", "1", "--eval_interval", "0", "--save", "null", "--load", "null",
            "--log_dir", str(folder / "logs"), "--tensorboard_dir", "null",
            "--peak_tflops", "1000", *overrides]  # a stated peak: no matmul probe per run (MFU is not read here)
    try:
        with quiet(folder / "train.log"):
            train.run(argv)
    except Exception as err:
        raise RuntimeError(f"{name}: {error_line(err)} (log: {folder / 'train.log'})") from err
    records = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# 1. tests marked cuda

def start_cuda_tests(ctx: Context) -> subprocess.Popen:
    """`pytest -m cuda` started, its output into cuda_tests.log and a JUnit XML report beside it (the repo's addopts
    add a second -q, which drops pytest's summary line)."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    if ctx.sizes.toy:  # collecting the whole suite takes 20 s on 2 cores: only the files that mark tests cuda
        command += sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                          if "mark.cuda" in p.read_text())
    report = ctx.out / "cuda_tests.xml"
    report.unlink(missing_ok=True)
    with open(ctx.out / "cuda_tests.log", "w") as log:
        process = subprocess.Popen([*command, f"--junitxml={report}"], cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT)
    process.command = shlex.join(command[1:])  # type: ignore[attr-defined]
    return process


def section_cuda_tests(ctx: Context) -> dict:
    """The tests marked cuda, in a subprocess; on the CPU they skip, which proves the plumbing. The toy run
    starts it before the other sections and collects it last (the subprocess mostly imports and collects)."""
    background = ctx.cuda_tests is not None
    process = ctx.cuda_tests or start_cuda_tests(ctx)
    try:
        returncode = process.wait(timeout=max(ctx.left(), 10))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    output = (ctx.out / "cuda_tests.log").read_text()
    report = ctx.out / "cuda_tests.xml"
    counts = parse_junit(report) if report.is_file() else parse_pytest_summary(output)
    if returncode not in (0, 1, 5):  # 1: tests failed (counted); 5: none collected
        raise RuntimeError(f"pytest exited {returncode}: {first_line(output[-300:])}")
    return {**counts, "returncode": returncode, "command": process.command, "background": background,
            "failed_or_errors": counts["failed"] + counts["errors"]}


# 2. numerics

def available_moe_impls(cuda: bool) -> tuple[list[str], dict[str, str]]:
    """native always; grouped_gemm and megablocks where grouped_gemm's gmm imports (both run on it)."""
    from megatron.model.moe.kernels import MOE_IMPLS, load_gmm

    built, skipped = ["native"], {}
    for impl in MOE_IMPLS:
        if impl in ("auto", "native"):
            continue
        if not cuda:
            skipped[impl] = "needs CUDA"
        elif load_gmm() is None:
            skipped[impl] = "grouped_gemm does not import"
        else:
            built.append(impl)
    return built, skipped


def section_numerics(ctx: Context) -> dict:
    """The tiny StructMoE config: fp32 on the device vs the CPU, bf16 vs fp32, every buildable moe_impl."""
    import torch

    config = "configs/tiny_structmoe.yml"
    steps = ctx.sizes.numerics_steps
    base = ["--train_iters", str(steps), "--torch_compile", '"off"', *ctx.sizes.numerics_overrides]
    device = ["--device", ctx.device.type]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        fp32 = training_losses(ctx, "numerics_fp32_device", config, [*base, *device])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    fp32_cpu = training_losses(ctx, "numerics_fp32_cpu", config, [*base, "--device", "cpu"])
    bf16_args = [*base, *device, "--precision", "bfloat16"]
    impls, skipped = available_moe_impls(ctx.cuda)
    losses = {"fp32_device": fp32, "fp32_cpu": fp32_cpu}
    for impl in impls:
        losses[f"bf16_{impl}"] = training_losses(ctx, f"numerics_bf16_{impl}", config,
                                                 [*bf16_args, "--moe_impl", impl])
    last = max(fp32)
    native = losses["bf16_native"]
    impl_diffs = {impl: max(relative_difference(losses[f"bf16_{impl}"][s], native[s]) for s in native)
                  for impl in impls}
    for name, run in losses.items():
        if sorted(run) != list(range(1, steps + 1)) or not all(math.isfinite(v) for v in run.values()):
            raise RuntimeError(f"{name}: expected finite losses at steps 1..{steps}, got {run}")
    return {
        "steps": steps, "config": config,
        "losses": {name: [run[s] for s in sorted(run)] for name, run in losses.items()},
        "fp32_vs_cpu_first": relative_difference(fp32[1], fp32_cpu[1]),
        "fp32_vs_cpu_last": relative_difference(fp32[last], fp32_cpu[last]),
        "bf16_vs_fp32_last": relative_difference(native[last], fp32[last]),
        "impls": impl_diffs, "impls_skipped": skipped,
        "impls_max_relative": max(impl_diffs.values()),
        "note": "CPU vs CPU (trivially equal)" if not ctx.cuda else "device vs CPU, TF32 off",
    }


# 3. speed

SPEED_MODELS = {  # name: (config, extra overrides)
    "StructMoE 125M": ("configs/125M_structmoe.yml", ()),
    "MoE matched": ("configs/125M_moe_matched.yml", ()),
    "MoE 8x": ("configs/125M_moe_8x.yml", ()),
    "dense": ("configs/125M_moe_8x.yml", ("--moe_num_experts", "1")),
}


def speed_args(ctx: Context, name: str):
    from megatron.config import load_config

    config, extra = SPEED_MODELS[name]
    overrides = [*ctx.sizes.speed_overrides, *extra]
    if "structmoe" in config:
        overrides += ctx.sizes.structmoe_overrides
    return load_config([config], overrides)


def build_model(args, device):
    """The config's model as train.py builds it (megatron/model/build.py), made on the device directly."""
    import torch

    from megatron.data.tokenizer import vocab_size_of
    from megatron.model.build import build_gpt

    args.device = device.type  # moe_impl auto resolves for this device
    with torch.device(device):
        return build_gpt(args, vocab_size_of(args))


def estimated_bytes(args) -> int:
    """The estimator's peak on one GPU (no sharding) plus what DDP/autocast hold beyond it."""
    from megatron.sizing.memory import ddp_overhead_bytes, estimate_memory

    return estimate_memory(args, 1, 1, 0).peak_bytes() + ddp_overhead_bytes(args, 1, 1, 0)


def capacity_bytes(ctx: Context) -> float:
    import torch

    if ctx.cuda:
        return 0.85 * torch.cuda.get_device_properties(ctx.device).total_memory
    return 0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def lm_step_fn(ctx: Context, model, args, tokens_BS1) -> Callable[[], None]:
    """One optimizer step as the trainer's loss has it (LM loss, chunked as configured, plus the weighted MoE
    aux losses), bf16 autocast, fused AdamW; no host reads of its own."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    coeffs = {"load_balancing_loss": args.moe_loss_coeff, "z_loss": args.moe_zloss_coeff,
              "lore_balancing_loss": args.lore_loss_coeff}

    def step() -> None:
        with ctx.autocast():
            loss, moe_aux = model(tokens_BS1[:, :-1], tokens_BS1[:, 1:], args.loss_chunk_tokens)
            for name, coeff in coeffs.items():
                if coeff and moe_aux:
                    loss = loss + coeff * sum(getattr(aux, name) for aux in moe_aux)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(ctx: Context, step: Callable[[], Any]) -> float:
    ctx.synchronize()
    start = time.perf_counter()
    step()
    ctx.synchronize()
    return time.perf_counter() - start


def count_host_syncs(ctx: Context, step: Callable[[], None], package_dir: str | None = None) -> dict:
    """One step under torch.cuda.set_sync_debug_mode("warn"), each synchronizing call located by the
    innermost frame in the megatron package (`package_dir`) of the Python stack at the time of its warning.
    "outside megatron" counts the rest: the autograd engine replays backward's warnings at the `backward()`
    call (this script's), and the optimizer step."""
    import torch

    if package_dir is None:
        import megatron

        package_dir = os.path.dirname(megatron.__file__)
    stacks: list[list[traceback.FrameSummary]] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message).lower():
            stacks.append(traceback.extract_stack()[:-1])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ctx.synchronize()
    locations = group_sync_locations(stacks, package_dir)
    in_moe_layer = sum(count for where, count in locations.items() if where.startswith("megatron/model/moe/"))
    return {"per_step": sum(locations.values()), "in_moe_layer": in_moe_layer, "locations": locations}


def measure_model(ctx: Context, args, micro_batch: int, compiled: bool, peak_tflops: float) -> dict:
    """Warm-up, then the median of timed steps; peak memory and MFU. Raises the OOM for the caller."""
    import torch

    from megatron.model.compile import compile_regions
    from megatron.sizing.flops import flops_per_token

    args.train_micro_batch_size_per_gpu = micro_batch
    torch.manual_seed(0)
    model = build_model(args, ctx.device).train()
    if compiled:
        compile_regions(model)
    vocab = model.cfg.vocab_size
    tokens_BS1 = torch.randint(vocab, (micro_batch, args.seq_length + 1), device=ctx.device)
    step = lm_step_fn(ctx, model, args, tokens_BS1)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    first = timed(ctx, step)
    for _ in range(ctx.sizes.warmup_steps - 1):
        timed(ctx, step)
    times = [timed(ctx, step) for _ in range(ctx.sizes.timed_steps)]
    median = statistics.median(times)
    tokens = micro_batch * args.seq_length
    flops = flops_per_token(model, args.seq_length).training
    result = {"step_s": median, "first_step_s": first, "tokens_per_s": tokens / median,
              "mfu": flops * tokens / median / (peak_tflops * 1e12), "flops_per_token": flops,
              "peak_gib": torch.cuda.max_memory_allocated(ctx.device) / GIB if ctx.cuda else None}
    if not compiled:
        result["host_syncs"] = count_host_syncs(ctx, step) if ctx.cuda else "n/a"
    del model, step, tokens_BS1
    ctx.free()
    return result


COMPILE_ALLOWANCE_S = 45.0  # what regional compilation of one model is allowed before its compiled run starts


def section_speed(ctx: Context) -> dict:
    """The shipped 125M configs at the largest micro-batch the estimator fits: every model eager first, then
    compiled while the section's budget lasts (a compiled run is skipped where it would not fit)."""
    import torch

    peak, source = ctx.peak
    compile_setting = ctx.opts.compile if ctx.opts.compile != "auto" else ("on" if ctx.cuda else "off")
    models: dict[str, dict[str, Any]] = {}
    configs, seq = {}, None
    for name in SPEED_MODELS:
        args = configs[name] = speed_args(ctx, name)
        seq = args.seq_length
        estimates = {}
        for mb in ctx.sizes.micro_batches:
            args.train_micro_batch_size_per_gpu = mb
            estimates[mb] = estimated_bytes(args)
        models[name] = {"config": SPEED_MODELS[name][0], "overrides": list(SPEED_MODELS[name][1]),
                        "checkpoint_activations": args.checkpoint_activations,
                        "estimates_gib": {str(k): v / GIB for k, v in estimates.items()},
                        "micro_batch": pick_micro_batch(estimates, capacity_bytes(ctx))}
    steps = ctx.sizes.warmup_steps + ctx.sizes.timed_steps
    for mode in ("eager", "compiled"):
        for name, row in models.items():
            if mode == "compiled" and compile_setting == "off":
                row[mode] = {"skipped": "--compile off" if ctx.cuda else
                             "torch.compile off on the CPU: its compile time does not pay for a toy run "
                             "(--compile on forces it)"}
                continue
            eager_s = (row.get("eager") or {}).get("step_s", 0.0)
            needed = 5.0 if mode == "eager" else COMPILE_ALLOWANCE_S * ctx.cuda + eager_s * steps
            if ctx.left() < needed:
                row[mode] = {"skipped": f"section budget: {ctx.left():.0f} s left, ~{needed:.0f} s needed"}
                continue
            mb = row["micro_batch"]
            while True:
                try:
                    measured = measure_model(ctx, configs[name], mb, mode == "compiled", peak)
                    break
                except torch.cuda.OutOfMemoryError:
                    ctx.free()
                    if mb == 1:
                        raise
                    mb //= 2  # the estimate was too optimistic: halve
                    row["oom_halved_to"] = mb
            if mb != row["micro_batch"]:  # keep eager and compiled at the same micro-batch
                row["micro_batch"] = mb
            if "host_syncs" in measured:
                row["host_syncs"] = measured.pop("host_syncs")
            row[mode] = measured
    for name, row in models.items():
        args = configs[name]
        args.train_micro_batch_size_per_gpu = row["micro_batch"]
        row["estimated_gib"] = estimated_bytes(args) / GIB
    return {"models": models, "precision": "bfloat16", "seq": seq, "peak_tflops": peak, "peak_source": source,
            "capacity_gib": capacity_bytes(ctx) / GIB, "compile": compile_setting,
            "timing": f"{ctx.sizes.warmup_steps} warm-up + median of {ctx.sizes.timed_steps} steps"}


# 4. Hugging Face side by side

def section_hf(ctx: Context) -> dict:
    """benchmarks/train_step.py's models (matched shapes and FLOPs), bf16 autocast on this device, interleaved."""
    import torch
    import train_step

    from megatron.sizing.flops import flops_per_token

    opts = SimpleNamespace(**ctx.sizes.hf)
    builders = {
        "ours dense": lambda: (train_step.ours(opts, False, False), True),
        "HF GPTNeoXForCausalLM": lambda: (train_step.hf_gpt_neox(opts), False),
        "ours MoE": lambda: (train_step.ours(opts, True, False), True),
        "HF Mixtral, eager experts": lambda: (train_step.hf_mixtral(opts, "eager"), False),
        "HF Mixtral, grouped_mm experts": lambda: (train_step.hf_mixtral(opts, "grouped_mm"), False),
        "ours StructMoE": lambda: (train_step.ours(opts, True, True), True),
    }
    flops_twin = {"HF GPTNeoXForCausalLM": "ours dense", "HF Mixtral, eager experts": "ours MoE",
                  "HF Mixtral, grouped_mm experts": "ours MoE"}
    torch.manual_seed(0)
    tokens_BS1 = torch.randint(opts.vocab, (opts.batch, opts.seq + 1), device=ctx.device)
    steps, rows, flops = {}, {}, {}
    for name, build in builders.items():
        try:
            with torch.device(ctx.device):
                model, is_ours = build()
            model.train()
            rows[name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
            if is_ours:
                flops[name] = flops_per_token(model, opts.seq).training
            plain = train_step.step_fn(model, tokens_BS1, is_ours)

            def step(plain=plain) -> None:
                with ctx.autocast():
                    plain()

            for _ in range(opts.warmup):
                timed(ctx, step)
            steps[name] = step
        except Exception as err:  # one model that cannot be built or run here does not lose the others
            rows[name] = {"error": error_line(err)}
            ctx.free()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(opts.repeats):
        for name, step in steps.items():
            times[name].append(timed(ctx, step))
    peak, _ = ctx.peak
    tokens = opts.batch * opts.seq
    for name, t in times.items():
        median = statistics.median(t)
        twin = flops.get(name) or flops.get(flops_twin.get(name, ""))
        rows[name].update({"step_s": median, "tokens_per_s": tokens / median,
                           "mfu": twin * tokens / median / (peak * 1e12) if twin else None})
    speed = {name: r.get("tokens_per_s") for name, r in rows.items()}

    def ratio(a: str, b: str, inverse: bool = False) -> float | None:
        if not speed.get(a) or not speed.get(b):
            return None
        return speed[b] / speed[a] if inverse else speed[a] / speed[b]

    del steps
    ctx.free()
    return {
        "shape": (f"d={opts.hidden}, {opts.layers} layers, {opts.heads} heads, {opts.batch}x{opts.seq} tokens, "
                  f"vocab {opts.vocab}, 8 experts top-1 in every layer, {opts.lores} LoREs of rank {opts.lore_rank}, "
                  f"bf16 autocast, median of {opts.repeats} interleaved repeats"),
        "models": rows,
        "ratios": {
            "moe_vs_mixtral_grouped_mm": ratio("ours MoE", "HF Mixtral, grouped_mm experts"),
            "moe_vs_mixtral_eager": ratio("ours MoE", "HF Mixtral, eager experts"),
            "dense_vs_gpt_neox": ratio("ours dense", "HF GPTNeoXForCausalLM"),
            "structmoe_step_vs_moe_step": ratio("ours MoE", "ours StructMoE"),  # time ratio = inverse speed ratio
        },
    }


# 5. memory

def cuda_loss_peak(device, tokens: int, hidden: int, vocab: int, chunk: int, dtype: str) -> dict:
    """benchmarks/loss_memory.py's measurement on a GPU: the loss's own peak above what is held before."""
    import torch

    from megatron.model.loss import lm_loss

    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    h_ND = torch.empty(tokens, hidden, dtype=torch_dtype, device=device).normal_(0, 0.02).requires_grad_()
    w_VD = torch.empty(vocab, hidden, dtype=torch_dtype, device=device).normal_(0, 0.02).requires_grad_()
    w_VD.grad = torch.zeros_like(w_VD)
    targets_N = torch.randint(vocab, (tokens,), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    loss = lm_loss(h_ND, w_VD, targets_N, chunk)
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    value = loss.item()
    del h_ND, w_VD, targets_N, loss
    torch.cuda.empty_cache()
    return {"loss": value, "peak_mib": peak / 2**20}


def section_memory(ctx: Context) -> dict:
    """The chunked loss against the full logits on the 410M head; the estimator against a measured peak."""
    from concurrent.futures import ThreadPoolExecutor

    import loss_memory

    from megatron.config import load_config
    from megatron.data.tokenizer import vocab_size_of

    args = load_config(["configs/410M_structmoe.yml"])
    hidden = ctx.sizes.loss_hidden or args.hidden_size
    vocab = ctx.sizes.loss_vocab or vocab_size_of(args)
    chunk = ctx.sizes.loss_chunk or args.loss_chunk_tokens or 1024
    tokens = ctx.sizes.loss_tokens
    if ctx.cuda:
        dtype, method = "bfloat16", "torch.cuda.max_memory_allocated, in process"
        full = cuda_loss_peak(ctx.device, tokens, hidden, vocab, 0, dtype)
        chunked = cuda_loss_peak(ctx.device, tokens, hidden, vocab, chunk, dtype)
    else:  # ru_maxrss in fresh processes (benchmarks/loss_memory.py), the two side by side
        dtype, method = "float32", "ru_maxrss of a fresh process (benchmarks/loss_memory.py)"
        with ThreadPoolExecutor(2) as pool:
            full, chunked = pool.map(lambda c: loss_memory.measure(tokens, hidden, vocab, c, dtype), (0, chunk))
    loss = {"tokens": tokens, "hidden": hidden, "vocab": vocab, "chunk": chunk, "dtype": dtype, "method": method,
            "full_peak_mib": full["peak_mib"], "chunked_peak_mib": chunked["peak_mib"],
            "chunked_vs_full_peak": chunked["peak_mib"] / full["peak_mib"] if full["peak_mib"] > 0 else None,
            "full_loss": full["loss"], "chunked_loss": chunked["loss"],
            "loss_relative_difference": relative_difference(chunked["loss"], full["loss"])}
    speed = ctx.results.get("speed", {})
    name = "StructMoE 125M"
    row = speed.get("models", {}).get(name, {})
    estimator: dict[str, Any] = {"model": name}
    if speed.get("status") == "ok" and row.get("micro_batch"):
        args = speed_args(ctx, name)
        args.train_micro_batch_size_per_gpu = row["micro_batch"]
        estimated = estimated_bytes(args) / GIB
        measured = (row.get("eager") or {}).get("peak_gib")
        estimator.update({"micro_batch": row["micro_batch"], "estimated_gib": estimated, "measured_gib": measured,
                          "measured_vs_estimated": measured / estimated if measured else None})
        if measured is None:
            estimator["note"] = "n/a on the CPU: no allocator peak to measure"
    else:
        estimator["note"] = "the speed section did not measure it"
    return {"loss": loss, "estimator": estimator}


# 6. LSH-MoE, Remix-DiT, FSDP2

def small_lm(ctx: Context, lsh=None):
    from megatron.model.gpt import GPT, GPTConfig
    from megatron.model.moe import MoEArchitecture, MoERuntime
    from megatron.model.moe.kernels import resolve_moe_impl

    s = ctx.sizes.small_lm
    moe = MoEArchitecture(num_experts=s["experts"], top_k=1)
    runtime = MoERuntime(impl=resolve_moe_impl("auto", ctx.device), lsh=lsh)
    config = GPTConfig(vocab_size=s["vocab"], num_layers=s["layers"], hidden_size=s["hidden"],
                       num_attention_heads=s["heads"], max_position_embeddings=s["seq"], moe=moe)
    import torch

    torch.manual_seed(0)
    return GPT(config, runtime).to(ctx.device)  # built on the CPU as the trainer does (the LSH rotation's generator is)


def lm_loss_of(model, tokens_BS1):
    loss, moe_aux = model(tokens_BS1[:, :-1], tokens_BS1[:, 1:])
    total = loss + 0.01 * sum(aux.load_balancing_loss for aux in moe_aux)
    return loss, total, moe_aux


def section_lsh_step(ctx: Context) -> dict:
    """One training step of a small MoE whose expert exchange is LSH-compressed (cross-polytope buckets)."""
    import torch

    from megatron.model.moe.lsh import LSHConfig

    model = small_lm(ctx, LSHConfig(num_hashes=2, hash_dim=8, error_compensation=True, seed=0)).train()
    dispatchers = sorted({type(m.dispatcher).__name__ for m in model.modules() if hasattr(m, "dispatcher")})
    if "LSHDispatcher" not in dispatchers:
        raise RuntimeError(f"no LSH dispatcher was built (dispatchers: {dispatchers})")
    s = ctx.sizes.small_lm
    tokens_BS1 = torch.randint(s["vocab"], (s["batch"], s["seq"] + 1), device=ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    with ctx.autocast():
        loss, total, moe_aux = lm_loss_of(model, tokens_BS1)
    total.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    optimizer.step()
    stats = {k: float(v) for aux in moe_aux[:1] for k, v in aux.dispatch_stats.items()}
    finite = math.isfinite(loss.item()) and math.isfinite(grad_norm)
    return {"loss": loss.item(), "grad_norm": grad_norm, "finite": finite, "dispatchers": dispatchers,
            "dispatch_stats_layer0": stats, "precision": "bfloat16 autocast"}


def section_dit_step(ctx: Context) -> dict:
    """One Remix-DiT step of configs/remix_digits_4x8.yml through train.py; on synthetic latents of the same
    shape where scikit-learn (the digits) is not installed."""
    import numpy as np

    overrides = ["--train_iters", "1", "--fd_samples", "0", "--device", ctx.device.type, "--torch_compile", '"off"']
    dataset = "digits (scikit-learn)"
    if importlib.util.find_spec("sklearn") is None:
        rng = np.random.default_rng(0)
        images, labels = ctx.work / "latents.npy", ctx.work / "labels.npy"
        np.save(images, rng.uniform(-1, 1, size=(512, 1, 8, 8)).astype(np.float32))
        np.save(labels, rng.integers(0, 10, size=512))
        overrides += ["--image_dataset", "latents", "--image_path", str(images), "--image_labels_path", str(labels)]
        dataset = "synthetic 1x8x8 latents (scikit-learn absent)"
    losses = training_losses(ctx, "dit_step", "configs/remix_digits_4x8.yml", overrides)
    loss = losses.get(1)
    return {"loss": loss, "dataset": dataset, "finite": loss is not None and math.isfinite(loss)}


def section_fsdp2(ctx: Context) -> dict:
    """A one-rank process group (NCCL on the GPU, gloo on the CPU) and FSDP2 (bf16 mixed precision on the GPU):
    the sharding, all-gather and reduce-scatter paths of ZeRO-3 for a few steps of a small MoE LM."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from megatron.parallel import DistInfo, destroy
    from megatron.parallel.data_parallel import shard_with_fsdp
    from megatron.parallel.distributed import add_checkpoint_group
    from megatron.parallel.mesh import ParallelDims
    from megatron.training import checkpoint
    from megatron.training.optim import build_optimizer

    backend = "nccl" if ctx.cuda else "gloo"
    if ctx.cuda:
        torch.cuda.set_device(ctx.device)
    store = ctx.work / "fsdp2_store"
    store.unlink(missing_ok=True)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        world = init_device_mesh(ctx.device.type, (1,), mesh_dim_names=("dp",))
        experts = init_device_mesh(ctx.device.type, (1, 1), mesh_dim_names=("edp", "ep"))
        model = small_lm(ctx).train()
        # bf16 parameters on the GPU only, as the trainer does (on the CPU, bf16 LayerNorm weights meet the fp32
        # residual stream FSDP2 no longer casts, which CPU layer_norm refuses): bf16 autocast on both
        param_dtype = torch.bfloat16 if ctx.cuda else None
        shard_with_fsdp(model, ParallelDims(1, 1, 0, world, experts), reshard_after_forward=True,
                        param_dtype=param_dtype)
        sharded = isinstance(model, FSDPModule) and all(isinstance(p, DTensor) for p in model.parameters())
        optimizer = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.0, ctx.device)
        s = ctx.sizes.small_lm
        torch.manual_seed(0)
        tokens_BS1 = torch.randint(s["vocab"], (s["batch"], s["seq"] + 1), device=ctx.device)
        losses = []
        for _ in range(5):
            with ctx.autocast():
                loss, total, _ = lm_loss_of(model, tokens_BS1)
            total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        # an asynchronous checkpoint of the sharded state, over the gloo group init_distributed adds for it
        add_checkpoint_group()
        pending = checkpoint.begin_save(ctx.work / "fsdp2_checkpoint", 5, model, optimizer, {"step": 5}, "{}\n",
                                        DistInfo(0, 1, 0, ctx.device), asynchronous=True)
        async_saved = pending.error is None and (pending.finish() / ".metadata").is_file()
    finally:
        destroy()
    finite = all(math.isfinite(v) for v in losses)
    return {"backend": backend, "losses": losses, "sharded": sharded, "finite_and_sharded": finite and sharded,
            "async_save": async_saved,
            "loss_fell": losses[-1] < losses[0],
            "mixed_precision": "param bf16, reduce fp32" if ctx.cuda else "fp32 params, bf16 autocast"}


SECTION_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "cuda_tests": section_cuda_tests, "numerics": section_numerics, "speed": section_speed, "hf": section_hf,
    "memory": section_memory, "lsh_step": section_lsh_step, "dit_step": section_dit_step, "fsdp2": section_fsdp2,
}


# -- the run ----------------------------------------------------------------------------------------------------

def environment(device) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "host": platform.node(), "cpu_threads": torch.get_num_threads()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"device": torch.cuda.get_device_name(device), "gpu_memory_gib": props.total_memory / GIB,
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(device)))})
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["driver"] = first_line(smi.stdout) or None
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
    return env


def prefetch_imports() -> None:
    """transformers takes ~9 s to import on 2 cores: done on a thread while the cuda tests run in a subprocess
    (the main thread only waits there); any failure surfaces again in the hf section."""
    with contextlib.suppress(Exception):
        from transformers import GPTNeoXForCausalLM, MixtralForCausalLM  # noqa: F401


def write_json(result: dict, out: Path) -> None:
    """Atomically, so a killed run leaves the last complete JSON."""
    result["targets"] = evaluate_targets(result["sections"])
    partial = out / "gpu_check.json.partial"
    partial.write_text(json.dumps(result, indent=1, default=str) + "\n")
    partial.replace(out / "gpu_check.json")


def run_section(ctx: Context, name: str, budget: float) -> dict:
    start = time.perf_counter()
    ctx.deadline = start + budget
    try:
        section = {"status": "ok", **SECTION_FUNCTIONS[name](ctx)}
    except BaseException as err:  # an OOM or a bug ends this section only (KeyboardInterrupt still stops)
        if isinstance(err, KeyboardInterrupt):
            raise
        (ctx.out / f"{name}.traceback.txt").write_text(traceback.format_exc())
        section = {"status": "error", "error": error_line(err)}
    finally:
        ctx.free()
    section["seconds"] = time.perf_counter() - start
    return section


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for gpu_check.json/.md/.png")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is present")
    parser.add_argument("--toy", action=argparse.BooleanOptionalAction, default=None,
                        help="toy sizes (default: on for the CPU, off for a GPU)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="speed: also torch.compile'd models (auto: on CUDA only)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="whole-run soft limit in seconds; sections past it are skipped (default 400 GPU, 300 CPU)")
    parser.add_argument("--install-wheels", choices=("auto", "yes", "no"), default="auto",
                        help="install .gpu_wheels/ first (auto: when it exists and pydantic does not import)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only re-render Markdown + PNG from a JSON")
    opts = parser.parse_args(argv)
    unknown = set(opts.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; expected a subset of {', '.join(SECTIONS)}")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if opts.render:
        result = json.loads(opts.render.read_text())
        write_reports(result, out)
        print(render_markdown(result))
        return 0
    wheels = install_wheels(WHEELS, opts.install_wheels)
    import torch

    os.chdir(REPO)  # the configs' relative paths (bundled corpus, tokenizer) are the repo's
    cuda = torch.cuda.is_available() and not opts.cpu
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    toy = opts.toy if opts.toy is not None else not cuda
    sizes = toy_sizes() if toy else gpu_sizes()
    run_budget = opts.budget_s or (400.0 if cuda else 300.0)
    result: dict[str, Any] = {
        "schema": 1, "mode": ("gpu" if cuda else "cpu") + (" toy" if toy else ""),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], "benchmarks/gpu_check.py", *argv]),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wheels": wheels, "environment": environment(device), "sections": {}, "seconds": None,
    }
    names = [n for n in SECTIONS if n in opts.sections.split(",")]
    print(f"gpu_check: {result['environment']['device']}, {result['mode']} sizes, {len(names)} sections, "
          f"output {out} (wheels: {wheels})", flush=True)
    start = time.perf_counter()
    if "hf" in names:
        threading.Thread(target=prefetch_imports, daemon=True).start()
    result["sections"] = {name: {"status": "pending"} for name in names}  # the report's order, whatever the run's
    order = names
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = Context(device, sizes, out, Path(work), opts)
        if toy and "cuda_tests" in names:  # on a GPU the tests would disturb the timings: there they run first, alone
            ctx.cuda_tests = start_cuda_tests(ctx)
            order = [n for n in names if n != "cuda_tests"] + ["cuda_tests"]
        for index, name in enumerate(order, 1):
            elapsed = time.perf_counter() - start
            if elapsed > run_budget:
                section = {"status": "skipped", "reason": f"run budget of {run_budget:.0f} s spent", "seconds": 0.0}
            else:
                print(f"[{index}/{len(names)}] {name} ...", flush=True)
                section = run_section(ctx, name, min(sizes.budgets_s.get(name, 60.0), run_budget - elapsed))
            ctx.results[name] = result["sections"][name] = section
            result["seconds"] = time.perf_counter() - start
            write_json(result, out)
            print(f"[{index}/{len(names)}] {name}: {section['status']} in {section['seconds']:.1f} s "
                  f"(total {result['seconds']:.1f} s){': ' + section['error'] if 'error' in section else ''}",
                  flush=True)
    result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(result, out)
    try:
        write_reports(result, out)
    except Exception as err:  # the JSON is what matters; the reports can be rendered again with --render
        print(f"gpu_check: reports failed: {error_line(err)}", file=sys.stderr)
    print()
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
