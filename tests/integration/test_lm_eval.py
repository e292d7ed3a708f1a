"""lm-evaluation-harness on our checkpoints (megatron/evaluation/lm_eval_adapter.py, tools/eval_tasks.py).

The reference is lm-eval's own HFLM on the Hugging Face export of the same checkpoint (tools/convert_to_hf.py;
MoE and StructMoE as remote code): every per-document log-likelihood to 1e-4 and every generated text equal,
for every family, on models whose every tensor is random so that no mapping is right by luck. The tasks are
the local ones in tests/data/lm_eval_tasks (no download); the context is 32 tokens, so long documents are
cut on the left and perplexity documents span several rolling windows.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers.hf_models import REPO, build, saved_model

from megatron.data.tokenizer import tokenizer_of
from megatron.training.seed_checkpoint import write_step0_checkpoint

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's HFLM, the reference
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from megatron.evaluation import lm_eval_tasks  # noqa: E402
from megatron.evaluation.lm_eval_adapter import MegatronLM, rolling_windows  # noqa: E402
from megatron.evaluation.lm_eval_tasks import task_manager, task_metrics  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
import convert_to_hf  # noqa: E402
import eval_tasks  # noqa: E402

TASKS_DIR = REPO / "tests/data/lm_eval_tasks"
LOCAL_TASKS = ["shakespeare_next_line", "shakespeare_last_word", "shakespeare_passages", "shakespeare_continue_line"]
SHORT = {"seq_length": 32, "max_position_embeddings": 32}
MOE = {"moe_num_experts": 4, "moe_top_k": 2}
STRUCTMOE = {**MOE, "lore_num_experts": 4, "lore_rank": 2, "lore_top_k": 1}
LLAMA_SHAPED = {"norm": "rmsnorm", "activation": "swiglu", "rotary_pct": 1.0, "use_bias_in_attn_linear": False,
                "use_bias_in_mlp": False, "use_bias_in_norms": False, "intermediate_size": 96, "num_kv_heads": 2,
                "no_weight_tying": True}
MIXTRAL_SHAPED = {**LLAMA_SHAPED, **MOE, "moe_ffn_hidden_size": 16, "moe_renormalize_weights": True}
PAGES = [json.loads(line)["page"] for line in (TASKS_DIR / "passages.jsonl").read_text().splitlines()[:3]]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No download, and transformers' copy of the remote code kept in tmp_path."""
    import datasets
    import huggingface_hub
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: the environment is too late
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def checkpoint_and_export(tmp_path, data_prefix, **overrides):
    save, _ = saved_model(tmp_path / "run", data_prefix, **SHORT, **overrides)
    report = convert_to_hf.main([str(save), str(tmp_path / "hf")])
    return save, report


def hflm(tmp_path, batch_size: int = 4) -> HFLM:
    return HFLM(pretrained=str(tmp_path / "hf"), trust_remote_code=True, batch_size=batch_size, device="cpu")


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def assert_scores_equal(ours: list, theirs: list) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        assert a[0] == pytest.approx(b[0], abs=1e-4, rel=0), (a, b)
        assert a[1:] == b[1:]  # is_greedy


