"""Run every config x seed, one run folder each: resumes interrupted runs, skips finished ones.

    python tools/sweep.py configs/dit_digits.yml configs/remix_digits_4x20.yml --seeds 3 --out runs/remix_study
    python tools/sweep.py configs/tiny_moe.yml --seeds 3 --jobs 2 --train_iters 300     # overrides for every run
    python tools/sweep.py configs/*.yml --seeds 3 --print                               # commands, for a cluster

A run is `train.py CONFIG --seed S --save/--load/--log_dir OUT/NAME_sS [overrides]` with NAME the config's
file name without `.yml`. A run whose final checkpoint (global_step{train_iters}) exists is skipped; one
that stopped part-way resumes from its latest checkpoint, so the sweep can be run again after a stop.
`--jobs N` runs N at a time with cores/N threads each. A line per finished run; each run's output goes
to its folder's train.log. Compare the results with tools/compare_runs.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))


@dataclass
class Run:
    name: str
    folder: Path
    argv: list[str]  # after `python train.py`
    final_step: int

    @property
    def finished(self) -> bool:
        return (self.folder / f"global_step{self.final_step}").is_dir()


def make_run(config: str, seed: int, out: Path, overrides: list[str], name: str | None = None) -> Run:
    from megatron.config import load_config

    name = name or Path(config).name.removesuffix(".yml").removesuffix(".yaml")
    folder = out / f"{name}_s{seed}"
    argv = [config, *overrides, "--seed", str(seed), "--save", str(folder), "--load", str(folder),
            "--log_dir", str(folder / "logs"), "--tensorboard_dir", str(folder / "tensorboard")]
    args = load_config([config], argv[1:])  # checks the config and overrides before anything runs
    return Run(name, folder, argv, args.train_iters)


def run_all(runs: list[Run], jobs: int = 1, cwd: Path = REPO) -> None:
    """Runs the unfinished runs, `jobs` at a time; stops at the first failure (naming its log)."""
    todo = [run for run in runs if not run.finished]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to run", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // jobs))}
    running: list[tuple[subprocess.Popen, Run, float]] = []
    done, total = 0, len(todo)
    while todo or running:
        while todo and len(running) < jobs:
            run = todo.pop(0)
            run.folder.mkdir(parents=True, exist_ok=True)
            with open(run.folder / "train.log", "a") as log:
                process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *run.argv], cwd=cwd, env=env,
                                           stdout=log, stderr=subprocess.STDOUT)
            running.append((process, run, time.time()))
        time.sleep(1)
        for entry in list(running):
            process, run, started = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            done += 1
            status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            print(f"[{done}/{total}] {run.folder.name}: {status} in {time.time() - started:.0f} s", flush=True)
            if process.returncode != 0:
                for other, _, _ in running:
                    other.terminate()
                raise SystemExit(f"{run.folder.name} failed: see {run.folder / 'train.log'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="YAML configs, one arm each")
    parser.add_argument("--seeds", type=int, default=3, help="seeds --first-seed, +1, ...")
    parser.add_argument("--first-seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "sweep")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time on this machine")
    parser.add_argument("--print", action="store_true", help="print the launch commands instead of running")
    opts, overrides = parser.parse_known_args(argv)
    from megatron.config import ConfigError

    try:
        runs = [make_run(config, opts.first_seed + i, opts.out, overrides)
                for i in range(opts.seeds) for config in opts.configs]
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    if opts.print:
        for run in runs:
            print(shlex.join(["python", "train.py", *run.argv]))
        return
    run_all(runs, opts.jobs)


if __name__ == "__main__":
    main()
