"""One GPU check of the whole project: numerics, FSDP2 over NCCL, the tests marked cuda, LSH-MoE and Remix-DiT
steps, memory, Hugging Face side by side and speed, written as one JSON + its Markdown and PNG.

    python3 benchmarks/gpu_check.py --out $OUT       # on a GPU node: about 5 minutes on one H100 (--budget-s 300)
    python3 benchmarks/gpu_check.py --cpu            # the same steps on the CPU at toy sizes (CI, about a minute)
    python3 benchmarks/gpu_check.py --render docs/results/gpu_check/gpu_check.json   # Markdown + PNG again

Why one script: a lent GPU is precious, brief and bare (no package registry; 15 minutes; only a few files come
back), so every GPU-only path is exercised in one run whose results are three files (gpu_check.json with
everything, tracebacks and logs included; gpu_check.md; gpu_check.png). Each section is wrapped, so a failure
(an exception, an OOM) is recorded as {"status": "error", ...} and the run goes on; the JSON is rewritten after
every section, so a killed run keeps what it had. Correctness runs first (numerics, fsdp2, the cuda tests), the
timings last, inside a whole-run budget (--budget-s) that a hard stop backs. Without CUDA (or with --cpu) the same
code runs at toy sizes, so the script never meets its first GPU untested; benchmarks/gpu_replica.sh runs it in a
CPU copy of the lent node's package set. On a bare node, `bash benchmarks/gpu_wheels.sh` (on a machine with
PyPI) fills `.gpu_wheels/`, which this script installs with pip --no-index when pydantic is missing.
See docs/gpu_check.md for what each section measures and the targets.

Shape legend: B batch (micro-batch), S sequence, N tokens (B x S), D hidden, V vocabulary.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import functools
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
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
# The run's order, which is also the report's: correctness first (numerics, then FSDP2, the only NCCL and
# asynchronous-save check, then the cuda tests, which start in the background at once and are collected third),
# the timings last (speed, whose compiles are the slowest and least predictable, at the very end), so a slow
# compile can only cost itself.
SECTIONS = ("numerics", "fsdp2", "cuda_tests", "lsh_step", "dit_step", "memory", "hf", "speed")
GPU_BUDGET_S = 300.0  # the whole run's default on a GPU: two runs and a machine's start fit 15 minutes
CPU_BUDGET_S = 300.0
HARD_STOP_GRACE_S = 45.0  # past budget + this, the run records what it has and exits (a compile can overrun)
OUTPUT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.png")  # all that is written under --out
LOG_TAIL_CHARS = 4000  # how much of a failing log or traceback the JSON keeps
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
        # seconds each section may take at most (cuda_tests: from the run's start, it runs in the background);
        # the sequential ones sum to more than the run's budget on purpose: speed takes what is left
        budgets_s={"numerics": 60, "fsdp2": 30, "cuda_tests": 150, "lsh_step": 20, "dit_step": 30, "memory": 20,
                   "hf": 60, "speed": 150},
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
        loss_tokens=2048, loss_hidden=64, loss_vocab=16384, loss_chunk=128,  # 8 MiB chunks of 128 MiB logits
        small_lm={"hidden": 64, "layers": 2, "heads": 4, "seq": 64, "batch": 2, "vocab": 512, "experts": 4},
        budgets_s={name: 60.0 for name in SECTIONS},
    )


# -- wheels for a bare node -------------------------------------------------------------------------------------

def install_wheels(folder: Path = WHEELS, mode: str = "auto", site: Path | None = None) -> str:
    """Makes the project importable on a node without a package registry: the wheels of
    benchmarks/gpu_wheels.sh whose distributions this interpreter lacks go into `site` (pip --no-index --no-deps
    --target; where pip cannot, the wheels, which are zip files laid out as site-packages, are unpacked there),
    which is put on sys.path and PYTHONPATH (the subprocesses need it too). Nothing the node has is replaced.
    Returns what it did."""
    import gpu_node

    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if mode == "no":
        return "off"
    if not wheels or (mode == "auto" and importlib.util.find_spec("pydantic") is not None):
        return "not needed"
    needed, present = [], []
    for wheel in wheels:
        try:
            version = importlib.metadata.version(wheel.name.split("-")[0])
            present.append(f"{gpu_node.wheel_distribution(wheel)} {version}")
        except importlib.metadata.PackageNotFoundError:
            needed.append(wheel)
    kept = f"; already here, kept: {', '.join(present)}" if present else ""
    if not needed:
        return f"nothing to install{kept}"
    if site is None:
        site = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
        atexit.register(shutil.rmtree, site, True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", str(site), *map(str, needed)]
    done = subprocess.run(command, capture_output=True, text=True)
    how = "pip installed"
    if done.returncode != 0:
        how = f"unpacked (pip failed: {first_line(done.stderr)})"
        for wheel in needed:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    names = ", ".join(gpu_node.wheel_distribution(w) for w in needed)
    return f"{how} {len(needed)} wheels from {folder.name}/ into {site} ({names}){kept}"


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


def tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The end of a log file ('' when there is none): what the JSON keeps of it."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def junit_failures(path: Path) -> list[str]:
    """'file::test: first line of the message' for each failed or erroring test of a pytest --junitxml report."""
    import xml.etree.ElementTree as ET

    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for problem in [*case.findall("failure"), *case.findall("error")]:
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            rows.append(f"{name}: {first_line(problem.get('message') or problem.text or '')}")
    return rows


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
    # the baseline of the next target must be HF's fast path: bf16 operands on torch's fused kernel (CUDA only)
    ("hf: Mixtral grouped_mm baseline on torch's fused bf16 kernel", "hf", ("baseline_fused",), ">=", 1),
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
        return (f"baseline experts: {section.get('baseline_experts_path')}; "
                + "; ".join(f"{k} {fmt(v)}" for k, v in section.get("ratios", {}).items()))
    if name == "memory":
        loss = section.get("loss", {})
        return (f"loss peak chunked/full {fmt(loss.get('chunked_vs_full_peak'))} "
                f"({fmt(loss.get('chunked_peak_mib'))} / {fmt(loss.get('full_peak_mib'))} MiB)")
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
                estimate = fmt(r.get("estimated_gib")) if mode == "eager" else ""
                if m.get("skipped") or m.get("error"):
                    rows.append([model, fmt(r.get("micro_batch")), mode, m.get("skipped") or m.get("error"),
                                 "", "", estimate, ""])
                    continue
                rows.append([model, fmt(r.get("micro_batch")), mode, fmt(m.get("tokens_per_s")),
                             fmt(m.get("mfu")), fmt(m.get("peak_gib")), estimate,
                             sync_text if mode == "eager" else ""])
        lines += table(["model", "micro-batch", "torch.compile", "tokens/s", "MFU", "peak GiB", "estimated GiB",
                        "host syncs/step"], rows)
        locations = {m: r["host_syncs"]["locations"] for m, r in speed["models"].items()
                     if isinstance(r.get("host_syncs"), dict) and r["host_syncs"].get("locations")}
        if locations:
            lines += ["", "Host syncs per step by location (innermost frame in megatron/):", ""]
            lines += table(["model", "location", "count"],
                           [[m, loc, fmt(n)] for m, locs in locations.items() for loc, n in locs.items()])
    hf = sections.get("hf", {})
    if hf.get("models"):
        lines += ["", f"## Ours vs Hugging Face: {hf.get('shape')}", "", str(hf.get("baseline", "")), ""]
        lines += table(["model", "runs as", "experts on", "params (M)", "step (s)", "tokens/s", "MFU"],
                       [[m, r.get("precision", ""), r.get("experts_path", ""), fmt(r.get("params_m")),
                         fmt(r.get("step_s")), r.get("error") or r.get("skipped") or fmt(r.get("tokens_per_s")),
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
        self.cuda_tests: subprocess.Popen | None = None  # started with the run, collected in its section
        self.log_tail: str | None = None  # the end of the log of the section's current subprocess or training

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
        ctx.log_tail = tail(folder / "train.log")  # the folder is temporary: the JSON keeps the log's end
        raise RuntimeError(f"{name}: {error_line(err)}") from err
    records = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# 1. tests marked cuda

CUDA_MARK = re.compile(r"^\s*(@pytest\.mark\.cuda\b|pytestmark\b.*\bmark\.cuda\b)", re.MULTILINE)


def cuda_test_files() -> list[str]:
    """The test files that mark tests cuda: the only ones collected, so a module the GPU node lacks that some other
    test file imports cannot error the collection (and collecting the whole suite would take its time)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if CUDA_MARK.search(p.read_text()))