def direct_requests(lm) -> dict[str, list]:
    """Each request type on hand-picked inputs: an empty context, contexts past the 32-token window, several
    continuations of one context (one-token ones share an input), documents of several rolling windows;
    generation with a stop string that occurs, several widths (left padding) and two generation settings in one
    call."""
    loglikelihood = [("", " To be, or not to be"), ("To be, or not", " to be"), (PAGES[0], " the end"),
                     ("Hold, Clifford!", " do"), ("Hold, Clifford!", " to"), ("Hold, Clifford!", " do not honour him"),
                     (PAGES[1][:300], "\n")]  # " do" and " to": one token each, one input, one forward
    rolling = [(page,) for page in PAGES] + [("A short one.",)]
    free = [(PAGES[0][:200], {"until": [], "max_gen_toks": 6}), ("Sweet York,", {"until": [], "max_gen_toks": 6})]
    first = lm.generate_until(requests("generate_until", free))
    stop = first[0][len(first[0]) // 2:][:2]  # occurs inside the first continuation: it must stop there
    generate = [(PAGES[0][:200], {"until": [stop, "\n"], "max_gen_toks": 6}),
                ("Sweet York,", {"until": ["\n"], "max_gen_toks": 5}), ("O", {"until": ["\n"], "max_gen_toks": 5}),
                ("Sweet York,", {"until": ["qq"], "max_gen_toks": 4})]
    return {"loglikelihood": lm.loglikelihood(requests("loglikelihood", loglikelihood)),
            "rolling": lm.loglikelihood_rolling(requests("loglikelihood_rolling", rolling)),
            "free": first, "generate": lm.generate_until(requests("generate_until", generate))}


SLOW = pytest.mark.slow  # about 5 s each; CI runs a dense native export, a native Llama and remote StructMoE
FAMILIES = [
    pytest.param({"rotary_pct": 0.3, "gpt_j_residual": True, "no_weight_tying": True}, id="neox_parallel_untied"),
    pytest.param(LLAMA_SHAPED, id="llama_gqa"),
    pytest.param({**LLAMA_SHAPED, "sliding_window_width": 5}, id="mistral_window", marks=SLOW),
    pytest.param({**LLAMA_SHAPED, "qk_norm": True}, id="qwen3", marks=SLOW),
    pytest.param(MIXTRAL_SHAPED, id="mixtral", marks=SLOW),
    pytest.param(MOE, id="moe", marks=SLOW),
    pytest.param(STRUCTMOE, id="structmoe", marks=SLOW),
    # trained with LSH compression; evaluated exactly, as the export (which has no LSH) computes
    pytest.param({**STRUCTMOE, "lsh_compression": True, "lsh_hash_dim": 2}, id="structmoe_lsh"),
]


@pytest.mark.parametrize("overrides", FAMILIES)
def test_every_request_scores_as_hflm_on_the_export(tmp_path, data_prefix, overrides):
    save, report = checkpoint_and_export(tmp_path, data_prefix, **overrides)
    ours = direct_requests(MegatronLM.from_checkpoint(save, batch_size=3, device="cpu"))
    theirs = direct_requests(hflm(tmp_path, batch_size=3))
    assert_scores_equal(ours["loglikelihood"], theirs["loglikelihood"])
    assert_scores_equal(ours["rolling"], theirs["rolling"])
    assert ours["free"] == theirs["free"] and ours["generate"] == theirs["generate"]
    cut, whole = ours["generate"][0], ours["free"][0]
    assert whole.startswith(cut) and len(cut) < len(whole)  # the stop string cut it


def test_local_tasks_score_as_hflm_document_by_document(tmp_path, data_prefix):
    """The whole path: lm-eval builds the requests of all four local tasks (multiple choice, loglikelihood,
    rolling perplexity, generation) with 1-shot contexts, both models answer, every document compared."""
    save, _ = checkpoint_and_export(tmp_path, data_prefix, **STRUCTMOE)
    manager = task_manager(LOCAL_TASKS, [TASKS_DIR])
    runs = [simple_evaluate(model=lm, tasks=LOCAL_TASKS, task_manager=manager, limit=3, num_fewshot=1,
                            bootstrap_iters=0, log_samples=True)
            for lm in (MegatronLM.from_checkpoint(save, batch_size=4, device="cpu"), hflm(tmp_path))]
    ours, theirs = runs
    for task in LOCAL_TASKS:
        assert [s["doc_id"] for s in ours["samples"][task]] == [s["doc_id"] for s in theirs["samples"][task]]
        for a, b in zip(ours["samples"][task], theirs["samples"][task]):
            assert a["arguments"] == b["arguments"]  # the same prompts, few-shot example included
            responses = [r[0] for r in a["resps"]], [r[0] for r in b["resps"]]
            if task == "shakespeare_continue_line":
                assert responses[0] == responses[1]
            else:
                assert_scores_equal(*responses)
    assert task_metrics(ours) == pytest.approx(task_metrics(theirs), rel=1e-6, abs=1e-6)
    assert set(task_metrics(ours)) >= {"shakespeare_next_line/acc", "shakespeare_passages/bits_per_byte",
                                       "shakespeare_last_word/perplexity", "shakespeare_continue_line/exact_match"}


def test_generation_stops_at_the_end_of_document_token_or_a_stop_string(tmp_path, data_prefix):
    """A model made to end its documents: where its greedy token would be T, the end-of-document row of the
    head scores above it. The text ends there, as HFLM's does (generate's eos_token_id), and so does the loop:
    no forward runs once every row has stopped, at that token or at a stop string."""
    args, model = build(tmp_path / "run", data_prefix, **SHORT, no_weight_tying=True)
    probe = MegatronLM(model.eval(), tokenizer_of(args))
    prompt = probe.tok_encode("Sweet York,")
    with torch.no_grad():
        greedy = [int(model(torch.tensor([prompt]))[0][0, -1].argmax())]
        greedy.append(int(model(torch.tensor([prompt + greedy]))[0][0, -1].argmax()))
        model.lm_head.weight[probe.eot_token_id] = 3 * model.lm_head.weight[greedy[1]]
    write_step0_checkpoint(args, model, args.save)
    convert_to_hf.main([str(args.save), str(tmp_path / "hf")])
    request = requests("generate_until", [("Sweet York,", {"until": ["qq"], "max_gen_toks": 6})])
    ours = MegatronLM.from_checkpoint(args.save, device="cpu")
    forwards = []
    ours.model.register_forward_pre_hook(lambda module, inputs: forwards.append(inputs[0].shape[1]))
    first = probe.tok_decode(greedy[:1])
    assert ours.generate_until(request) == hflm(tmp_path).generate_until(request) == [first]
    assert forwards == [len(prompt), 1]  # the prompt, then the first new token, whose successor was the end
    forwards.clear()
    stop = first[-1]  # inside the first new token: the prompt's forward is the only one
    assert ours.generate([prompt], stops=[stop], max_new_tokens=6) == [first[:first.index(stop)]]
    assert forwards == [len(prompt)]


def test_task_metrics_are_the_scores_without_standard_errors():
    results = {"results": {"t": {"alias": "t", "sample_len": 3, "acc,none": 0.5, "acc_stderr,none": 0.1,
                                 "exact_match,strict-match": 1.0, "word_perplexity,none": float("inf")}},
               "groups": {"g": {"acc,none": 0.75, "acc_stderr,none": "N/A"}}}
    assert task_metrics(results) == {"t/acc": 0.5, "t/exact_match_strict-match": 1.0, "g/acc": 0.75}


def test_rolling_windows_predict_every_token_once_with_the_most_context():
    windows = rolling_windows(list(range(10, 20)), prefix=0, max_length=4)
    assert windows == [([0, 10, 11, 12], [10, 11, 12, 13]), ([13, 14, 15, 16], [14, 15, 16, 17]),
                       ([15, 16, 17, 18], [18, 19])]
    assert rolling_windows([5], 0, 4) == [([0], [5])] and rolling_windows([], 0, 4) == []


def test_the_tool_prints_the_table_and_writes_the_json(tmp_path, data_prefix, capsys):
    save, _ = checkpoint_and_export(tmp_path, data_prefix)
    out = tmp_path / "results.json"
    results = eval_tasks.main([str(save), "--tasks", "shakespeare_next_line,shakespeare_passages", "--limit", "3",
                               "--include_path", str(TASKS_DIR), "--output", str(out), "--batch_size", "4",
                               "--bootstrap_iters", "0", "--log_samples"])
    printed = capsys.readouterr().out
    assert "|shakespeare_next_line" in printed and "bits_per_byte" in printed
    written = json.loads(out.read_text())
    assert written["checkpoint"] == str(save / "global_step0") and written["errors"] == {}
    assert written["results"]["shakespeare_next_line"]["acc,none"] == results["results"]["shakespeare_next_line"][
        "acc,none"]
    assert len(written["samples"]["shakespeare_passages"]) == 3


def test_a_task_that_cannot_run_is_one_line_naming_it(tmp_path, data_prefix, capsys, monkeypatch):
    """An unknown task stops before the checkpoint is read; a task whose dataset is on the Hub (offline here)
    or missing fails alone: one line each, the others' results still printed and written, exit status 1."""
    save, _ = checkpoint_and_export(tmp_path, data_prefix)
    with monkeypatch.context() as patch:  # lm-eval's own index of its thousands of tasks takes ~10 s: a small one
        patch.setattr(lm_eval_tasks, "with_lm_eval_tasks",
                      lambda paths: TaskManager(include_defaults=False, include_path=list(paths)))
        with pytest.raises(SystemExit) as stopped:
            eval_tasks.main([str(save), "--tasks", "shakespeare_next_line,no_such_task", "--include_path",
                             str(TASKS_DIR)])
    assert str(stopped.value.code).startswith("eval_tasks: task no_such_task: unknown")
    assert "\n" not in str(stopped.value.code)

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("shakespeare_next_line.yaml", "shakespeare.py", "next_line.jsonl"):
        (tasks / name).write_text((TASKS_DIR / name).read_text())
    (tasks / "hub_task.yaml").write_text((TASKS_DIR / "shakespeare_last_word.yaml").read_text().replace(
        "task: shakespeare_last_word", "task: hub_task").replace("custom_dataset: !function shakespeare.load\n", "")
        .replace('dataset_path: ""', "dataset_path: EleutherAI/lambada_openai"))
    (tasks / "gone_task.yaml").write_text((TASKS_DIR / "shakespeare_next_line.yaml").read_text().replace(
        "task: shakespeare_next_line", "task: gone_task").replace("next_line.jsonl", "gone.jsonl"))
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as stopped:
        eval_tasks.main([str(save), "--tasks", "hub_task,shakespeare_next_line,gone_task", "--limit", "2",
                         "--include_path", str(tasks), "--bootstrap_iters", "0", "--output", str(out)])
    lines = str(stopped.value.code).splitlines()
    assert len(lines) == 2 and lines[0].startswith("eval_tasks: task hub_task: ")
    assert "lambada_openai" in lines[0] and lines[1].startswith("eval_tasks: task gone_task: ")
    assert "gone.jsonl" in lines[1]
    assert "|shakespeare_next_line" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["errors"]) == {"hub_task", "gone_task"}


