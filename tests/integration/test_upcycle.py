"""tools/upcycle.py: dense -> MoE -> StructMoE with the source's logits at step 0, and training moves B first."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.hf_models import REPO, saved_model

sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))
import upcycle  # noqa: E402

import train  # noqa: E402
from megatron.training.pretrained import load_pretrained  # noqa: E402

TOKENS = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(0))
NO_MLP_BIAS = ("mlp.up.bias", "mlp.down.bias")  # until use_bias_in_mlp: false exists in gpt.py: biases at zero
MOE_OVERLAY = str(REPO / "configs/upcycle/tiny_moe.yml")
STRUCT_OVERLAY = str(REPO / "configs/upcycle/tiny_structmoe.yml")


def logits(model):
    with torch.no_grad():
        return model(TOKENS)[0]


@pytest.mark.parametrize("extra", [[], ["--moe_top_k", "1", "--moe_expert_interval", "2"]], ids=["top2", "top1_every2"])
def test_dense_to_moe_keeps_the_logits(tmp_path, data_prefix, extra):
    save, dense = saved_model(tmp_path / "run", data_prefix, zero=NO_MLP_BIAS)
    upcycle.main([str(save), str(tmp_path / "moe"), MOE_OVERLAY, *extra])
    args, moe, _ = load_pretrained(tmp_path / "moe")
    assert args.moe_num_experts == 8 and sum(type(b.mlp).__name__ == "MoELayer" for b in moe.blocks) >= 1
    torch.testing.assert_close(logits(moe), logits(dense), atol=1e-5, rtol=0)
    last = max(i for i, b in enumerate(moe.blocks) if type(b.mlp).__name__ == "MoELayer")
    experts = moe.blocks[last].mlp.experts.w_up_EDF
    assert torch.equal(experts[0], dense.blocks[last].mlp.up.weight.T) and torch.equal(experts[0], experts[7])


def test_moe_to_structmoe_keeps_the_logits(tmp_path, data_prefix):
    save, moe = saved_model(tmp_path / "run", data_prefix, moe_num_experts=4, moe_top_k=2)  # distinct experts
    upcycle.main([str(save), str(tmp_path / "struct"), STRUCT_OVERLAY, "--lore_rank", "2"])
    args, struct, _ = load_pretrained(tmp_path / "struct")
    lore = struct.blocks[0].mlp.lore
    assert args.lore_num_experts == 4 and not lore.B.any() and lore.A.abs().sum() > 0
    torch.testing.assert_close(logits(struct), logits(moe), atol=1e-5, rtol=0)


def test_dense_mlp_with_biases_is_refused(tmp_path, data_prefix):
    save, _ = saved_model(tmp_path / "run", data_prefix)  # every bias random
    with pytest.raises(SystemExit, match="use_bias_in_mlp"):
        upcycle.main([str(save), str(tmp_path / "moe"), MOE_OVERLAY])


def test_gates_that_do_not_sum_to_one_are_refused(tmp_path, data_prefix):
    save, _ = saved_model(tmp_path / "run", data_prefix, zero=NO_MLP_BIAS)
    with pytest.raises(SystemExit, match="moe_renormalize_weights"):
        upcycle.main([str(save), str(tmp_path / "moe"), MOE_OVERLAY, "--moe_renormalize_weights", "false"])


def test_first_step_after_upcycling_moves_b_and_only_b(tmp_path, data_prefix):
    """At step 0 dL/dB is non-zero while dL/dA and dL/d(LoRE router) are exactly zero (both carry B); one
    train.py step from the upcycled checkpoint then changes B."""
    save, _ = saved_model(tmp_path / "run", data_prefix, zero=NO_MLP_BIAS)
    upcycle.main([str(save), str(tmp_path / "moe"), MOE_OVERLAY])
    upcycle.main([str(tmp_path / "moe"), str(tmp_path / "struct"), STRUCT_OVERLAY, "--lore_rank", "2"])
    _, struct, _ = load_pretrained(tmp_path / "struct")
    loss, _ = struct.train()(TOKENS[:, :-1], TOKENS[:, 1:])
    loss.backward()
    lore = struct.blocks[0].mlp.lore
    assert lore.B.grad.abs().sum() > 0
    assert not lore.A.grad.any() and not lore.router.weight.grad.any()
    result = train.run([str(tmp_path / "struct/global_step0/config.yml"), "--train_iters", "1"])
    assert result.final_step == 1
    _, trained, path = load_pretrained(tmp_path / "struct")
    assert path.name == "global_step1" and trained.blocks[0].mlp.lore.B.abs().sum() > 0


def test_llama_to_mixtral_to_structmoe_keeps_the_logits(tmp_path, data_prefix):
    """A Llama-shaped dense model (SwiGLU, RMSNorm, GQA, no biases) upcycled Mixtral-style, then into StructMoE."""
    llama = {"norm": "rmsnorm", "activation": "swiglu", "rotary_pct": 1.0, "num_kv_heads": 2,
             "use_bias_in_attn_linear": False, "use_bias_in_mlp": False, "use_bias_in_norms": False,
             "intermediate_size": 1024, "mlp_multiple_of": 8}
    save, dense = saved_model(tmp_path / "run", data_prefix, **llama)
    assert dense.blocks[0].mlp.down.weight.shape[1] == 344  # the overlay's moe_ffn_hidden_size
    upcycle.main([str(save), str(tmp_path / "moe"), str(REPO / "configs/upcycle/llama_to_mixtral.yml")])
    args, moe, _ = load_pretrained(tmp_path / "moe")
    assert all(type(b.mlp).__name__ == "MoELayer" for b in moe.blocks) and args.moe_top_k == 2
    torch.testing.assert_close(logits(moe), logits(dense), atol=1e-5, rtol=0)
    upcycle.main([str(tmp_path / "moe"), str(tmp_path / "struct"), STRUCT_OVERLAY, "--lore_rank", "2"])
    _, struct, _ = load_pretrained(tmp_path / "struct")
    torch.testing.assert_close(logits(struct), logits(dense), atol=1e-5, rtol=0)


def documented_commands(path: Path, tool: str) -> list[list[str]]:
    """The `python ...` lines of a page's bash blocks that run `tool`, as written (continuations joined)."""
    text = path.read_text().replace("\\\n", " ")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("python ") and tool in line.split()[1]]


