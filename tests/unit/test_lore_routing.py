"""tools/lore_routing.py's measurements against hand computations on a LoRE bank with a planted common direction."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import lore_routing  # noqa: E402

from megatron.model.moe.lore import LoREBank  # noqa: E402


def test_common_direction_dominates_and_centring_rebalances():
    torch.manual_seed(0)
    E, M, D, rows = 2, 4, 8, 400
    bank = LoREBank(E, M, 2, D, 16, top_l=1, mode="entangled")
    with torch.no_grad():
        bank.router.weight.copy_(torch.randn(E * M, D))
    common = torch.zeros(D)
    common[0] = 12.0  # every row shares a large component along dimension 0
    x = common + 0.5 * torch.randn(E * rows, D)
    counts = torch.tensor([rows, rows])
    result = lore_routing.analyse_layer(bank, x, counts)

    w = bank.router.weight.detach().view(E, M, D)
    shares, ratios = [], []
    for e in range(E):
        part = x[e * rows:(e + 1) * rows]
        mu = part.mean(0)
        shares.append(float(mu.square().sum() / part.square().sum(1).mean()))
        ratios.append(float((w[e] @ mu).std() / ((part - mu) @ w[e].T).std(dim=1).mean()))
    assert result["experts"] == 2
    assert result["mean_share"] == pytest.approx(sum(shares) / 2, rel=1e-5)
    assert result["offset_over_content"] == pytest.approx(sum(ratios) / 2, rel=1e-5)
    assert result["offset_over_content"] > 3  # the planted direction dominates the router's choice...
    assert result["entropy_trained"] < 0.3 < 0.8 < result["entropy_centred"]  # ...and centring undoes it