def cuda_tests_command() -> list[str]:
    return [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *cuda_test_files()]


def start_cuda_tests(ctx: Context) -> subprocess.Popen:
    """`pytest -m cuda FILES` started in the background, its output and a JUnit XML report in the work folder
    (the repo's addopts add a second -q, which drops pytest's summary line); the JSON gets their gist."""
    command = cuda_tests_command()
    with open(ctx.work / "cuda_tests.log", "w") as log:
        process = subprocess.Popen([*command, f"--junitxml={ctx.work / 'cuda_tests.xml'}"], cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT)
    process.command = shlex.join(command[1:])  # type: ignore[attr-defined]
    process.started = time.perf_counter()  # type: ignore[attr-defined]
    return process


def section_cuda_tests(ctx: Context) -> dict:
    """The tests marked cuda, in a subprocess started with the run (on the GPU beside the numerics and FSDP2
    sections, which time nothing); on the CPU they skip, which proves the plumbing. Waits at most until the
    section's budget, counted from the subprocess's start, is spent."""
    process = ctx.cuda_tests or start_cuda_tests(ctx)
    ctx.cuda_tests = None
    budget = ctx.sizes.budgets_s.get("cuda_tests", 60.0)
    wait = min(budget - (time.perf_counter() - process.started), ctx.left())  # type: ignore[attr-defined]
    try:
        returncode = process.wait(timeout=max(wait, 5.0))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise TimeoutError(f"pytest -m cuda still running after {budget:.0f} s: killed; log tail in the JSON") from None
    finally:
        ctx.log_tail = tail(ctx.work / "cuda_tests.log")
    report = ctx.work / "cuda_tests.xml"
    counts = parse_junit(report) if report.is_file() else parse_pytest_summary(ctx.log_tail)
    if returncode not in (0, 1, 5):  # 1: tests failed (counted); 5: none collected
        raise RuntimeError(f"pytest exited {returncode}: {first_line(ctx.log_tail[-300:])}")
    result = {**counts, "returncode": returncode, "command": process.command,  # type: ignore[attr-defined]
              "failed_or_errors": counts["failed"] + counts["errors"]}
    if result["failed_or_errors"]:
        result["failures"] = junit_failures(report) if report.is_file() else []
        result["log_tail"] = ctx.log_tail
    return result


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
    "dense": ("configs/125M_moe_8x.yml", ("--moe_num_experts", "1", "--moe_expert_interval", "1",  # the MoE keys
                                          "--moe_first_layer", "0", "--moe_zloss_coeff", "0.0")),  # at defaults
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
        row["estimated_gib"] = estimated_bytes(args) / GIB  # the estimator against the measured peak (GPU only)
        measured = (row.get("eager") or {}).get("peak_gib")
        row["measured_vs_estimated"] = measured / row["estimated_gib"] if measured else None
    return {"models": models, "precision": "bfloat16", "seq": seq, "peak_tflops": peak, "peak_source": source,
            "capacity_gib": capacity_bytes(ctx) / GIB, "compile": compile_setting,
            "timing": f"{ctx.sizes.warmup_steps} warm-up + median of {ctx.sizes.timed_steps} steps"}


