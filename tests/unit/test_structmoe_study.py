"""tools/structmoe_study.py's analysis on synthetic sweeps: which runs count as finished, the paired verdicts
and the final load entropies, against hand computations."""

import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import structmoe_study  # noqa: E402

FINAL = {  # arm: final validation loss per seed
    "tiny_moe_matched": {1234: 4.80, 1235: 4.85, 1236: 4.78},
    "tiny_structmoe": {1234: 4.70, 1235: 4.76, 1236: 4.69},  # 0.10, 0.09, 0.09 below: a difference
    "tiny_structmoe_standalone": {1234: 4.75, 1235: 4.70, 1236: 4.74},  # +-: no difference shown
}
LORE_ENTROPY = {"tiny_structmoe": [0.9, 0.4], "tiny_structmoe_standalone": None}


def write_run(folder: Path, final: float, lore: list[float] | None) -> None:
    (folder / "logs").mkdir(parents=True)
    (folder / "global_step600").mkdir()  # what sweep.py checks for a finished run
    records = []
    for i, step in enumerate((300, 600)):
        record = {"step": step, "loss": 5.0, "tokens": step * 2048, "tokens_per_sec": 1000.0,
                  "moe/layer1/expert_load_entropy": 0.99, "moe/layer3/expert_load_entropy": 0.97}
        if lore:
            record |= {"moe/layer1/lore_load_entropy": lore[i], "moe/layer3/lore_load_entropy": lore[i] - 0.1}
        records += [record, {"step": step, "val/loss": final + 0.5 * (i == 0), "val/ppl": 1.0}]
    (folder / "logs" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))


