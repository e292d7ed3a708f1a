"""benchmarks/gpu_check.py: its CPU mode end to end (the same steps a GPU run takes, at toy sizes), its budget and
hard stop, the Hugging Face baseline's kernel, what it collects and imports on the GPU node, the wheels it brings
(gpu_wheels.sh, offline), the Docker image's torch, and its pure parts: where host syncs are attributed, how
targets are judged, what pytest's report is read as. The run in a CPU replica of the node (gpu_replica.sh) is slow."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_node  # noqa: E402


def test_cpu_mode_runs_every_section_and_renders_the_same_markdown(tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out),
                           "--install-wheels", "no"], capture_output=True, text=True, timeout=400, cwd=tmp_path)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUTPUT_FILES)  # what a lent GPU sends back
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["mode"] == "cpu toy"
    assert list(result["sections"]) == list(gpu_check.SECTIONS)
    failed = {name: s.get("error") for name, s in result["sections"].items() if s["status"] != "ok"}
    assert not failed, failed
    sections = result["sections"]
    cuda_tests = sections["cuda_tests"]
    assert cuda_tests["skipped"] > 0 and cuda_tests["failed_or_errors"] == 0
    assert cuda_tests["command"].endswith(" ".join(gpu_check.cuda_test_files()))  # not the whole suite
    numerics = sections["numerics"]
    assert numerics["fp32_vs_cpu_first"] == 0.0 and numerics["fp32_vs_cpu_last"] == 0.0  # CPU vs CPU
    assert len(numerics["losses"]["bf16_native"]) == numerics["steps"]
    targets = {t["name"]: t for t in result["targets"]}
    numeric_targets = [t for name, t in targets.items() if name.startswith("numerics")]
    assert len(numeric_targets) == 4 and all(t["met"] is True for t in numeric_targets), numeric_targets
    for name in ("lsh_step: finite loss and gradients", "dit_step: finite loss", "fsdp2: finite losses, sharded",
                 "fsdp2: asynchronous checkpoint of the sharded state",
                 "memory: chunked vs full loss value (relative)"):
        assert targets[name]["met"] is True, targets[name]
    # each loss's peak measured in a fresh process: a number, and chunking cuts it (the GPU run reports the same)
    loss = sections["memory"]["loss"]
    assert loss["full_peak_mib"] > 0.5 * loss["logits_mib"], loss
    assert 0.0 < loss["chunked_vs_full_peak"] < 0.5, loss
    assert set(sections["speed"]["models"]) == set(gpu_check.SPEED_MODELS)
    assert all(row["eager"]["tokens_per_s"] > 0 for row in sections["speed"]["models"].values())
    hf = sections["hf"]
    assert all("error" not in row for row in hf["models"].values()), hf["models"]
    # the Mixtral baseline runs on bf16 weights (its experts on bf16 operands); its fp32 + autocast twin does not
    fast = hf["models"][gpu_check.HF_FAST_MIXTRAL]
    autocast = hf["models"][f"{gpu_check.HF_FAST_MIXTRAL} (fp32 + autocast)"]
    assert fast["precision"] == gpu_check.BF16_WEIGHTS and "bfloat16 operands" in fast["experts_path"], fast
    assert "float32 operands" in autocast["experts_path"], autocast
    assert hf["baseline_experts_path"] == fast["experts_path"] and hf["baseline_fused"] is None  # None off CUDA
    assert "bfloat16 operands" in hf["models"]["ours MoE"]["experts_path"]

    markdown = (out / "gpu_check.md").read_text()
    assert markdown == gpu_check.render_markdown(result)
    assert "| numerics | ok |" in markdown and "## Targets" in markdown and gpu_check.HF_BASELINE in markdown
    assert (out / "gpu_check.png").stat().st_size > 1000
    again = tmp_path / "again"
    assert gpu_check.main(["--render", str(out / "gpu_check.json"), "--out", str(again)]) == 0
    assert (again / "gpu_check.md").read_text() == markdown
    assert (again / "gpu_check.png").stat().st_size > 1000
    print(f"gpu_check --cpu took {seconds:.1f} s")


def stand_in_argv(out: Path, budget: float, grace: float) -> list[str]:
    return ["--cpu", "--out", str(out), "--install-wheels", "no", "--sections", "numerics,fsdp2,lsh_step",
            "--budget-s", str(budget), "--grace-s", str(grace)]


def test_sections_past_the_budget_are_skipped_and_tracebacks_stay_in_the_json(tmp_path, monkeypatch):
    def numerics(ctx):
        raise ValueError("numerics broke")

    def fsdp2(ctx):  # spends the rest of the run's budget
        time.sleep(max(ctx.left(), 0.0) + 0.2)
        return {"finite_and_sharded": True}

    import torch  # noqa: F401  (main's clock starts at its call, before it imports torch: not part of this budget)

    monkeypatch.chdir(tmp_path)  # main() moves to the repo
    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "numerics", numerics)
    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "fsdp2", fsdp2)
    assert gpu_check.main(stand_in_argv(tmp_path / "out", budget=2.0, grace=60.0)) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(gpu_check.OUTPUT_FILES)
    sections = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["sections"]
    assert sections["numerics"]["status"] == "error" and sections["numerics"]["error"] == "ValueError: numerics broke"
    assert 'raise ValueError("numerics broke")' in sections["numerics"]["traceback"]
    assert sections["fsdp2"]["status"] == "ok"
    assert sections["lsh_step"] == {"status": "skipped", "reason": "run budget of 2 s spent", "seconds": 0.0}


HARD_STOP_RUN = """
import sys, time
sys.path.insert(0, {benchmarks!r})
import gpu_check