# 4. Hugging Face side by side

BF16_WEIGHTS = "bf16 weights"  # model.to(torch.bfloat16), no autocast: how Hugging Face's models run fastest
AUTOCAST = "fp32 weights, bf16 autocast"  # how our trainer runs (fp32 master weights)
HF_FAST_MIXTRAL = "HF Mixtral, grouped_mm experts"  # the baseline of the 1.3x target, run the fast way
HF_BASELINE = (
    "Hugging Face models with bf16 weights (model.to(torch.bfloat16)) and no autocast, the fast way to run them: "
    "under bf16 autocast with fp32 weights transformers casts the experts' input to the weights' fp32, and on "
    "CUDA torch's grouped_mm takes its per-group fallback for fp32; those fp32 + autocast runs are kept beside "
    "('... (fp32 + autocast)'). Ours: fp32 weights under bf16 autocast, as the trainer runs."
)


def hf_models(opts) -> dict[str, tuple[Callable[[], Any], bool, str]]:
    """name: (builder, is ours, how it runs: BF16_WEIGHTS or AUTOCAST); benchmarks/train_step.py's models, whose
    shapes and FLOPs are matched (8 experts, top-1, in every layer)."""
    import train_step

    return {
        "ours dense": (lambda: train_step.ours(opts, False, False), True, AUTOCAST),
        "HF GPTNeoXForCausalLM": (lambda: train_step.hf_gpt_neox(opts), False, BF16_WEIGHTS),
        "HF GPTNeoXForCausalLM (fp32 + autocast)": (lambda: train_step.hf_gpt_neox(opts), False, AUTOCAST),
        "ours MoE": (lambda: train_step.ours(opts, True, False), True, AUTOCAST),
        HF_FAST_MIXTRAL: (lambda: train_step.hf_mixtral(opts, "grouped_mm"), False, BF16_WEIGHTS),
        "HF Mixtral, grouped_mm experts (fp32 + autocast)": (lambda: train_step.hf_mixtral(opts, "grouped_mm"),
                                                             False, AUTOCAST),
        "HF Mixtral, eager experts": (lambda: train_step.hf_mixtral(opts, "eager"), False, BF16_WEIGHTS),
        "ours StructMoE": (lambda: train_step.ours(opts, True, True), True, AUTOCAST),
    }


