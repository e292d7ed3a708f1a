"""tools/paired_differences.py: seed-paired curve differences against a hand-computed example, the pairing rules,
the band and the y-range, and what the difference panel draws."""

import sys
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import paired_differences as pdiff  # noqa: E402

TOKENS = [100, 200, 300]
BASELINE = {1: (TOKENS, [5.0, 4.0, 3.0]), 2: (TOKENS, [5.2, 4.1, 3.2]),
            3: (TOKENS + [400], [5.1, 4.2, 3.1, 3.0])}  # seed 3 evaluated once more: not a common point
METHOD = {1: (TOKENS, [5.0, 4.0, 2.9]), 2: (TOKENS, [5.2, 4.0, 3.1]), 3: (TOKENS, [4.8, 4.0, 3.0]),
          4: (TOKENS, [1.0, 1.0, 1.0])}  # seed 4 has no baseline partner: left out
# by hand, method - baseline per seed: s1 (0, 0, -0.1), s2 (0, -0.1, -0.1), s3 (-0.3, -0.2, -0.1)
SD_AT_100 = 0.03 ** 0.5  # sample sd of (0, 0, -0.3) about their mean -0.1: sqrt((0.01 + 0.01 + 0.04) / 2)


def test_curve_difference_by_hand():
    d = pdiff.curve_difference(METHOD, BASELINE)
    assert d["pairs"] == 3 and d["seeds"] == [1, 2, 3] and d["tokens"] == TOKENS
    assert d["per_seed"][2] == pytest.approx([0.0, -0.1, -0.1], abs=1e-12)
    assert d["mean"] == pytest.approx([-0.1, -0.1, -0.1])
    assert d["sd"] == pytest.approx([SD_AT_100, 0.1, 0.0], abs=1e-12)  # sample sd of (0, -0.1, -0.2) is 0.1
    assert d["min"] == pytest.approx([-0.3, -0.2, -0.1]) and d["max"] == pytest.approx([0.0, 0.0, -0.1], abs=1e-12)
    assert d["final"] == pytest.approx({"tokens": 300, "mean": -0.1, "sd": 0.0, "min": -0.1, "max": -0.1,
                                        "pairs": 3}, abs=1e-12)
    assert pdiff.band(d, "sd") == (pytest.approx([-0.1 - SD_AT_100, -0.2, -0.1]),
                                   pytest.approx([-0.1 + SD_AT_100, 0.0, -0.1], abs=1e-12))
    assert pdiff.band(d, "range") == (d["min"], d["max"])


def test_pairing_rules():
    single_a, single_b = {1234: (TOKENS, [3.0, 2.0, 1.5])}, {7: (TOKENS[1:], [2.5, 1.0])}
    d = pdiff.curve_difference(single_b, single_a)  # one run against one, other seeds: paired anyway
    assert d["pairs"] == 1 and d["tokens"] == [200, 300] and d["mean"] == pytest.approx([0.5, -0.5])
    assert d["sd"] == [0.0, 0.0]
    assert pdiff.curve_difference({1: METHOD[1], 2: METHOD[2]}, {3: BASELINE[3], 4: BASELINE[1]}) is None
    final = pdiff.paired_difference({1: 2.9, 2: 3.1, 5: 0.0}, {1: 3.0, 2: 3.0})
    assert final["pairs"] == 2 and final["mean"] == pytest.approx(0.0)
    assert final["sd"] == pytest.approx(0.1 * 2 ** 0.5)  # sample sd of (-0.1, +0.1); seed 5 has no partner
    half = 12.706204736174698 * final["sd"] / 2 ** 0.5  # t(0.975, 1 dof)
    assert (final["ci_low"], final["ci_high"]) == pytest.approx((-half, half), rel=1e-4)


def test_tail_limits_leave_out_the_first_fifth():
    series = [([0, 10, 50, 100], [9.0, 6.0, 4.0, 3.0])]  # x = 10 is before 20% of 100: its 6.0 does not count
    low, high = pdiff.tail_limits(series)
    assert (low, high) == pytest.approx((3.0 - 0.05, 4.0 + 0.05))
    assert pdiff.tail_limits(series, include=[0.0]) == pytest.approx((-0.2, 4.2))


def test_difference_panel_draws_mean_band_and_zero_line():
    d = pdiff.curve_difference(METHOD, BASELINE)
    fig, ax = plt.subplots()
    pdiff.draw_differences(ax, {"method": d}, "baseline", {"method": "C1"})
    zero, mean_line = ax.get_lines()
    assert list(zero.get_ydata()) == [0.0, 0.0]
    assert list(mean_line.get_xdata()) == TOKENS and list(mean_line.get_ydata()) == pytest.approx(d["mean"])
    band_y = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert (band_y.min(), band_y.max()) == pytest.approx((-0.1 - SD_AT_100, -0.1 + SD_AT_100))  # mean ± sd
    low, high = ax.get_ylim()
    assert low < -0.1 - SD_AT_100 and high > -0.1 + SD_AT_100 and high - low < 0.5  # differences' scale, not losses'
    assert "final -0.1000 ± 0.0000 sd, 3 seed pairs" in ax.get_legend().get_texts()[1].get_text()
    plt.close(fig)


def test_difference_panel_scale_ignores_the_first_steps():
    x = [10, 100, 200, 300]  # x = 10 is before 20% of training: its -5 would flatten the rest
    d = pdiff.curve_difference({1: (x, [4.0, 4.01, 3.52, 3.01])}, {1: (x, [9.0, 4.0, 3.5, 3.0])})
    fig, ax = plt.subplots()
    pdiff.draw_differences(ax, {"method": d}, "baseline", {"method": "C1"})
    low, high = ax.get_ylim()
    assert -0.01 < low < 0.0 and 0.02 < high < 0.03  # zero and the three later differences (0.01, 0.02, 0.01)
    plt.close(fig)
