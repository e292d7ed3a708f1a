"""Every tool given a bad file: a non-zero exit with one line naming the file, never a traceback. Each tool runs
in-process as `python tools/NAME.py ...` would (runpy with its argv), so the table stays fast."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from megatron.training.metrics import MetricsLogger

REPO = Path(__file__).resolve().parents[2]


def bad_files(folder: Path) -> dict[str, Path]:
    files = {"parquet": folder / "g.parquet", "jsonl": folder / "bytes.jsonl", "yml": folder / "bad.yml",
             "run": folder / "run", "empty_run": folder / "empty_run"}
    files["parquet"].write_bytes(b"garbage")
    files["jsonl"].write_bytes(b'{"text": "a\xff"}\n')
    files["yml"].write_text("num_layers: [2\n")
    (files["run"] / "logs").mkdir(parents=True)
    (files["run"] / "logs" / "metrics.jsonl").write_text("not json\nnor this\n")
    files["empty_run"].mkdir()
    return files


# (tool, its arguments with {name} for a bad file, the file the error line must name)
CASES = [
    ("train_tokenizer", ["--input", "{parquet}", "--vocab-size", "300", "--output", "{tmp}/tok.json"], "parquet"),
    ("train_tokenizer", ["--input", "{jsonl}", "--vocab-size", "300", "--output", "{tmp}/tok.json"], "jsonl"),
    ("preprocess_data", ["--input", "{jsonl}", "--output-prefix", "{tmp}/out", "--tokenizer-type", "HFTokenizer",
                         "--vocab-file", str(REPO / "megatron/data/bundled/shakespeare_tokenizer.json")], "jsonl"),
    ("compare_runs", ["{run}", "{run}"], "run"),
    ("lore_routing", ["{empty_run}"], "empty_run"),
    ("generate", ["{empty_run}", "--prompt", "hi"], "empty_run"),
    ("evaluate", ["{empty_run}", "--data", "{tmp}/x"], "empty_run"),
    ("lsh_calibrate", ["{empty_run}"], "empty_run"),
    ("convert_to_hf", ["{empty_run}", "{tmp}/hf"], "empty_run"),
    ("match_baseline", ["{yml}"], "yml"),
    ("count_params", ["{yml}"], "yml"),
]


@pytest.mark.parametrize(("tool", "argv", "named"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_a_bad_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys, tool, argv, named):
    files = bad_files(tmp_path)
    args = [a.format(tmp=tmp_path, **files) for a in argv]
    monkeypatch.setattr(sys, "argv", [f"tools/{tool}.py", *args])
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    with pytest.raises(SystemExit) as exit_info:  # any other exception is a traceback for the user
        runpy.run_path(str(REPO / "tools" / f"{tool}.py"), run_name="__main__")
    message = exit_info.value.code
    assert isinstance(message, str) and message.count("\n") == 0, message
    assert str(files[named]) in message, message


def test_a_record_cut_by_a_kill_is_skipped_with_a_warning_and_the_resumed_run_read(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import compare_runs

    log = tmp_path / "logs" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n" + '{"step": 2, "lo')  # killed mid-record
    logger = MetricsLogger(True, str(tmp_path / "logs"))  # the resumed run appends
    logger.log(2, {"loss": 2.5}, echo=False)
    logger.close()
    records = compare_runs.read_records(log)
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] == 2.5
    assert f"{log}: skipped 1 damaged line(s), the first at line 2" in capsys.readouterr().err