def grouped_mm_calls(forward: Callable[[], Any]) -> list[tuple[str, str, str, str]]:
    """(op, device type, dtype of a, dtype of b) of each grouped matmul op that one call of `forward` dispatches,
    seen at torch's dispatcher (below autocast), so whatever Python name a library calls it by. Ops of another
    library's own fallback (transformers::grouped_mm_fallback) are seen too, not the matmuls inside them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, str, str, str]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "grouped_mm" in str(func) and len(args) >= 2:
                a, b = args[0], args[1]
                self.calls.append((str(func), a.device.type, str(a.dtype).removeprefix("torch."),
                                   str(b.dtype).removeprefix("torch.")))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        forward()
    return recorder.calls


def experts_path(calls: list[tuple[str, str, str, str]], capability: tuple[int, int] | None) -> tuple[str, bool | None]:
    """Which kernel the experts ran on, from the grouped matmul ops of one forward, and whether it is torch's
    fused bf16 grouped_mm (None off CUDA, where there is no such distinction)."""
    from megatron.model.moe.kernels import TORCH_FUSED_GROUPED_MM_MAJORS

    if not calls:
        return "no grouped matmul: one matmul per expert", False if capability else None
    torch_calls = [c for c in calls if c[0].startswith("aten.")]
    if not torch_calls:
        return f"{calls[0][0]}: a per-group loop of its own, not torch's grouped_mm", False if capability else None
    devices = sorted({c[1] for c in torch_calls})
    dtypes = sorted({c[2] for c in torch_calls} | {c[3] for c in torch_calls})
    operands = "/".join(dtypes)
    if devices != ["cuda"] or capability is None:
        return f"torch grouped_mm on {'/'.join(devices)}, {operands} operands", None
    sm = f"sm{capability[0]}{capability[1]}"
    if dtypes == ["bfloat16"] and capability[0] in TORCH_FUSED_GROUPED_MM_MAJORS:
        return f"torch grouped_mm, fused bf16 kernel ({sm})", True
    if dtypes != ["bfloat16"]:
        return f"torch grouped_mm, per-group fallback: {operands} operands (its fused kernel takes bf16 only)", False
    return f"torch grouped_mm, per-group fallback: no fused kernel on {sm}", False


def section_hf(ctx: Context) -> dict:
    """benchmarks/train_step.py's models (matched shapes and FLOPs) on this device, interleaved: ours as the
    trainer runs them, Hugging Face's the fast way (HF_BASELINE) and, beside, as ours run."""
    import torch
    import train_step

    from megatron.sizing.flops import flops_per_token

    opts = SimpleNamespace(**ctx.sizes.hf)
    capability = tuple(torch.cuda.get_device_capability(ctx.device)) if ctx.cuda else None
    flops_twin = {"HF GPTNeoXForCausalLM": "ours dense", "HF Mixtral": "ours MoE"}
    torch.manual_seed(0)
    tokens_BS1 = torch.randint(opts.vocab, (opts.batch, opts.seq + 1), device=ctx.device)
    steps, rows, flops = {}, {}, {}
    for name, (build, is_ours, precision) in hf_models(opts).items():
        if ctx.left() < 5.0:
            rows[name] = {"skipped": f"section budget: {ctx.left():.0f} s left"}
            continue
        try:
            with torch.device(ctx.device):
                model = build()
            if precision == BF16_WEIGHTS:
                model.to(torch.bfloat16)
            model.train()
            use_autocast = precision == AUTOCAST
            rows[name] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "precision": precision}
            if is_ours:
                flops[name] = flops_per_token(model, opts.seq).training
            if "MoE" in name or "Mixtral" in name:
                def forward(model=model, use_autocast=use_autocast, is_ours=is_ours) -> None:
                    with torch.no_grad(), torch.autocast(ctx.device.type, torch.bfloat16, enabled=use_autocast):
                        if is_ours:
                            model(tokens_BS1[:, :-1])
                        else:
                            model(input_ids=tokens_BS1[:, :-1])

                path, fused = experts_path(grouped_mm_calls(forward), capability)
                rows[name].update({"experts_path": path, "fused_grouped_mm": fused})
            plain = train_step.step_fn(model, tokens_BS1, is_ours)

            def step(plain=plain, use_autocast=use_autocast) -> None:
                with torch.autocast(ctx.device.type, torch.bfloat16, enabled=use_autocast):
                    plain()

            for _ in range(opts.warmup):
                timed(ctx, step)
            steps[name] = step
        except Exception as err:  # one model that cannot be built or run here does not lose the others
            rows[name] = {"error": error_line(err), "precision": precision}
            ctx.free()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(opts.repeats):
        for name, step in steps.items():
            times[name].append(timed(ctx, step))
    peak, _ = ctx.peak
    tokens = opts.batch * opts.seq
    for name, t in times.items():
        median = statistics.median(t)
        twin = flops.get(name) or next((flops.get(ours) for hf, ours in flops_twin.items() if name.startswith(hf)),
                                       None)
        rows[name].update({"step_s": median, "tokens_per_s": tokens / median,
                           "mfu": twin * tokens / median / (peak * 1e12) if twin else None})
    speed = {name: r.get("tokens_per_s") for name, r in rows.items()}

    def ratio(a: str, b: str) -> float | None:
        return speed[a] / speed[b] if speed.get(a) and speed.get(b) else None

    del steps
    ctx.free()
    return {
        "shape": (f"d={opts.hidden}, {opts.layers} layers, {opts.heads} heads, {opts.batch}x{opts.seq} tokens, "
                  f"vocab {opts.vocab}, 8 experts top-1 in every layer, {opts.lores} LoREs of rank {opts.lore_rank}, "
                  f"median of {opts.repeats} interleaved repeats"),
        "baseline": HF_BASELINE,
        "baseline_experts_path": rows.get(HF_FAST_MIXTRAL, {}).get("experts_path"),
        "baseline_fused": rows.get(HF_FAST_MIXTRAL, {}).get("fused_grouped_mm"),
        "models": rows,
        "ratios": {
            "moe_vs_mixtral_grouped_mm": ratio("ours MoE", HF_FAST_MIXTRAL),
            "moe_vs_mixtral_eager": ratio("ours MoE", "HF Mixtral, eager experts"),
            "dense_vs_gpt_neox": ratio("ours dense", "HF GPTNeoXForCausalLM"),
            "moe_vs_mixtral_grouped_mm_autocast": ratio("ours MoE", "HF Mixtral, grouped_mm experts (fp32 + autocast)"),
            "dense_vs_gpt_neox_autocast": ratio("ours dense", "HF GPTNeoXForCausalLM (fp32 + autocast)"),
            "structmoe_step_vs_moe_step": ratio("ours MoE", "ours StructMoE"),  # time ratio = inverse speed ratio
        },
    }