def numerics(ctx):
    return {{"steps": 1, "fp32_vs_cpu_first": 0.0, "fp32_vs_cpu_last": 0.0, "bf16_vs_fp32_last": 0.0, "impls": {{}}}}

def fsdp2(ctx):
    time.sleep(120)

gpu_check.SECTION_FUNCTIONS.update(numerics=numerics, fsdp2=fsdp2)
sys.exit(gpu_check.main({argv!r}))
"""


def test_a_section_past_the_hard_stop_is_recorded_and_the_run_ends(tmp_path):
    """A section that outlives budget + grace (a compile, a hang): the run ends there, with what it had."""
    out = tmp_path / "out"
    code = HARD_STOP_RUN.format(benchmarks=str(REPO / "benchmarks"), argv=stand_in_argv(out, budget=6.0, grace=1.0))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == gpu_check.HardStop.EXIT_CODE, done.stdout[-2000:] + done.stderr[-2000:]
    assert time.perf_counter() - start < 30
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # the PNG: --render
    result = json.loads((out / "gpu_check.json").read_text())
    sections = result["sections"]
    assert sections["numerics"]["status"] == "ok", sections["numerics"]
    assert sections["fsdp2"]["status"] == "error" and "hard limit of 7 s" in sections["fsdp2"]["error"]
    assert sections["lsh_step"]["status"] == "skipped" and result["stopped"] == "hard limit of 7 s"


def test_correctness_runs_before_the_timings_and_the_default_budget_fits_two_runs_in_a_lease():
    order = list(gpu_check.SECTIONS)
    assert order[:3] == ["numerics", "fsdp2", "cuda_tests"]  # fsdp2: the only NCCL and async-save check
    assert order[-2:] == ["hf", "speed"]  # the timed sections last, the compile-heavy speed section at the very end
    # a lease is 15 minutes and a machine's start takes one or two: two whole runs must fit in the rest
    assert 2 * (gpu_check.GPU_BUDGET_S + gpu_check.HARD_STOP_GRACE_S) <= 13 * 60
    assert gpu_check.gpu_sizes().budgets_s.keys() == set(gpu_check.SECTIONS)


def test_experts_path_says_whether_torch_fused_grouped_mm_ran():
    aten = "aten._grouped_mm.default"
    bf16 = [(aten, "cuda", "bfloat16", "bfloat16")] * 2
    fp32 = [(aten, "cuda", "float32", "float32")]
    assert gpu_check.experts_path(bf16, (9, 0)) == ("torch grouped_mm, fused bf16 kernel (sm90)", True)
    path, fused = gpu_check.experts_path(fp32, (9, 0))  # fp32 weights under autocast: the slow path
    assert fused is False and "per-group fallback: float32 operands" in path
    assert gpu_check.experts_path(bf16, (8, 0)) == ("torch grouped_mm, per-group fallback: no fused kernel on sm80",
                                                   False)
    assert gpu_check.experts_path([(aten, "cpu", "bfloat16", "bfloat16")], None) == (
        "torch grouped_mm on cpu, bfloat16 operands", None)
    assert gpu_check.experts_path([], (9, 0)) == ("no grouped matmul: one matmul per expert", False)
    own = [("transformers.grouped_mm_fallback.default", "cuda", "bfloat16", "bfloat16")]
    assert gpu_check.experts_path(own, (9, 0))[1] is False


def test_grouped_mm_calls_are_seen_at_the_dispatcher_under_autocast():
    import torch
    import torch.nn.functional as F

    x, w = torch.randn(32, 16), torch.randn(2, 16, 8)
    offsets = torch.tensor([16, 32], dtype=torch.int32)

    def forward():
        with torch.autocast("cpu", torch.bfloat16):
            F.grouped_mm(x.to(torch.bfloat16), w.to(torch.bfloat16), offs=offsets)
            x @ w[0]  # not a grouped matmul: not recorded

    assert gpu_check.grouped_mm_calls(forward) == [("aten._grouped_mm.default", "cpu", "bfloat16", "bfloat16")]


def test_cuda_tests_collect_only_their_files_and_what_the_gpu_check_imports_is_on_the_node(tmp_path):
    files = gpu_check.cuda_test_files()
    marked = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                    if re.search(r"^@pytest\.mark\.cuda$", p.read_text(), re.MULTILINE))
    assert files and files == marked and "tests/integration/test_gpu_check.py" not in files
    command = gpu_check.cuda_tests_command()
    assert command[-len(files):] == files and not any(arg in ("tests", "tests/unit") for arg in command)
    # every module imported at load time by the collected files, conftest, the helpers, the package, train.py and
    # benchmarks/ is on the node or in .gpu_wheels/ (what gpu_wheels.sh downloads there)
    node = gpu_node.node_packages()
    wheels = {"pydantic", "pydantic-core", "annotated-types", "typing-inspection"}
    paths = [REPO / f for f in files] + [REPO / "tests" / "conftest.py", *(REPO / "tests" / "helpers").glob("*.py"),
                                         *(REPO / "megatron").rglob("*.py"), REPO / "train.py",
                                         *(REPO / "benchmarks").glob("*.py")]
    assert gpu_node.imports_not_on_node(paths, node, wheels) == {}
    stray = tmp_path / "test_stray.py"
    stray.write_text("import os\nimport pytest\ntry:\n    import wandb\nexcept ImportError:\n    pass\n\n\n"
                     "def test_x():\n    import lazily_only  # inside a function: not at collection\n")
    assert gpu_node.imports_not_on_node([stray], node, wheels) == {"wandb": [str(stray)]}


def fake_python(tmp_path: Path, requires: dict[str, list[str]]) -> dict[str, str]:
    """An environment whose `python` answers `-m pip download` with stand-in wheels (their METADATA requiring
    `requires[name]`) and passes anything else to this interpreter: gpu_wheels.sh run offline."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (tmp_path / "fake_pip.py").write_text(f"""
