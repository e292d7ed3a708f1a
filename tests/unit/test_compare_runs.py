"""compare_runs over seeds: grouping of NAME_sSEED runs, means and spreads, paired differences with a t-interval,
checked against hand computations on synthetic metrics."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import compare_runs  # noqa: E402


def write_run(folder: Path, val_losses: list[float], tokens_per_sec: float = 50.0) -> None:
    (folder / "logs").mkdir(parents=True)
    lines = []
    for step in range(1, 11):
        lines.append({"step": step, "loss": 5.0 - 0.1 * step, "lr": 1e-3, "tokens": step * 100,
                      "tokens_per_sec": tokens_per_sec})
        if step % 5 == 0:
            lines.append({"step": step, "val/loss": val_losses[step // 5 - 1], "val/ppl": 1.0})
    (folder / "logs" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))


@pytest.fixture
def sweep(tmp_path):
    base = {1: 3.00, 2: 3.10, 3: 2.95}
    method = {1: 2.90, 2: 3.05, 3: 2.80}
    for seed in (1, 2, 3):
        write_run(tmp_path / "study" / f"baseline_s{seed}", [3.5, base[seed]], tokens_per_sec=50.0)
        write_run(tmp_path / "study" / f"method_s{seed}", [3.4, method[seed]], tokens_per_sec=40.0)
    write_run(tmp_path / "study" / "method_s4", [3.3, 2.70], tokens_per_sec=40.0)  # no baseline partner
    return tmp_path / "study", base, method


def test_groups_and_paired_difference_by_hand(sweep, tmp_path, capsys):
    folder, base, method = sweep
    out = tmp_path / "study.png"
    compare_runs.main([str(folder), "--baseline", "baseline", "--output", str(out)])
    groups = json.loads(out.with_suffix(".json").read_text())
    assert sorted(groups) == ["baseline", "method"]
    assert groups["method"]["seeds"] == [1, 2, 3, 4]
    method_all = [*method.values(), 2.70]
    assert groups["method"]["final_val"]["mean"] == pytest.approx(statistics.fmean(method_all))
    assert groups["method"]["final_val"]["sd"] == pytest.approx(statistics.stdev(method_all))
    assert groups["baseline"]["best_val"]["mean"] == pytest.approx(statistics.fmean(base.values()))
    diffs = [method[s] - base[s] for s in (1, 2, 3)]  # seed 4 has no baseline: not paired
    paired = groups["method"]["minus_baseline"]
    half = 4.302652729911275 * statistics.stdev(diffs) / math.sqrt(3)  # t(0.975, 2 dof)
    assert paired["pairs"] == 3
    assert paired["mean"] == pytest.approx(statistics.fmean(diffs))
    assert (paired["ci_low"], paired["ci_high"]) == pytest.approx((paired["mean"] - half, paired["mean"] + half))
    assert groups["method"]["tokens_per_sec"] == pytest.approx(40.0)
    assert groups["method"]["train_seconds"] == pytest.approx(1000 / 40.0)  # 1000 tokens at 40 tokens/s
    assert "minus_baseline" not in groups["baseline"]
    curve = groups["method"]["curve_minus_baseline"]  # the evaluations at 500 and 1000 tokens, seeds 1-3 paired
    assert curve["baseline"] == "baseline" and curve["tokens"] == [500, 1000] and curve["seeds"] == [1, 2, 3]
    assert curve["mean"] == pytest.approx([3.4 - 3.5, statistics.fmean(diffs)])
    assert curve["sd"] == pytest.approx([0.0, statistics.stdev(diffs)], abs=1e-12)
    assert curve["final"] == pytest.approx({"tokens": 1000, "mean": statistics.fmean(diffs), "pairs": 3,
                                            "sd": statistics.stdev(diffs), "min": min(diffs), "max": max(diffs)})
    assert groups["method"]["val_curve_per_seed"]["4"] == [[500, 1000], [3.3, 2.70]]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "3 pairs" in printed
    assert f"method{' ' * 22}      1000     3{statistics.fmean(diffs):+10.4f}" in printed


def test_unknown_baseline_is_one_line(sweep, tmp_path):
    with pytest.raises(SystemExit, match="--baseline nope: not among the configs"):
        compare_runs.main([str(sweep[0]), "--baseline", "nope", "--output", str(tmp_path / "x.png")])


def test_groups_by_flag_pair_by_seed_against_the_first_config(sweep, tmp_path):
    folder, base, method = sweep
    out = tmp_path / "groups.png"
    compare_runs.main(["--group", f"base={folder / 'baseline_s1'},{folder / 'baseline_s2'}",
                       "--group", f"new={folder / 'method_s2'},{folder / 'method_s1'}", "--output", str(out)])
    groups = json.loads(out.with_suffix(".json").read_text())
    diffs = [method[1] - base[1], method[2] - base[2]]  # paired by seed, not by the order given
    assert groups["new"]["minus_baseline"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert groups["new"]["curve_minus_baseline"]["final"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert "curve_minus_baseline" not in groups["base"]


def test_two_single_runs_pair_across_seeds_read_from_checkpoints(tmp_path):
    for name, seed, losses in (("first", 1234, [4.0, 3.0]), ("second", 7, [3.9, 3.05])):
        write_run(tmp_path / name, losses)
        (tmp_path / name / "global_step10").mkdir()
        (tmp_path / name / "global_step10" / "config.yml").write_text(json.dumps(
            {"seed": seed, "tokenizer_type": "CharLevelTokenizer", "num_layers": 2, "hidden_size": 32,
             "num_attention_heads": 2, "seq_length": 16, "max_position_embeddings": 16}))
    out = tmp_path / "two.png"
    summaries = compare_runs.main([str(tmp_path / "first"), str(tmp_path / "second"), "--output", str(out)])
    assert [s["seed"] for s in summaries] == [1234, 7]
    curve = json.loads(out.with_suffix(".json").read_text())["second"]["curve_minus_baseline"]
    assert curve["baseline"] == "first" and curve["pairs"] == 1
    assert curve["mean"] == pytest.approx([-0.1, 0.05])


def add_task_scores(folder: Path, scores: dict[str, float], step: int = 10) -> None:
    """An eval_tasks record (as the training loop logs it) at `step`, after an earlier one that must not count."""
    with open(folder / "logs" / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps({"step": step // 2, **{f"lm_eval/{k}": 0.0 for k in scores}, "lm_eval/seconds": 1}))
        f.write("\n" + json.dumps({"step": step, **{f"lm_eval/{k}": v for k, v in scores.items()},
                                   "lm_eval/seconds": 2.0}))


def test_task_scores_per_config_and_paired_by_seed(sweep, tmp_path, capsys):
    """--tasks: the last lm_eval records of each run (an eval_tasks.json from tools/eval_tasks.py wins), mean and
    sd over seeds, and the seed-paired difference with its t-interval, as for the loss; a table and a plot."""
    folder, _, _ = sweep
    base_acc, method_acc = {1: 0.50, 2: 0.55, 3: 0.40}, {1: 0.60, 2: 0.58, 3: 0.52}
    for seed in (1, 2, 3):
        add_task_scores(folder / f"baseline_s{seed}", {"next_line/acc": base_acc[seed], "passages/bits_per_byte": 2.0})
        add_task_scores(folder / f"method_s{seed}", {"next_line/acc": 0.0, "passages/bits_per_byte": 1.9 + seed / 100})
        results = {"results": {"next_line": {"alias": "next_line", "acc,none": method_acc[seed],
                                             "acc_stderr,none": 0.1}}}
        (folder / f"method_s{seed}" / "eval_tasks.json").write_text(json.dumps(results))
    out = tmp_path / "tasks.png"
    compare_runs.main([str(folder), "--baseline", "baseline", "--output", str(out), "--tasks", "next_line,passages"])
    groups = json.loads(out.with_suffix(".json").read_text())
    acc = groups["method"]["tasks"]["next_line/acc"]
    assert [acc["per_seed"][s] for s in "123"] == [0.60, 0.58, 0.52] and math.isnan(acc["per_seed"]["4"])
    assert acc["mean"] == pytest.approx(statistics.fmean(method_acc.values()))  # seed 4 has no scores: left out
    diffs = [method_acc[s] - base_acc[s] for s in (1, 2, 3)]
    half = 4.302652729911275 * statistics.stdev(diffs) / math.sqrt(3)
    paired = acc["minus_baseline"]
    assert paired["pairs"] == 3 and paired["mean"] == pytest.approx(statistics.fmean(diffs))
    assert (paired["ci_low"], paired["ci_high"]) == pytest.approx((paired["mean"] - half, paired["mean"] + half))
    bpb = groups["method"]["tasks"]["passages/bits_per_byte"]["minus_baseline"]
    assert bpb["mean"] == pytest.approx(-0.08) and sorted(groups["baseline"]["tasks"]) == ["next_line/acc",
                                                                                         "passages/bits_per_byte"]
    assert "minus_baseline" not in groups["baseline"]["tasks"]["next_line/acc"]
    printed = capsys.readouterr().out
    assert f"{paired['mean']:+.4f} ({paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}), 3 pairs" in printed
    assert tmp_path.joinpath("tasks_tasks.png").stat().st_size > 0
    with pytest.raises(SystemExit, match=r"^compare_runs: --tasks piqa: no run has it \(expected lm_eval/piqa/"):
        compare_runs.main([str(folder), "--output", str(out), "--tasks", "piqa"])
