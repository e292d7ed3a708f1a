"""Tokenizing the bundled corpus with 1 and 2 workers, side by side (target: >= 1.5x faster with 2).

    python benchmarks/preprocess_data.py [--repeats 3] [--json docs/results/preprocess_data.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.data.bundled import BUNDLED_CORPORA, BUNDLED_TOKENIZER  # noqa: E402
from megatron.data.preprocess import preprocess  # noqa: E402


def main() -> None:
    """Alternates 1 and 2 workers each round so drift in machine load hits both alike."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the measured times to this path")
    opts = parser.parse_args()
    load_before = os.getloadavg()[0]
    times = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(opts.repeats):
            for workers in (1, 2):
                start = time.perf_counter()
                preprocess([str(BUNDLED_CORPORA["shakespeare"])], ["text"], "HFTokenizer",
                           str(BUNDLED_TOKENIZER), f"{tmp}/w{workers}", workers=workers, progress=False)
                times[workers].append(time.perf_counter() - start)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"1 worker {one:.2f}s, 2 workers {two:.2f}s (median of {opts.repeats}): "
          f"speed-up {one / two:.2f}x (target >= 1.5x)")
    if opts.json:
        result = {"repeats": opts.repeats, "seconds": {str(w): t for w, t in times.items()}, "speedup": one / two,
                  "load_average": [load_before, os.getloadavg()[0]]}
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {opts.json}")


if __name__ == "__main__":
    main()
