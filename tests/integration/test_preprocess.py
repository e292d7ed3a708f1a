"""Preprocessing (workers, EOD, input types, CLI) and the bundled Shakespeare corpus."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from megatron.data import bundled
from megatron.data.bundled import BUNDLED_CORPORA, BUNDLED_TOKENIZER, ensure_bundled_dataset
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preprocess import preprocess
from megatron.data.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXTS = [f"Document {i}: " + "to be or not to be, " * (i % 7 + 1) for i in range(70)]


def write_jsonl(path: Path, texts: list[str], compress: bool = False) -> Path:
    lines = "".join(json.dumps({"text": t, "title": f"t{i}"}) + "\n" for i, t in enumerate(texts))
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def test_output_identical_for_one_and_two_workers_and_eod_appended(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS[:45])
    b = write_jsonl(tmp_path / "b.jsonl.gz", TEXTS[45:], compress=True)
    args = ([str(a), str(b)], ["text", "title"], "HFTokenizer", str(BUNDLED_TOKENIZER))
    one = preprocess(*args, str(tmp_path / "one"), workers=1, progress=False)
    two = preprocess(*args, str(tmp_path / "two"), workers=2, progress=False)
    assert one == {"text": str(tmp_path / "one_text_document"), "title": str(tmp_path / "one_title_document")}
    for key in ("text", "title"):
        for ext in ("bin", "idx"):
            assert Path(f"{one[key]}.{ext}").read_bytes() == Path(f"{two[key]}.{ext}").read_bytes()
    tok = build_tokenizer("HFTokenizer", str(BUNDLED_TOKENIZER))
    data = MMapIndexedDataset(one["text"])
    assert len(data) == 70 and data.dtype == np.uint16
    for i in (0, 44, 45, 69):  # documents stay in input order across files
        assert data[i].tolist() == tok.encode(TEXTS[i]) + [tok.eod_id]
    assert tok.decode(data[3][:-1].tolist()) == TEXTS[3]


def test_without_eod_and_char_level_txt_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "x.txt").write_text("héllo", encoding="utf-8")
    pq.write_table(pa.table({"text": ["ab", "c"]}), tmp_path / "y.parquet")
    out = preprocess([str(tmp_path / "x.txt"), str(tmp_path / "y.parquet")], ["text"], "CharLevelTokenizer",
                     None, str(tmp_path / "o"), append_eod=False, progress=False)["text"]
    data = MMapIndexedDataset(out)
    assert [data[i].tolist() for i in range(len(data))] == [list("héllo".encode()), [97, 98], [99]]


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        preprocess([str(tmp_path / "nope.jsonl")], ["text"], "CharLevelTokenizer", None, str(tmp_path / "o"))
    (tmp_path / "f.csv").write_text("a,b")
    with pytest.raises(ValueError, match="f.csv: unsupported file type"):
        preprocess([str(tmp_path / "f.csv")], ["text"], "CharLevelTokenizer", None, str(tmp_path / "o"),
                   progress=False)
    write_jsonl(tmp_path / "k.jsonl", ["x"])
    with pytest.raises(ValueError, match="k.jsonl:1: jsonl record has no key 'body'"):
        preprocess([str(tmp_path / "k.jsonl")], ["body"], "CharLevelTokenizer", None, str(tmp_path / "o"),
                   progress=False)


@pytest.mark.parametrize("content, keys, expected", [
    (None, "text", r"--input: .*missing\.jsonl does not exist"),
    ('{"text": "fine"}\n{"text": "cut', "text", r"bad\.jsonl:2: not a JSON record \(Unterminated string"),
    ('{"text": "fine"}\n[1, 2]\n', "text", r"bad\.jsonl:2: a JSON list, expected an object"),
    ('{"body": "no text key"}\n', "text", r"bad\.jsonl:1: jsonl record has no key 'text' \(--jsonl-keys"),
    ('{"text": 5}\n', "text", r"bad\.jsonl:1: key 'text' holds int, expected a string"),
    ("", "text", r"--input: .*bad\.jsonl: no documents \(empty, or only blank lines\); nothing written"),
    ("\n  \n", "text", r"bad\.jsonl: no documents"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "text", r"bad\.jsonl:2: not UTF-8 text \(byte 13 of the line"),
])
def test_cli_bad_input_is_one_line(tmp_path: Path, content: str | bytes | None, keys: str, expected: str) -> None:
    import re

    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    cmd = [sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(path), "--output-prefix",
           str(tmp_path / "out"), "--tokenizer-type", "CharLevelTokenizer", "--jsonl-keys", keys]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "error:" in line]  # beside the progress bar
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert not list(tmp_path.glob("out*"))  # no dataset, not even an empty one


def test_cli_matches_the_library(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS[:10])
    cmd = [sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(src), "--output-prefix",
           str(tmp_path / "cli"), "--tokenizer-type", "CharLevelTokenizer", "--append-eod", "--workers", "2"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    lib = preprocess([str(src)], ["text"], "CharLevelTokenizer", None, str(tmp_path / "lib"), progress=False)
    assert Path(f"{lib['text']}.idx").read_bytes() == (tmp_path / "cli_text_document.idx").read_bytes()
    assert Path(f"{lib['text']}.bin").read_bytes() == (tmp_path / "cli_text_document.bin").read_bytes()


def test_bundled_corpus_is_deduplicated_shakespeare_only() -> None:
    with gzip.open(BUNDLED_CORPORA["shakespeare"], "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) >= 300
    assert all(set(d) == {"text", "title", "part"} for d in docs)
    titles = {d["title"] for d in docs}
    # One copy per work: no folio twin under a second title, no (title, part) twice.
    assert len({(d["title"], d["part"]) for d in docs}) == len(docs)
    lowered = {t.lower().replace("'", "") for t in titles}
    assert len(lowered) == len(titles) and len(titles) >= 40
    for banned in ("twelfe", "anthonie", "errours", "dreame", "all is well"):
        assert not any(banned in t for t in lowered)
    text = "\n".join(d["text"] for d in docs)
    for banned in ("Milton", "Paradise Lost", "Project Gutenberg", "PROJECT GUTENBERG", "World Library"):
        assert banned not in text
    # Interleaved: the last 5% of documents (validation/test under a by-order split) span many works.
    assert len({d["title"] for d in docs[-len(docs) // 20:]}) >= 10


def test_ensure_bundled_dataset_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = str(tmp_path / "data" / "shk")
    assert ensure_bundled_dataset("shakespeare", prefix, "CharLevelTokenizer", None) == prefix
    data = MMapIndexedDataset(prefix)
    with gzip.open(BUNDLED_CORPORA["shakespeare"], "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())["text"]
    assert len(data) >= 300
    assert data[0].tolist() == list(first.encode("utf-8")) + [256]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["shk.bin", "shk.idx"]
    mtime = Path(f"{prefix}.bin").stat().st_mtime_ns

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt an existing dataset")

    monkeypatch.setattr(bundled, "preprocess", must_not_run)
    assert ensure_bundled_dataset("shakespeare", prefix, "CharLevelTokenizer", None) == prefix
    assert Path(f"{prefix}.bin").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="unknown bundled corpus 'milton'"):
        ensure_bundled_dataset("milton", prefix, "CharLevelTokenizer", None)


def test_interrupted_bundled_build_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        out = Path(args[4])
        Path(f"{out}_text_document.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(bundled, "preprocess", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_bundled_dataset("shakespeare", str(tmp_path / "shk"), "CharLevelTokenizer", None)
    assert list(tmp_path.iterdir()) == []


def _build_script() -> ModuleType:
    """tools/ is not a package: load the build script by path."""
    import importlib.util

    path = REPO / "tools" / "build_bundled_corpus.py"
    spec = importlib.util.spec_from_file_location("build_bundled_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_script_dedup_boilerplate_and_scenes(tmp_path: Path) -> None:
    script = _build_script()
    assert len(script.FOLIO_TWINS) == 35
    assert script.FOLIO_TWINS["twelfe-night_gut_f"] == "twelfth_night_gut"
    (tmp_path / "hamlet_gut.txt").write_text("x")
    (tmp_path / "hamlet_gut_f.txt").write_text("x")
    assert [p.name for p in script.modern_texts(tmp_path)] == ["hamlet_gut.txt"]
    (tmp_path / "lost_play_gut_f.txt").write_text("x")
    with pytest.raises(SystemExit, match="lost_play_gut_f.txt: folio copy not in FOLIO_TWINS"):
        script.modern_texts(tmp_path)
    raw = ("Header text\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody line\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicence")
    assert script.strip_boilerplate(raw) == "Body line"
    play = "Title\n\nSCENE I. A hall.\n" + "a" * 300 + "\n\nSCENE II. A room.\n" + "b" * 300
    parts = script.split_work(play)
    assert [p[1][:8] for p in parts] == ["SCENE I.", "SCENE II"]


def test_cli_a_vocab_file_of_another_kind_is_one_line(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "docs.jsonl", ["some text"])
    vocab = tmp_path / "tok.json"
    vocab.write_text('{"not": "a tokenizer"}\n')
    cmd = [sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(corpus), "--output-prefix",
           str(tmp_path / "out"), "--tokenizer-type", "SPMTokenizer", "--vocab-file", str(vocab)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "tok.json is not a SentencePiece .model (SPMTokenizer)" in lines[0], lines[0]
