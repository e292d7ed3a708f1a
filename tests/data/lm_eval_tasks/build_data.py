"""Builds the JSONL files of the local lm-eval tasks from the bundled Shakespeare corpus (deterministic).

    python tests/data/lm_eval_tasks/build_data.py

The documents come from the end of megatron/data/bundled/shakespeare.jsonl.gz: the last 5% by document order,
the validation and test splits of configs/tiny.yml's `split: 949,50,1`, so a model trained on the bundled
corpus with that split has not seen them. Each file holds a few `train` rows (few-shot examples) then `test`
rows; shakespeare.py loads them as lm-eval's splits.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parents[2] / "megatron/data/bundled/shakespeare.jsonl.gz"
HELD_OUT = 0.05  # the last 5% of the documents
TRAIN_ROWS, TEST_ROWS = 5, 40


def verse_runs(text: str) -> list[list[str]]:
    """Runs of consecutive spoken lines (no speaker names, stage directions or blank lines), each at least 5."""
    runs, current = [], []
    for line in text.splitlines():
        line = line.strip()
        spoken = bool(line) and not line.startswith("[") and not re.fullmatch(r"[A-Z][A-Z .,'-]+\.", line)
        if spoken and len(line) >= 12:
            current.append(line)
            continue
        if len(current) >= 5:
            runs.append(current)
        current = []
    if len(current) >= 5:
        runs.append(current)
    return runs


def main() -> None:
    docs = [json.loads(line) for line in gzip.open(CORPUS, "rt", encoding="utf-8")]
    held_out = docs[int(len(docs) * (1 - HELD_OUT)):]
    rng = random.Random(0)
    runs = [run for doc in held_out for run in verse_runs(doc["text"])]
    rng.shuffle(runs)
    all_lines = [line for run in runs for line in run]
    rows = TRAIN_ROWS + TEST_ROWS

    next_line = []  # multiple choice: which line follows these four
    for run in runs[:rows]:
        context, answer = run[:4], run[4]
        choices = [answer] + rng.sample([x for x in all_lines if x != answer], 3)
        rng.shuffle(choices)
        next_line.append({"context": "\n".join(context), "choices": choices, "label": choices.index(answer)})

    last_word = []  # loglikelihood (LAMBADA-style): the last word of a passage, ending a line without punctuation
    for run in runs[rows:]:
        ends = [i for i in range(2, len(run)) if re.search(r" [A-Za-z']+$", run[i])]
        if ends:
            passage = "\n".join(run[ends[0] - 2:ends[0] + 1])
            last_word.append({"text": passage})
        if len(last_word) == rows:
            break

    passages = []  # loglikelihood_rolling (wikitext-style perplexity): whole passages of about 600 characters
    for doc in held_out[:: max(1, len(held_out) // rows)][:rows]:
        text = doc["text"]
        passages.append({"page": text[:text.rfind("\n", 0, 600)]})

    continue_line = []  # generate_until: the line after three, stopping at the newline
    for run in runs[-rows:]:
        continue_line.append({"context": "\n".join(run[:3]), "answer": run[3]})

    for name, items in {"next_line": next_line, "last_word": last_word, "passages": passages,
                        "continue_line": continue_line}.items():
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i, item in enumerate(items):
                f.write(json.dumps({"split": "train" if i < TRAIN_ROWS else "test", **item}) + "\n")
        print(f"{name}.jsonl: {len(items)} rows")


if __name__ == "__main__":
    main()
