"""`python tests/helpers/gated_train.py CONFIG [...]`: train.py, whose checkpoint writes and reads wait while the file
`$TRAIN_GATE/hold` exists, so a test can send signals while a save (or a load) is certainly under way.

Each write or read that waits first creates `$TRAIN_GATE/saving` (or `loading`). The wait sits in DCP's file-system
writer and reader, where real I/O happens: in the main thread for a synchronous save or a load, in DCP's background
thread for an asynchronous save. Tests only: the run itself is train.py's, unchanged.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

REPO = Path(__file__).resolve().parents[2]


def gated(method, marker: str):
    def wait_while_held(self, *args, **kwargs):
        gate = Path(os.environ["TRAIN_GATE"])
        if (gate / "hold").exists():
            (gate / marker).touch()
            while (gate / "hold").exists():
                time.sleep(0.01)
        return method(self, *args, **kwargs)

    return wait_while_held


FileSystemWriter.write_data = gated(FileSystemWriter.write_data, "saving")
FileSystemReader.read_data = gated(FileSystemReader.read_data, "loading")

if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    import train

    train.main()