# 5. memory

def cuda_loss_peak(device, tokens: int, hidden: int, vocab: int, chunk: int, dtype: str) -> dict:
    """The loss's own peak on a GPU, above what is held before it (benchmarks/loss_memory.py's measurement)."""
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


CPU_LOSS_PEAK_CHILD = r"""
import json, sys
import torch
sys.path.insert(0, {repo!r})
from megatron.model.loss import lm_loss


def rss_mib(key):
    # VmHWM: this process's peak resident memory since exec (or since the reset below); ru_maxrss would
    # include the forked parent's high-water mark, which is larger than what is measured here
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024


tokens, hidden, vocab, chunk = {tokens}, {hidden}, {vocab}, {chunk}
torch.manual_seed(0)
dtype = getattr(torch, {dtype!r})
h = torch.empty(tokens, hidden, dtype=dtype).normal_(0, 0.02).requires_grad_()  # in place: no transient copies
w = torch.empty(vocab, hidden, dtype=dtype).normal_(0, 0.02).requires_grad_()
w.grad = torch.zeros_like(w)  # the weight gradient both paths need (it does not grow with tokens): held before
targets = torch.randint(vocab, (tokens,))
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark back to the current resident size (Linux 4.0+)
except OSError:
    pass
before = rss_mib("VmRSS")
loss = lm_loss(h, w, targets, chunk)
loss.backward()
print(json.dumps({{"loss": loss.item(), "peak_mib": rss_mib("VmHWM") - before}}))
"""


