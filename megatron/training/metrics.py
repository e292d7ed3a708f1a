"""Metric sinks: stdout, `LOG_DIR/metrics.jsonl`, TensorBoard and wandb, all fed by one `log` call.

`metrics.jsonl` is a stable format that tools read: one JSON object per line with `step` and the
values. Training records carry `loss` (LM loss), `lr`, `tokens` and `tokens_per_sec`; evaluation
records carry `val/loss` and `val/ppl`. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("megatron")


def setup_console_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


def ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricsLogger:
    def __init__(
        self,
        enabled: bool,
        log_dir: str | None,
        tensorboard_dir: str | None = None,
        use_wandb: bool = False,
        wandb_project: str = "neox",
        wandb_group: str | None = None,
        wandb_mode: str = "offline",
        run_config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.write_failed = False
        self.jsonl = None
        self.tensorboard = None
        self.wandb_run = None
        if not enabled:
            return
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            path = Path(log_dir) / "metrics.jsonl"
            self.jsonl = open(path, "a", buffering=1)
            if path.stat().st_size and not ends_with_newline(path):  # a record cut by a kill stays on its own line
                self.jsonl.write("\n")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(tensorboard_dir)
        if use_wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(project=wandb_project, group=wandb_group, mode=wandb_mode,
                                        dir=log_dir or ".", config=run_config or {})

    def log(self, step: int, metrics: dict[str, Any], echo: bool = True) -> None:
        """Writes one record; lists (e.g. per-expert load) go to jsonl/wandb but not TensorBoard scalars."""
        if not self.enabled:
            return
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        try:
            if self.jsonl is not None:
                self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            if self.tensorboard is not None:
                for key, value in scalars.items():
                    self.tensorboard.add_scalar(key, value, step)
            if self.write_failed:
                log.warning("metrics: writing works again at step %d", step)
            self.write_failed = False
        except OSError as err:  # a full disk (the shipped configs keep log_dir in the save folder): as for checkpoints,
            if not self.write_failed:  # training goes on; the records are lost until writing works again
                log.warning("metrics: writing failed at step %d (%s); training goes on, records are dropped until "
                            "writing works again", step, err.strerror or err)
            self.write_failed = True
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if echo:
            shown = " | ".join(f"{k} {format_value(v)}" for k, v in scalars.items() if "/layer" not in k)
            log.info("step %d | %s", step, shown)

    def close(self) -> None:
        if self.jsonl is not None:
            with contextlib.suppress(OSError):  # a record still buffered on a full disk is lost, not the run
                self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class LossSpikeDetector:
    """Flags a logged loss above `factor` x the median of the last `window` logged losses.

    It reads the per-interval mean, not single steps: Remix-DiT's per-step loss depends on the drawn timestep
    interval (0.001 to 0.5), which would trip a per-step detector constantly; an interval's mean is stable.
    """

    def __init__(self, factor: float = 3.0, window: int = 50, min_history: int = 5):
        self.factor, self.window, self.min_history = factor, window, min_history
        self.history: list[float] = []

    def is_spike(self, loss: float) -> bool:
        if self.factor <= 0 or not math.isfinite(loss):
            return False
        spike = len(self.history) >= self.min_history and loss > self.factor * statistics.median(self.history)
        if not spike:  # a spike does not raise the bar for the next one
            self.history = (self.history + [loss])[-self.window:]
        return spike

    def state_dict(self) -> dict[str, list[float]]:
        """The window is history: checkpointed, so a resumed run flags the spikes the uninterrupted one does."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.history = [float(loss) for loss in state["history"]][-self.window:]
