"""Tokenizing the bundled corpus with 1 and 2 workers, side by side (target: >= 1.5x faster with 2).

    python benchmarks/preprocess_data.py [--repeats 3]
"""

from __future__ import annotations

import argparse
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
    opts = parser.parse_args()
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


if __name__ == "__main__":
    main()