def cpu_loss_peak(tokens: int, hidden: int, vocab: int, chunk: int, dtype: str) -> dict:
    """The LM head + loss's own peak resident memory on the CPU, forward and backward, measured in a fresh
    process (its VmHWM, reset before the loss): nothing this process has held counts."""
    code = CPU_LOSS_PEAK_CHILD.format(repo=str(REPO), tokens=tokens, hidden=hidden, vocab=vocab, chunk=chunk,
                                      dtype=dtype)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"loss peak child (chunk {chunk}) exited {done.returncode}: "
                           f"{first_line(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '')}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def section_memory(ctx: Context) -> dict:
    """The chunked loss against the full logits on the 410M head: each one's own peak memory, their ratio and
    both loss values. (The estimator against measured peaks is in the speed section, which measures them.)"""
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
    else:  # one fresh process each, one after the other (side by side they would share the 2 cores' memory bus)
        dtype, method = "float32", "VmHWM of a fresh process, reset before the loss"
        full = cpu_loss_peak(tokens, hidden, vocab, 0, dtype)
        chunked = cpu_loss_peak(tokens, hidden, vocab, chunk, dtype)
    return {"loss": {
        "tokens": tokens, "hidden": hidden, "vocab": vocab, "chunk": chunk, "dtype": dtype, "method": method,
        "logits_mib": tokens * vocab * (2 if dtype == "bfloat16" else 4) / 2**20,
        "full_peak_mib": full["peak_mib"], "chunked_peak_mib": chunked["peak_mib"],
        "chunked_vs_full_peak": chunked["peak_mib"] / full["peak_mib"] if full["peak_mib"] > 0 else None,
        "full_loss": full["loss"], "chunked_loss": chunked["loss"],
        "loss_relative_difference": relative_difference(chunked["loss"], full["loss"])}}


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
    for package in ("transformers", "pydantic"):  # read, not imported: transformers takes seconds to import
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = None
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


