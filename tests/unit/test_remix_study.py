"""tools/remix_study.py on hand-written sweep folders: means, spreads, paired differences and coefficient shape
against hand computations."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import remix_study  # noqa: E402


def write_run(folder: Path, losses: list[float], fd: float, intervals: list[float]) -> None:
    """A run folder whose metrics.jsonl holds a training record and one evaluation per entry of `losses`."""
    (folder / "logs").mkdir(parents=True)
    records = [{"step": 1, "loss": 9.0}]
    for i, loss in enumerate(losses):
        record = {"step": 100 * (i + 1), "val/loss": loss, "val/fd": fd + i}
        record.update({f"val/loss_t{j}": v for j, v in enumerate(intervals)})
        records.append(record)
    (folder / "logs" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


@pytest.fixture
def sweep(tmp_path):
    main, other = tmp_path / "study", tmp_path / "noprior"
    write_run(main / "plain_s1", [0.5, 0.30], 100.0, [0.6, 0.2])
    write_run(main / "plain_s2", [0.5, 0.40], 110.0, [0.8, 0.2])
    write_run(main / "remix_s1", [0.5, 0.35], 120.0, [0.6, 0.1])
    write_run(main / "remix_s2", [0.5, 0.41], 140.0, [0.6, 0.3])
    write_run(main / "remix_s3", [0.5, 0.50], 150.0, [0.6, 0.3])  # no baseline partner: left out of the pairs
    write_run(other / "remix_s1", [0.2], 90.0, [0.3, 0.1])
    (main / "notes").mkdir()  # not a NAME_sSEED folder: ignored
    return main, other


def test_means_spreads_and_pairs_by_hand(sweep):
    configs = remix_study.collect(list(sweep))
    assert sorted(configs) == ["plain", "remix@noprior", "remix@study"]  # remix swept in two folders
    summary = remix_study.summarise(configs, "plain")
    plain, remix = summary["plain"], summary["remix@study"]
    # the last evaluation counts: 0.30 and 0.40 (FD 101, 111 as the fd of evaluation i is fd + i)
    assert plain["val_loss"]["mean"] == pytest.approx(0.35)
    assert plain["val_loss"]["std"] == pytest.approx(np.std([0.30, 0.40], ddof=1))
    assert plain["fd"]["mean"] == pytest.approx(106.0)
    assert remix["seeds"] == [1, 2, 3]
    assert remix["val_loss"]["mean"] == pytest.approx((0.35 + 0.41 + 0.50) / 3)
    pairs = remix["val_loss"]["minus_baseline"]  # seeds 1 and 2: +0.05 and +0.01
    assert pairs["pairs"] == 2
    assert pairs["mean"] == pytest.approx(0.03)
    assert pairs["std"] == pytest.approx(np.std([0.05, 0.01], ddof=1))
    assert remix["fd"]["minus_baseline"]["mean"] == pytest.approx(((121 - 101) + (141 - 111)) / 2)
    assert summary["remix@noprior"]["val_loss"]["minus_baseline"]["pairs"] == 1
    assert plain["interval_loss_mean"] == pytest.approx([0.7, 0.2])
    assert "minus_baseline" not in plain["val_loss"]


def test_coefficient_shape_by_hand():
    # 4 experts: rows 0, 1 alike, rows 2, 3 alike; first quarter (1 expert) peaks at 1.0, last at 0.6
    table = np.array([[1.0, 0.0], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    shape = remix_study.coefficient_shape(table)
    l1 = lambda a, b: np.abs(table[a] - table[b]).sum()  # noqa: E731
    neighbours = np.mean([l1(0, 1), l1(1, 2), l1(2, 3)])
    pairs = np.mean([l1(a, b) for a in range(4) for b in range(a + 1, 4)])
    assert shape["neighbour_ratio"] == pytest.approx(neighbours / pairs)
    assert shape["peak_near_t0"] == pytest.approx(1.0)
    assert shape["peak_near_tT"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="at least 3"):
        remix_study.coefficient_shape(table[:2])


def test_command_line_writes_plot_and_json(sweep, tmp_path, capsys):
    output = tmp_path / "out" / "study.png"
    remix_study.main([str(p) for p in sweep] + ["--baseline", "plain", "--output", str(output), "--no-coefficients"])
    assert output.stat().st_size > 0
    saved = json.loads(output.with_suffix(".json").read_text())
    assert saved["remix@study"]["val_loss"]["minus_baseline"]["mean"] == pytest.approx(0.03)
    assert "remix@noprior" in capsys.readouterr().out


def test_bad_baseline_and_empty_folder_are_one_line_errors(sweep, tmp_path):
    with pytest.raises(SystemExit, match="--baseline nope: not among the configs"):
        remix_study.main([str(sweep[0]), "--baseline", "nope", "--output", str(tmp_path / "x.png"),
                          "--no-coefficients"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no NAME_sSEED run folders"):
        remix_study.main([str(tmp_path / "empty"), "--output", str(tmp_path / "y.png")])


def test_run_without_evaluation_is_skipped(sweep, capsys):
    main, _ = sweep
    (main / "remix_s4" / "logs").mkdir(parents=True)
    (main / "remix_s4" / "logs" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    configs = remix_study.collect([main])
    assert sorted(configs["remix"].runs) == [1, 2, 3]
    assert "remix_s4" in capsys.readouterr().err
