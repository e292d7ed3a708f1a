"""benchmarks/gpu_check.py: its CPU mode end to end (the same steps a GPU run takes, at toy sizes), and its pure
parts: where host syncs are attributed, how targets are judged, what pytest's report is read as."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_cpu_mode_runs_every_section_and_renders_the_same_markdown(tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out),
                           "--install-wheels", "no"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["mode"] == "cpu toy"
    assert list(result["sections"]) == list(gpu_check.SECTIONS)
    failed = {name: s.get("error") for name, s in result["sections"].items() if s["status"] != "ok"}
    assert not failed, failed
    sections = result["sections"]
    assert sections["cuda_tests"]["skipped"] > 0 and sections["cuda_tests"]["failed_or_errors"] == 0
    numerics = sections["numerics"]
    assert numerics["fp32_vs_cpu_first"] == 0.0 and numerics["fp32_vs_cpu_last"] == 0.0  # CPU vs CPU
    assert len(numerics["losses"]["bf16_native"]) == numerics["steps"]
    targets = {t["name"]: t for t in result["targets"]}
    numeric_targets = [t for name, t in targets.items() if name.startswith("numerics")]
    assert len(numeric_targets) == 4 and all(t["met"] is True for t in numeric_targets), numeric_targets
    for name in ("lsh_step: finite loss and gradients", "dit_step: finite loss", "fsdp2: finite losses, sharded",
                 "memory: chunked vs full loss value (relative)"):
        assert targets[name]["met"] is True, targets[name]
    assert set(sections["speed"]["models"]) == set(gpu_check.SPEED_MODELS)
    assert all(row["eager"]["tokens_per_s"] > 0 for row in sections["speed"]["models"].values())
    assert all("error" not in row for row in sections["hf"]["models"].values()), sections["hf"]["models"]

    markdown = (out / "gpu_check.md").read_text()
    assert markdown == gpu_check.render_markdown(result)
    assert "| numerics | ok |" in markdown and "## Targets" in markdown
    assert (out / "gpu_check.png").stat().st_size > 1000
    again = tmp_path / "again"
    assert gpu_check.main(["--render", str(out / "gpu_check.json"), "--out", str(again)]) == 0
    assert (again / "gpu_check.md").read_text() == markdown
    assert (again / "gpu_check.png").stat().st_size > 1000
    print(f"gpu_check --cpu took {seconds:.1f} s")


def frame(filename: str, lineno: int, name: str) -> traceback.FrameSummary:
    return traceback.FrameSummary(filename, lineno, name, lookup_line=False)


def test_host_syncs_are_grouped_by_the_innermost_frame_inside_the_package():
    package = "/repo/megatron"
    script = frame("/repo/benchmarks/gpu_check.py", 10, "step")
    trainer = frame("/repo/megatron/training/trainer.py", 200, "train_step")
    router = frame("/repo/megatron/model/moe/router.py", 42, "forward")
    lore = frame("/repo/megatron/model/moe/lore.py", 7, "plan")
    torch_frame = frame("/usr/lib/python3/site-packages/torch/_tensor.py", 99, "item")
    lookalike = frame("/repo/megatron_extras/helpers.py", 3, "helper")  # a sibling folder, not the package
    stacks = [
        [script, trainer, router, torch_frame],
        [script, trainer, router, torch_frame],
        [script, trainer, lore],
        [script, lookalike, torch_frame],
    ]
    assert gpu_check.group_sync_locations(stacks, package) == {
        "megatron/model/moe/router.py:42 (forward)": 2,
        "megatron/model/moe/lore.py:7 (plan)": 1,
        "outside megatron": 1,
    }
    assert gpu_check.sync_location([script, trainer], package) == "megatron/training/trainer.py:200 (train_step)"
    assert gpu_check.sync_location([], package) == "outside megatron"


def test_targets_are_met_missed_or_absent():
    sections = {
        "hf": {"status": "ok", "ratios": {"moe_vs_mixtral_grouped_mm": 1.3,  # on the goal: met
                                          "moe_vs_mixtral_eager": 1.9,  # below 2: missed
                                          "structmoe_step_vs_moe_step": None}},  # not measured: absent
        "numerics": {"status": "error", "error": "RuntimeError: boom"},  # nothing reported: absent
        "memory": {"status": "ok", "loss": {"chunked_vs_full_peak": 0.3, "loss_relative_difference": 1e-6}},
        "fsdp2": {"status": "ok", "finite_and_sharded": True},
        "dit_step": {"status": "ok", "finite": False},
    }
    targets = {t["name"]: t for t in gpu_check.evaluate_targets(sections)}
    assert len(targets) == len(gpu_check.TARGETS)
    assert targets["speed: ours MoE / Mixtral grouped_mm (tokens/s)"]["met"] is True
    assert targets["speed: ours MoE / Mixtral eager (tokens/s)"]["met"] is False
    assert targets["speed: StructMoE step / plain MoE step (time)"]["met"] is None
    assert targets["numerics: fp32 device vs CPU, step 1 (relative)"]["met"] is None
    assert targets["memory: chunked / full loss peak"]["met"] is False  # <= 0.25 wanted
    assert targets["memory: chunked vs full loss value (relative)"]["met"] is True
    assert targets["fsdp2: finite losses, sharded"]["met"] is True
    assert targets["dit_step: finite loss"]["met"] is False
    assert targets["cuda tests: failed + errors"]["value"] is None
    markdown = gpu_check.render_markdown({"mode": "gpu", "sections": sections,
                                          "targets": list(targets.values())})
    assert "| speed: ours MoE / Mixtral eager (tokens/s) | 1.9 | >= 2 | MISSED |" in markdown
    assert "| speed: ours MoE / Mixtral grouped_mm (tokens/s) | 1.3 | >= 1.3 | met |" in markdown
    assert "| numerics | error | n/a | RuntimeError: boom |" in markdown
    assert gpu_check.verdict(0.5, "<=", 0.5) is True and gpu_check.verdict(float("nan"), ">=", 1) is None
    with pytest.raises(ValueError):
        gpu_check.verdict(1.0, "==", 1.0)


def test_pytest_reports_and_micro_batch_choice(tmp_path):
    assert gpu_check.parse_pytest_summary("..s\n3 passed, 2 skipped, 1 error, 900 deselected in 4.21s\n") == {
        "passed": 3, "failed": 0, "skipped": 2, "errors": 1, "deselected": 900, "xfailed": 0, "xpassed": 0}
    report = tmp_path / "report.xml"
    report.write_text('<testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" skipped="2"/>'
                      "</testsuites>")
    assert gpu_check.parse_junit(report) == {"passed": 1, "failed": 1, "skipped": 2, "errors": 1}
    gib = 2**30
    assert gpu_check.pick_micro_batch({1: 5 * gib, 2: 9 * gib, 4: 17 * gib}, 10 * gib) == 2
    assert gpu_check.pick_micro_batch({1: 50 * gib, 2: 90 * gib}, 10 * gib) == 1  # none fits: the smallest


def test_host_sync_warnings_are_captured_with_their_stack(tmp_path, monkeypatch):
    """The capture itself, off a GPU: torch's sync-debug warnings stood in for by the same warning message."""
    import importlib.util
    from types import SimpleNamespace

    import torch

    package = tmp_path / "megatron"
    package.mkdir()
    (package / "hot.py").write_text("import warnings\n\n\ndef sync():\n"
                                    "    warnings.warn('called a synchronizing CUDA operation', stacklevel=1)\n")
    spec = importlib.util.spec_from_file_location("fake_megatron_hot", package / "hot.py")
    hot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hot)
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step():
        hot.sync()
        hot.sync()  # the same place twice: counted twice (warnings' once-per-location filter is off)
        import warnings

        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # outside the package
        warnings.warn("something else", stacklevel=1)  # not a sync warning

    ctx = SimpleNamespace(synchronize=lambda: None)
    counted = gpu_check.count_host_syncs(ctx, step, str(package))
    assert counted == {"per_step": 3, "in_moe_layer": 0,  # hot.py is not in megatron/model/moe/
                       "locations": {"megatron/hot.py:5 (sync)": 2, "outside megatron": 1}}
    assert modes == ["warn", "default"]