def write_json(result: dict, out: Path) -> None:
    """Atomically, so a killed run leaves the last complete JSON."""
    result["targets"] = evaluate_targets(result["sections"])
    partial = out / "gpu_check.json.partial"
    partial.write_text(json.dumps(result, indent=1, default=str) + "\n")
    partial.replace(out / "gpu_check.json")


class HardStop:
    """Backs the soft budget: `limit` seconds after the start, it records the section in flight as stopped and
    the rest as skipped, writes the JSON and Markdown and ends the process (exit 3). A compile or a hang past the
    budget then still leaves its results inside the device call's time limit."""

    EXIT_CODE = 3

    def __init__(self, result: dict, out: Path, limit: float, started: float, lock: threading.Lock, ctx: Context):
        """`limit`: seconds after `started` (a time.perf_counter() reading)."""
        self.result, self.out, self.limit, self.lock, self.ctx = result, out, limit, lock, ctx
        self.timer = threading.Timer(max(started + limit - time.perf_counter(), 0.0), self.fire)
        self.timer.daemon = True
        self.done = False

    def finish(self) -> None:
        """The run ended by itself (called holding the lock)."""
        self.done = True
        self.timer.cancel()

    def fire(self) -> None:
        locked = self.lock.acquire(timeout=10)  # the main thread holds it only while it writes the JSON
        if self.done:
            if locked:
                self.lock.release()
            return
        try:
            for name, section in self.result["sections"].items():
                if section["status"] == "running":
                    self.result["sections"][name] = {
                        "status": "error", "seconds": time.perf_counter() - section["started"],
                        "error": f"stopped by the hard limit of {self.limit:.0f} s (--budget-s + grace) while running"}
                elif section["status"] == "pending":
                    self.result["sections"][name] = {"status": "skipped", "seconds": 0.0,
                                                     "reason": f"hard limit of {self.limit:.0f} s reached"}
            self.result["stopped"] = f"hard limit of {self.limit:.0f} s"
            write_json(self.result, self.out)
            (self.out / "gpu_check.md").write_text(render_markdown(self.result))  # the PNG: --render, later
        finally:
            if self.ctx.cuda_tests is not None:
                self.ctx.cuda_tests.kill()
            shutil.rmtree(self.ctx.work, ignore_errors=True)  # os._exit skips the TemporaryDirectory's cleanup
            print(f"gpu_check: stopped at the hard limit of {self.limit:.0f} s; results in {self.out}", flush=True)
            os._exit(self.EXIT_CODE)