def test_study_analysis_by_hand(tmp_path, capsys):
    runs = tmp_path / "runs"
    for arm, finals in FINAL.items():
        for seed, final in finals.items():
            write_run(runs / f"{arm}_s{seed}", final, LORE_ENTROPY.get(arm))
    (runs / "tiny_moe_s1234" / "logs").mkdir(parents=True)  # started, not finished: left out
    result = structmoe_study.main(["--analyse-only", "--runs", str(runs), "--out", str(tmp_path / "out"),
                                   "--sequences", "0"])
    assert sorted(result["groups"]) == sorted(FINAL)
    pairs = {(r["method"], r["baseline"]): r for r in result["pairs"]}
    vs_matched = pairs[("tiny_structmoe", "tiny_moe_matched")]
    diffs = [FINAL["tiny_structmoe"][s] - FINAL["tiny_moe_matched"][s] for s in (1234, 1235, 1236)]
    assert vs_matched["mean"] == pytest.approx(statistics.fmean(diffs))
    assert vs_matched["verdict"] == "lower"
    assert pairs[("tiny_structmoe", "tiny_structmoe_standalone")]["verdict"] == "no difference shown"
    assert ("tiny_structmoe", "tiny_moe") not in pairs  # tiny_moe never finished
    assert result["final_loads"]["tiny_structmoe"]["lore"] == pytest.approx((0.4 + 0.3) / 2)
    assert result["final_loads"]["tiny_structmoe"]["expert"] == pytest.approx(0.98)
    for name in ("structmoe_study.png", "structmoe_study_pairs.png", "structmoe_study_lore_load.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "out" / "structmoe_study.md").read_text()
    assert "| 2 StructMoE (entangled) | `tiny_structmoe` | 3 |" in table
    assert "StructMoE < matched baseline" in capsys.readouterr().out
    curve = result["curve_differences"]["tiny_structmoe"]  # drawn against the matched baseline, seed by seed
    assert curve["baseline"] == "tiny_moe_matched" and curve["tokens"] == [300 * 2048, 600 * 2048]
    assert curve["mean"] == pytest.approx([statistics.fmean(diffs)] * 2)
    assert curve["sd"] == pytest.approx([statistics.stdev(diffs)] * 2)
    standalone = result["curve_differences"]["tiny_structmoe_standalone"]  # its panel's baseline is StructMoE
    assert standalone["baseline"] == "tiny_structmoe"
    assert standalone["final"]["mean"] == pytest.approx(statistics.fmean(
        FINAL["tiny_structmoe_standalone"][s] - FINAL["tiny_structmoe"][s] for s in (1234, 1235, 1236)))
    assert result["load_curves"]["tiny_structmoe"]["lore"] == [[300, 600], pytest.approx([0.85, 0.35])]


def test_redraw_from_the_json_alone(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    for arm, finals in FINAL.items():
        for seed, final in finals.items():
            write_run(runs / f"{arm}_s{seed}", final, LORE_ENTROPY.get(arm))
    structmoe_study.main(["--analyse-only", "--runs", str(runs), "--out", str(out), "--sequences", "0"])
    names = ["structmoe_study.png", "structmoe_study_pairs.png", "structmoe_study_lore_load.png"]
    for name in names:
        (out / name).unlink()
    shutil.rmtree(runs)
    assert sorted(structmoe_study.main(["--redraw", "--out", str(out)])["redrawn"]) == sorted(names)
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in names)
    result = json.loads((out / "structmoe_study.json").read_text())  # as analyses before the curves were kept
    for group in result["groups"].values():
        del group["val_curve_per_seed"]
    del result["load_curves"]
    (out / "structmoe_study.json").write_text(json.dumps(result))
    capsys.readouterr()
    assert structmoe_study.main(["--redraw", "--out", str(out)])["redrawn"] == ["structmoe_study_pairs.png"]
    assert "the JSON has no per-seed curves" in capsys.readouterr().out


ACC = {  # arm: a local task's accuracy per seed
    "tiny_moe_matched": {1234: 0.50, 1235: 0.40, 1236: 0.45},
    "tiny_structmoe": {1234: 0.55, 1235: 0.48, 1236: 0.47},  # +0.05, +0.08, +0.02 over the baseline's seed
    "tiny_structmoe_standalone": {1234: 0.44, 1235: 0.46, 1236: 0.45},
}


def eval_json(accuracy: float) -> str:
    """What tools/eval_tasks.py writes, as much as the comparison reads."""
    return json.dumps({"results": {"next_line": {"alias": "next_line", "acc,none": accuracy,
                                                  "acc_stderr,none": 0.01}}})


def test_study_tasks_evaluate_each_run_once_and_pair_the_scores_by_seed(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    for arm, finals in FINAL.items():
        for seed, final in finals.items():
            write_run(runs / f"{arm}_s{seed}", final, LORE_ENTROPY.get(arm))
    (runs / "tiny_structmoe_s1234" / "eval_tasks.json").write_text(eval_json(ACC["tiny_structmoe"][1234]))
    import eval_tasks

    calls = []

    def evaluate(argv):  # stands in for the evaluation of a checkpoint: the arm and seed's known score
        folder = Path(argv[0])
        arm, seed = folder.name.rsplit("_s", 1)
        calls.append((folder.name, argv[argv.index("--tasks") + 1], argv[argv.index("--limit") + 1],
                      argv[argv.index("--include_path") + 1]))
        Path(argv[argv.index("--output") + 1]).write_text(eval_json(ACC[arm][int(seed)]))

    monkeypatch.setattr(eval_tasks, "main", evaluate)
    args = ["--analyse-only", "--runs", str(runs), "--out", str(tmp_path / "out"), "--sequences", "0",
            "--tasks", "next_line/acc", "--tasks-limit", "20", "--include-path", "tests/data/lm_eval_tasks"]
    result = structmoe_study.main(args)
    assert len(calls) == 8 and "tiny_structmoe_s1234" not in [c[0] for c in calls]  # its file is reused
    assert {c[1:] for c in calls} == {("next_line", "20.0", "tests/data/lm_eval_tasks")}
    assert result["task_metrics"] == ["next_line/acc"]
    for arm, scores in ACC.items():
        entry = result["groups"][arm]["tasks"]["next_line/acc"]
        assert entry["mean"] == pytest.approx(statistics.mean(scores.values()))
    paired = result["groups"]["tiny_structmoe"]["tasks"]["next_line/acc"]["minus_baseline"]
    diffs = [ACC["tiny_structmoe"][s] - ACC["tiny_moe_matched"][s] for s in (1234, 1235, 1236)]
    assert paired["mean"] == pytest.approx(statistics.mean(diffs)) and paired["pairs"] == 3
    assert paired["sd"] == pytest.approx(statistics.stdev(diffs))
    assert (tmp_path / "out" / "structmoe_study_tasks.png").is_file()
    assert "downstream tasks" in capsys.readouterr().out
    calls.clear()
    structmoe_study.main(args)  # a second analysis evaluates nothing again
    assert calls == []