def test_a_missing_lm_eval_names_the_extra(monkeypatch):
    from megatron.evaluation.lm_eval_tasks import TaskError  # noqa: F401 - the module imports without lm-eval
    from megatron.runtime import MissingExtra

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    with pytest.raises(MissingExtra, match=r"^lm-eval evaluation needs lm_eval, which is not installed: "
                                           r"pip install -e '\.\[eval\]' \(or pip install -r requirements-dev.txt\)$"):
        task_manager(["shakespeare_next_line"], [TASKS_DIR])


@pytest.mark.slow  # about 17 s
def test_two_processes_share_the_documents_and_score_as_one(tmp_path, data_prefix):
    """torchrun with 2 gloo ranks: lm-eval gives each rank half the documents through the model's rank and
    world_size and gathers the metrics on rank 0, which writes the JSON: the same scores as one process."""
    import os
    import subprocess

    from helpers.distributed import free_port

    save, _ = checkpoint_and_export(tmp_path, data_prefix)
    common = [str(save), "--tasks", "shakespeare_next_line,shakespeare_continue_line", "--limit", "6",
              "--include_path", str(TASKS_DIR), "--bootstrap_iters", "0", "--log_samples", "--batch_size", "4"]
    one = eval_tasks.main([*common, "--output", str(tmp_path / "one.json")])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(REPO / "tools/eval_tasks.py"), *common,
               "--output", str(tmp_path / "two.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert task_metrics(two) == pytest.approx(task_metrics(one), rel=1e-6) and task_metrics(one)
    for task in ("shakespeare_next_line", "shakespeare_continue_line"):
        # rank 0's share (every other document from 0), then rank 1's, gathered: each rank ran only its share
        assert [s["doc_id"] for s in two["samples"][task]] == [0, 2, 4, 1, 3, 5]