import json, sys, zipfile
from pathlib import Path
args = sys.argv[1:]
dest = Path(args[args.index("-d") + 1])
requires = {requires!r}
for spec in (a for a in args if "==" in a):
    name, version = spec.split("==")
    dist = name.replace("-", "_")
    with zipfile.ZipFile(dest / f"{{dist}}-{{version}}-py3-none-any.whl", "w") as wheel:
        lines = [f"Name: {{name}}", f"Version: {{version}}"] + [f"Requires-Dist: {{r}}" for r in requires.get(name, [])]
        wheel.writestr(f"{{dist}}-{{version}}.dist-info/METADATA", "\\n".join(lines) + "\\n")
""")
    python = bin_dir / "python"
    python.write_text(f"""#!/usr/bin/env bash
if [[ "$1 $2 $3" == "-m pip download" ]]; then shift 3; exec {sys.executable} {tmp_path / 'fake_pip.py'} "$@"; fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GPU_WHEELS_DEST": str(tmp_path / "w")}


def test_gpu_wheels_downloads_only_what_the_node_lacks_and_names_what_it_already_has(tmp_path):
    script = str(REPO / "benchmarks" / "gpu_wheels.sh")
    requires = {"pydantic": ["typing-extensions>=4.14.1", "annotated-types>=0.6.0", "pydantic-core==2.46.4"],
                "scikit-learn": ["numpy>=1.24", "scipy>=1.10", "joblib>=1.3", "threadpoolctl>=3.2",
                                 "narwhals>=2", "cloudpickle; extra == 'dask'", "cloudpickle>=3"]}
    env = fake_python(tmp_path, requires)
    done = subprocess.run(["bash", script, "--digits"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "already on the node, not downloaded: typing-extensions==4.16.0, tqdm==4.70.1, scikit-learn==" in done.stderr
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "w").glob("*.whl")) == [
        "annotated_types", "pydantic", "pydantic_core", "typing_inspection"]
    # a node without scikit-learn: its wheels come, and what they need that the node has (narwhals, cloudpickle) is
    # named, not a failure
    node_list = tmp_path / "node.txt"
    skipped = {"scikit-learn", "scipy", "joblib", "threadpoolctl"}
    node_list.write_text("\n".join(n for n in gpu_node.node_packages() if n not in skipped) + "\n")
    env["GPU_NODE_PACKAGES"] = str(node_list)
    done = subprocess.run(["bash", script, "--digits"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cloudpickle (for scikit-learn)" in done.stdout and "narwhals (for scikit-learn)" in done.stdout
    # a requirement neither downloaded nor on the node: one line naming it and the wheel that needs it
    requires["pydantic"].append("left-out-package")
    env = {**fake_python(tmp_path / "again", requires), "GPU_NODE_PACKAGES": str(node_list)}
    done = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and "left-out-package (for pydantic)" in done.stderr, done.stdout + done.stderr


def test_install_wheels_adds_only_what_this_interpreter_lacks(tmp_path, monkeypatch):
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name, version, module in (("zz_gpu_check_probe", "1.0", "zz_gpu_check_probe"), ("pytest", "0.0.1", "pytest")):
        with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{module}/__init__.py", "VALUE = 7\n")
            wheel.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\n"
                                                                   f"Version: {version}\n")
            wheel.writestr(f"{name}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                                                                "Tag: py3-none-any\n")
            wheel.writestr(f"{name}-{version}.dist-info/RECORD", "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    assert gpu_check.install_wheels(folder, "no") == "off"
    assert gpu_check.install_wheels(folder, "auto") == "not needed"  # pydantic imports here
    site = tmp_path / "site"
    said = gpu_check.install_wheels(folder, "yes", site)
    assert "1 wheels" in said and "zz-gpu-check-probe" in said and "kept: pytest" in said, said
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["zz_gpu_check_probe"]
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(site)
    import zz_gpu_check_probe

    assert zz_gpu_check_probe.VALUE == 7


def load_docker_requirements():
    spec = importlib.util.spec_from_file_location("docker_requirements", REPO / "launch" / "docker_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docker_image_keeps_a_gpu_base_torch_and_refuses_one_outside_the_range():
    docker = load_docker_requirements()
    lines = docker.requirement_lines(REPO / "requirements-dev.txt")
    supported = docker.supported_range(REPO / "pyproject.toml")
    assert supported == ((2, 11), (2, 14))
    pinned = [line for line in lines if docker.is_torch(line)]
    assert pinned and pinned[0].startswith("torch==")  # the CPU image: requirements.txt's pin
    assert docker.image_requirements(lines, None, supported) == lines
    gpu = docker.image_requirements(lines, "2.11.0+cu130", supported)  # a CUDA base: its torch stays
    assert [line for line in gpu if docker.is_torch(line)] == ["torch==2.11.0+cu130"]
    assert set(gpu) - {"torch==2.11.0+cu130"} == set(lines) - set(pinned)
    with pytest.raises(SystemExit, match=r"base image's torch 2.7.0 is outside the supported torch>=2.11,<2.14"):
        docker.image_requirements(lines, "2.7.0", supported)
    # the Dockerfile installs what the script writes, before the project; its GPU example is inside the range
    dockerfile = (REPO / "Dockerfile").read_text()
    write = dockerfile.index("RUN python launch/docker_requirements.py requirements-dev.txt > /tmp/requirements-image")
    install = dockerfile.index("pip install --no-cache-dir -r /tmp/requirements-image.txt")
    assert write < install < dockerfile.index("COPY . .")
    assert "-r requirements-dev.txt" not in dockerfile
    base = re.search(r"BASE=pytorch/pytorch:(\d+\.\d+)\.\d+-cuda", dockerfile)
    assert base and supported[0] <= docker.release(base.group(1)) < supported[1]


@pytest.mark.slow
def test_the_check_runs_in_a_cpu_replica_of_the_gpu_node(tmp_path):
    """benchmarks/gpu_replica.sh: torch 2.11 + transformers 5.17 without pydantic, the carried wheels only, the
    tree as the device tool sends it (needs PyPI and ~5 GB the first time)."""
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_replica.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result["environment"]["torch"].startswith("2.11.") and result["environment"]["transformers"] == "5.17.0"
    assert "pydantic" in result["wheels"]


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
