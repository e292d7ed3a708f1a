"""Stopping a run by signal: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) save a checkpoint at the next step boundary and
exit 0.

Clusters warn before they take a job: SLURM sends SIGUSR1 ahead of its time limit with `--signal=USR1@120`
(launch/slurm.sbatch) and SIGTERM when it pre-empts; Kubernetes sends SIGTERM; a person presses Ctrl-C (SIGINT).
All three mean the same: a handler only records the signal; the trainer folds the flag into the step's metrics
all-reduce, so every rank learns that some rank was signalled in the same step and all stop at that step together.

The policy for more signals:
- a second signal (any of the three) only logs a line: the save under way runs to its end, and the run exits 0;
- a third signal, when it is SIGINT, stops the process at once (exit 130) with one line saying that the checkpoint
  being written was abandoned; saves are atomic, so the previous checkpoint and `latest` are intact.
Outside the training loop (building the model, loading data or a checkpoint, after the last step) there is nothing
to save: there SIGINT stops the run at once with one line and exit 130 (`ctrl_c_exits`).

Under torchrun the workers run in sessions of their own, so a Ctrl-C at the terminal reaches the agent only; the
agent (torch.distributed.elastic's `_terminate_process_handler`, then `_shutdown(SIGINT)`) sends SIGINT to every
worker and SIGKILLs those still running after `--shutdown_timeout` (30 s unless set), so a save that takes longer
is lost (the previous checkpoint stays intact). A second Ctrl-C makes the agent send SIGTERM, a second signal here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("megatron.signals")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
ABANDON_AT = 3  # the third signal, when it is SIGINT, stops the process without finishing the save
INTERRUPTED_EXIT = 130  # 128 + SIGINT: what a shell reports for a Ctrl-C


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # Python runs handlers on the main thread only


class StopRequest:
    """Records SIGTERM/SIGUSR1/SIGINT between `install` and `restore`; `requested` is the flag the trainer reads.

    `describe_checkpoints` says, for the line of a third SIGINT, which checkpoint is being written and which one
    `latest` names."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
                 describe_checkpoints: Callable[[], str] | None = None):
        self.signals = signals
        self.describe_checkpoints = describe_checkpoints
        self.received: signal.Signals | None = None  # the first signal
        self.count = 0  # signals received, the first one included
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        self.count += 1
        if self.received is None:
            self.received = sig
            log.warning("received %s: saving a checkpoint at the end of this step, then exiting", sig.name)
        elif sig == signal.SIGINT and self.count >= ABANDON_AT:
            self.abandon(sig)
        else:
            log.warning("received %s again: already stopping; the checkpoint is saved first%s", sig.name,
                        " (one more Ctrl-C stops at once without it)" if self.count == ABANDON_AT - 1 else "")

    def abandon(self, sig: signal.Signals) -> None:
        """Ends the process now, with one line. Not an exception: raised from a handler it would land wherever the
        main thread is: inside DCP, which turns it into a failed save of its own (exit 5); in the wait for a
        background save, whose writer thread the interpreter still joins before it exits; or between two ranks'
        collectives. Exiting leaves what a SIGKILL leaves, and every save is atomic for exactly that."""
        described = self.describe_checkpoints() if self.describe_checkpoints else "no checkpoint is kept by this run"
        for stream in (sys.stdout, sys.stderr):  # the log lines already printed; never the reason to hang or fail
            with contextlib.suppress(Exception):
                stream.flush()
        # a line of its own, also after a half-drawn progress bar; os.write: no buffer that the handler interrupted
        os.write(2, f"\ninterrupted: stopped at once on a third signal ({sig.name}): {described}\n".encode())
        os._exit(INTERRUPTED_EXIT)

    def install(self) -> None:
        if _on_main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """The handlers that were there before `install`, unless a stop is under way: then this one stays until the
        process exits (`ctrl_c_exits` puts the process's own handlers back), so that a later signal cannot turn a
        clean stop into an error while the run closes its logs and writes $MEGATRON_STOPPED_FILE."""
        if self.requested:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


@dataclass
class CtrlC:
    """Whether SIGINT arrived while `ctrl_c_exits` was watching (outside the training loop)."""

    pressed: bool = False


CTRL_C_LINE = ("interrupted: stopped at once by SIGINT (Ctrl-C) outside the training steps, where there is nothing to "
               "save; checkpoints already written are intact")


@contextlib.contextmanager
def ctrl_c_exits() -> Iterator[CtrlC]:
    """SIGINT in the block stops it at once, with `CTRL_C_LINE` and exit 130 instead of a traceback. Any exception
    that follows a Ctrl-C counts as the Ctrl-C: DCP, for one, wraps it in errors of its own (a checkpoint that
    "could not be read"). Puts back all the stop signals' handlers at the end, those a stopped run leaves too."""
    ctrl_c = CtrlC()
    watching = _on_main_thread()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if watching else {}

    def handle(signum: int, frame: FrameType | None) -> None:
        ctrl_c.pressed = True
        raise KeyboardInterrupt

    if watching:
        signal.signal(signal.SIGINT, handle)
    try:
        yield ctrl_c
    except BaseException:
        if not ctrl_c.pressed:
            raise
        print(CTRL_C_LINE, file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back from here
                signal.signal(sig, handler)
