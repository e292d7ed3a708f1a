"""Pre-emption: SIGTERM and SIGUSR1 ask the run to save a checkpoint at the next step boundary and exit 0.

Clusters warn before they take a job: SLURM sends SIGUSR1 ahead of its time limit with `--signal=USR1@120`
(launch/slurm.sbatch) and SIGTERM when it pre-empts; Kubernetes and torchrun's elastic agent send SIGTERM.
A handler only records the signal; the trainer folds the flag into the step's metrics all-reduce, so every
rank learns that some rank was signalled in the same step and all stop at that step together. A second
signal while the checkpoint is being written only sets the flag again: the save runs to its end (and is
atomic anyway, so even a SIGKILL then leaves the previous checkpoint and `latest` intact).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger("megatron.signals")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records SIGTERM/SIGUSR1 between `install` and `restore`; `requested` is the flag the trainer reads."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signal.Signals(signum)
        if first:
            log.warning("received %s: saving a checkpoint at the end of this step, then exiting", self.received.name)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """The handlers that were there before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
