"""`python tests/helpers/slow_rank_train.py CONFIG [...]`: train.py, with one rank slowed on purpose for the straggler
watch's test: the rank `$SLOW_RANK` sleeps `$SLOW_SECONDS` while fetching each batch of the steps in
[`$SLOW_FROM`, `$SLOW_TO`) (0-based steps done), as a rank on a slow disk or a throttled device would lag. Tests only:
the run itself is train.py's, unchanged.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    import train
    from megatron.training.lm_task import LMTask

    fetch = LMTask.train_batch

    def slow_fetch(self, step: int, micro: int):
        if (os.environ.get("RANK") == os.environ["SLOW_RANK"]
                and int(os.environ["SLOW_FROM"]) <= step < int(os.environ["SLOW_TO"])):
            time.sleep(float(os.environ["SLOW_SECONDS"]))
        return fetch(self, step, micro)

    LMTask.train_batch = slow_fetch
    train.main()
