"""Routing health: warn when an expert (or a LoRE) starves, or a layer's routing collapses onto a few experts.

Shape legend: E experts, M LoREs per expert.

A dead expert is one whose share of the token assignments stays below `min_share` x its fair share (1/E) for
`patience` log intervals in a row; a dead LoRE likewise within its expert's rows (fair share 1/M). A collapsed
layer is one whose normalised load entropy (1: balanced, 0: one expert takes all) is below `min_entropy`. Each
condition is logged once when it starts and once when it ends, so a healthy run prints nothing; the counts go to
the metrics every interval (`moe/dead_experts`, `moe/dead_lores`, `moe/collapsed_layers`).

It reads the global batch's loads (the same on every rank), so its state is too: the streaks and verdicts are part
of the checkpoint (`state_dict`), and a run resumed at any layout counts on where it stopped.

With expert parallelism, a layer whose busiest EP rank received more than `receive_factor` x its group's mean
rows at some step of the interval (`moe/layer{i}/max_rank_rows_over_mean`) is warned about once per interval
while it lasts: it is not a state that ends by itself, and a dropless layer's memory on that rank grows with it.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Any

log = logging.getLogger("megatron.routing")
LAYER_KEY = re.compile(r"^moe/layer(\d+)/(expert_load|lore_load|expert_load_entropy)$")
RECEIVED_KEY = re.compile(r"^moe/layer(\d+)/max_rank_rows_over_mean$")


class RoutingHealth:
    def __init__(self, min_share: float = 0.1, patience: int = 3, min_entropy: float = 0.5,
                 receive_factor: float = 0.0):
        """`receive_factor`: warn when an EP rank received more than this x the mean rows; 0: never."""
        self.min_share, self.patience, self.min_entropy = min_share, patience, min_entropy
        self.receive_factor = receive_factor
        self.low_streak: dict[tuple, int] = defaultdict(int)  # (layer, expert[, lore]) -> intervals below
        self.dead: set[tuple] = set()
        self.collapsed: set[int] = set()

    def update(self, step: int, routing: dict[str, Any]) -> dict[str, float]:
        """Reads one interval's routing statistics (moe/stats.py's keys); returns the health metrics."""
        if not routing or not any(LAYER_KEY.match(key) for key in routing):
            return {}
        self._crowded_ranks(step, routing)
        seen: set[tuple] = set()
        for key, value in routing.items():
            match = LAYER_KEY.match(key)
            if not match:
                continue
            layer, kind = int(match[1]), match[2]
            if kind == "expert_load" and self.min_share > 0:
                seen |= self._starving(step, (layer,), value, "expert")
            elif kind == "lore_load" and self.min_share > 0:
                for expert, row in enumerate(value):
                    if sum(row) > 0:  # an expert with no rows this interval (held on another rank) says nothing
                        seen |= self._starving(step, (layer, expert), row, "LoRE")
            elif kind == "expert_load_entropy" and self.min_entropy > 0:
                self._collapse(step, layer, float(value))
        for unit in [u for u in self.low_streak if u not in seen]:  # recovered
            del self.low_streak[unit]
            if unit in self.dead:
                self.dead.discard(unit)
                log.info("step %d: %s recovered its share of the tokens", step, describe(unit))
        return {"moe/dead_experts": float(sum(len(u) == 2 for u in self.dead)),
                "moe/dead_lores": float(sum(len(u) == 3 for u in self.dead)),
                "moe/collapsed_layers": float(len(self.collapsed))}

    def _starving(self, step: int, prefix: tuple, shares: list[float], kind: str) -> set[tuple]:
        fair = 1.0 / len(shares)
        low = set()
        for i, share in enumerate(shares):
            if share >= self.min_share * fair:
                continue
            unit = (*prefix, i)
            low.add(unit)
            self.low_streak[unit] += 1
            if self.low_streak[unit] >= self.patience and unit not in self.dead:
                self.dead.add(unit)
                log.warning("step %d: %s is dead: %.4f of the tokens, below %.2f x its fair share %.4f for %d log "
                            "intervals", step, describe(unit), share, self.min_share, fair, self.low_streak[unit])
        return low

    def _crowded_ranks(self, step: int, routing: dict[str, Any]) -> None:
        for key, value in routing.items():
            match = RECEIVED_KEY.match(key)
            if match and self.receive_factor > 0 and value > self.receive_factor:
                log.warning("step %d: MoE layer %s: an expert-parallel rank received %.1f x the mean rows of its EP "
                            "group (above moe_receive_warning_factor %g): routing piles tokens onto its experts, and "
                            "their activation memory grows with it (moe_token_dropping bounds it)",
                            step, match[1], value, self.receive_factor)

    def _collapse(self, step: int, layer: int, entropy: float) -> None:
        if entropy < self.min_entropy and layer not in self.collapsed:
            self.collapsed.add(layer)
            log.warning("step %d: MoE layer %d's routing collapsed: load entropy %.3f below %.2f (1 is balanced)",
                        step, layer, entropy, self.min_entropy)
        elif entropy >= self.min_entropy and layer in self.collapsed:
            self.collapsed.discard(layer)
            log.info("step %d: MoE layer %d's routing recovered (load entropy %.3f)", step, layer, entropy)


    def state_dict(self) -> dict[str, list]:
        """The streaks and verdicts as plain lists of ints (checkpoints load with `weights_only=True`)."""
        return {"low_streak": [[*unit, streak] for unit, streak in sorted(self.low_streak.items())],
                "dead": [list(unit) for unit in sorted(self.dead)], "collapsed": sorted(self.collapsed)}

    def load_state_dict(self, state: dict[str, list]) -> None:
        self.low_streak = defaultdict(int, {tuple(entry[:-1]): entry[-1] for entry in state["low_streak"]})
        self.dead = {tuple(unit) for unit in state["dead"]}
        self.collapsed = set(state["collapsed"])


def describe(unit: tuple) -> str:
    return f"expert {unit[1]} of MoE layer {unit[0]}" if len(unit) == 2 else (
        f"LoRE {unit[2]} of expert {unit[1]} in MoE layer {unit[0]}")