def run_section(ctx: Context, name: str, budget: float) -> dict:
    """One section, wrapped: its result, or its error with the traceback (and the end of its log) in the JSON."""
    start = time.perf_counter()
    ctx.deadline = start + budget
    ctx.log_tail = None
    try:
        section = {"status": "ok", **SECTION_FUNCTIONS[name](ctx)}
    except BaseException as err:  # an OOM or a bug ends this section only (KeyboardInterrupt still stops)
        if isinstance(err, KeyboardInterrupt):
            raise
        section = {"status": "error", "error": error_line(err), "traceback": traceback.format_exc()[-LOG_TAIL_CHARS:]}
        if ctx.log_tail:
            section["log_tail"] = ctx.log_tail
    finally:
        ctx.free()
    section["seconds"] = time.perf_counter() - start
    return section


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for {', '.join(OUTPUT_FILES)}: nothing else is written there")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is present")
    parser.add_argument("--toy", action=argparse.BooleanOptionalAction, default=None,
                        help="toy sizes (default: on for the CPU, off for a GPU)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="speed: also torch.compile'd models (auto: on CUDA only)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"the whole run's budget in seconds: each section gets at most what is left of it, "
                             f"sections that would start after it are skipped, and at the budget + --grace-s the "
                             f"run stops with what it has (exit {HardStop.EXIT_CODE}); default {GPU_BUDGET_S:.0f}")
    parser.add_argument("--grace-s", type=float, default=HARD_STOP_GRACE_S,
                        help="how far past --budget-s the section in flight may run before the hard stop")
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
    start = time.perf_counter()
    wheels = install_wheels(WHEELS, opts.install_wheels)
    import torch

    os.chdir(REPO)  # the configs' relative paths (bundled corpus, tokenizer) are the repo's
    cuda = torch.cuda.is_available() and not opts.cpu
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    toy = opts.toy if opts.toy is not None else not cuda
    sizes = toy_sizes() if toy else gpu_sizes()
    run_budget = opts.budget_s or (GPU_BUDGET_S if cuda else CPU_BUDGET_S)
    names = [n for n in SECTIONS if n in opts.sections.split(",")]
    result: dict[str, Any] = {
        "schema": 2, "mode": ("gpu" if cuda else "cpu") + (" toy" if toy else ""),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], "benchmarks/gpu_check.py", *argv]),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": run_budget, "hard_stop_s": run_budget + opts.grace_s,
        "wheels": wheels, "environment": environment(device),
        "sections": {name: {"status": "pending"} for name in names}, "seconds": None,
    }
    print(f"gpu_check: {result['environment']['device']}, {result['mode']} sizes, {len(names)} sections, budget "
          f"{run_budget:.0f} s, output {out} (wheels: {wheels})", flush=True)
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = Context(device, sizes, out, Path(work), opts)
        if "cuda_tests" in names:  # in the background from the start; collected before the timed sections
            ctx.cuda_tests = start_cuda_tests(ctx)
        stop = HardStop(result, out, run_budget + opts.grace_s, start, lock, ctx)
        stop.timer.start()
        for index, name in enumerate(names, 1):
            elapsed = time.perf_counter() - start
            if elapsed > run_budget:
                section = {"status": "skipped", "reason": f"run budget of {run_budget:.0f} s spent", "seconds": 0.0}
            else:
                with lock:
                    result["sections"][name] = {"status": "running", "started": time.perf_counter()}
                    write_json(result, out)
                print(f"[{index}/{len(names)}] {name} ...", flush=True)
                section = run_section(ctx, name, min(sizes.budgets_s.get(name, 60.0), run_budget - elapsed))
            with lock:
                result["sections"][name] = section
                result["seconds"] = time.perf_counter() - start
                write_json(result, out)
            print(f"[{index}/{len(names)}] {name}: {section['status']} in {section['seconds']:.1f} s "
                  f"(total {result['seconds']:.1f} s){': ' + section['error'] if 'error' in section else ''}",
                  flush=True)
        with lock:
            stop.finish()
            if ctx.cuda_tests is not None:  # its section was not reached
                ctx.cuda_tests.kill()
                ctx.cuda_tests.wait()
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