def run_as_written(command: list[str], cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    assert command[0] == "python"
    result = subprocess.run([sys.executable, *command[1:], *extra], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stderr[-3000:]}"
    return result


def test_the_documented_upcycling_commands_run_as_written(tmp_path):
    """README's and docs/huggingface.md's upcycling lines, run word for word from a folder laid out as the repo
    (after `python train.py configs/tiny.yml` made runs/tiny, here shortened to 3 steps), keep the logits."""
    for name in ("configs", "megatron", "tools", "train.py"):
        (tmp_path / name).symlink_to(REPO / name)
    run_as_written(["python", "train.py", "configs/tiny.yml"], tmp_path, "--train_iters", "3", "--eval_interval", "0")
    readme = documented_commands(REPO / "README.md", "tools/upcycle.py")
    assert [c[2:] for c in readme] == [["runs/tiny", "runs/tiny_moe_up", "configs/upcycle/tiny_moe.yml"]]
    run_as_written(readme[0], tmp_path)
    _, dense, _ = load_pretrained(tmp_path / "runs/tiny")
    _, moe, _ = load_pretrained(tmp_path / "runs/tiny_moe_up")
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens)[0], dense(tokens)[0], atol=1e-5, rtol=0)

    # docs/huggingface.md's upcycling section: the same upcycle (the output exists now: refused, untouched), the
    # continued training (2 steps here), and the step into StructMoE
    docs = documented_commands(REPO / "docs/huggingface.md", "tools/upcycle.py")
    trains = [c for c in documented_commands(REPO / "docs/huggingface.md", "train.py")
              if "configs/upcycle/tiny_moe.yml" in c]
    assert readme[0] in docs and len(trains) == 1
    again = subprocess.run([sys.executable, *readme[0][1:]], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode != 0 and "runs/tiny_moe_up: not empty" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and (tmp_path / "runs/tiny_moe_up/latest").exists()
    run_as_written(trains[0], tmp_path, "--train_iters", "2", "--eval_interval", "0")
    for command in docs:
        if command[2] == "runs/tiny_moe_up":
            run_as_written(command, tmp_path)
            _, struct, _ = load_pretrained(tmp_path / command[3])
            assert struct.blocks[0].mlp.lore is not None or struct.blocks[1].mlp.lore is not None
