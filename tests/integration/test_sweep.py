"""tools/sweep.py: config x seed into run folders, finished runs skipped, a failure named."""

import sys
from pathlib import Path

import pytest
from helpers.runs import read_metrics, train_losses, write_config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import sweep  # noqa: E402


def test_runs_every_config_and_seed_once_and_skips_finished_ones(tmp_path, data_prefix, capsys):
    config = str(write_config(tmp_path / "cfg", data_prefix, train_iters=2, eval_interval=0, checkpoint_factor=2))
    runs = [sweep.make_run(config, seed, tmp_path / "out", ["--log_interval", "1"]) for seed in (1, 2)]
    assert [r.folder.name for r in runs] == ["config_s1", "config_s2"] and runs[0].final_step == 2
    sweep.run_all(runs, jobs=2)
    losses = [train_losses(read_metrics(r.folder / "logs")) for r in runs]
    assert all(len(x) == 2 for x in losses) and losses[0] != losses[1]  # two seeds, two runs
    assert all(r.finished for r in runs)
    capsys.readouterr()
    sweep.run_all(runs, jobs=2)
    assert "2 of 2 runs already finished; 0 to run" in capsys.readouterr().out


def test_a_failing_run_stops_the_sweep_naming_its_log(tmp_path, data_prefix):
    config = str(write_config(tmp_path / "cfg", data_prefix, train_iters=2, data_path=str(tmp_path / "missing")))
    run = sweep.make_run(config, 1, tmp_path / "out", [])
    with pytest.raises(SystemExit, match="config_s1 failed: see .*train.log"):
        sweep.run_all([run])


def test_print_mode_lists_the_commands(tmp_path, data_prefix, capsys):
    config = str(write_config(tmp_path / "cfg", data_prefix))
    sweep.main([config, "--seeds", "2", "--out", str(tmp_path / "out"), "--print", "--train_iters", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "--seed 1235" in lines[1] and "--train_iters 3" in lines[0]
