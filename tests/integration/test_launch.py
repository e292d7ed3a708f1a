"""Launchers on one machine: two torchrun "nodes", the DeepSpeed launcher, and what a dead or hung rank does."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers.distributed import REPO, free_port
from helpers.runs import read_metrics, train_losses, write_config

from megatron.config import load_config, parse_command_line
from megatron.parallel.distributed import ranks_from_env

MOE_EP2 = {"moe_num_experts": 4, "moe_top_k": 2, "moe_zloss_coeff": 0.001, "moe_expert_parallel_size": 2}
QUIET = {"eval_interval": 0, "save": None, "load": None}  # no evaluation, no checkpoints: just the steps
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_node(config: Path, node_rank: int, port: int, env=None) -> subprocess.Popen:
    """One of two torchrun "nodes" with one process each, meeting at 127.0.0.1:port (node 0 hosts the store).

    Its output goes to node{node_rank}.log next to the config (a file, so a long run never blocks on a pipe).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
           "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", str(REPO / "train.py"),
           str(config)]
    log_path = config.parent / f"node{node_rank}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env or ENV, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    return proc


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(return code, output) of each process; kills them all (and fails) when any is still running at `timeout`."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        pytest.fail(f"launch still running after {timeout:.0f}s")
    return [(proc.returncode, proc.log_path.read_text()) for proc in procs]


# --- torchrun across two "nodes" ------------------------------------------------------------------------------

@pytest.mark.slow  # CI's time budget; run with -m slow
def test_two_torchrun_nodes_with_expert_parallelism_match_one_process(tmp_path, data_prefix):
    one = write_config(tmp_path / "one", data_prefix, gradient_accumulation_steps=2, train_iters=4,
                       **{**MOE_EP2, "moe_expert_parallel_size": 1}, **QUIET)
    two = write_config(tmp_path / "two", data_prefix, gradient_accumulation_steps=1, train_iters=4, **MOE_EP2,
                       **QUIET)
    port = free_port()
    nodes = [torchrun_node(two, node_rank, port) for node_rank in (0, 1)]
    sys.path.insert(0, str(REPO))
    import train  # here, not at the top: the spawned ranks below import this module and need no trainer

    train.run([str(one)])  # the same global batch (2 x 4 sequences) on one process, while the nodes start
    for node_rank, (code, err) in enumerate(finish(nodes, timeout=150)):
        assert code == 0, f"node {node_rank} failed ({code}):\n{err[-3000:]}"
    records = read_metrics(tmp_path / "two" / "logs")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert records[-1]["tokens"] == 4 * 2 * 4 * 32  # steps x ranks x micro batch x sequence: both ranks trained
    assert train_losses(records) == pytest.approx(train_losses(read_metrics(tmp_path / "one" / "logs")), abs=1e-5)


# --- the DeepSpeed launcher -----------------------------------------------------------------------------------

def test_the_environment_and_arguments_the_deepspeed_launcher_gives_a_process_are_read(tmp_path, data_prefix):
    # deepspeed/launcher/launch.py (deepspeed 0.19.8, main()) sets, for process i of node n:
    #   MASTER_ADDR, MASTER_PORT, WORLD_SIZE, CROSS_RANK=n, CROSS_SIZE=nodes, LOCAL_SIZE, RANK, LOCAL_RANK=i,
    #   CUDA_VISIBLE_DEVICES=<the node's slots>, and runs `python -u train.py --local_rank=i <the user's args>`
    # (no --local_rank with --no_local_rank). Its pdsh multi-node path runs that same launch.py on each node.
    env = {"MASTER_ADDR": "node0", "MASTER_PORT": "29500", "WORLD_SIZE": "16", "CROSS_RANK": "1",
           "CROSS_SIZE": "2", "LOCAL_SIZE": "8", "RANK": "11", "LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert ranks_from_env(env) == (11, 16, 3)
    config = str(write_config(tmp_path, data_prefix))
    for argv in (["--local_rank=3", config, "--train_iters", "3"],  # what launch.py passes
                 [config, "--local_rank", "3", "--train_iters", "3"],
                 [config, "--train_iters=3", "--local-rank=3"]):  # torch.distributed.launch's spelling
        paths, overrides = parse_command_line(argv)
        assert paths == [config]
        assert load_config(paths, overrides).train_iters == 3
    assert parse_command_line(["--local_rank=0", config]) == ([config], [])


def deepspeed_launcher() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return None
    return shutil.which("deepspeed", path=os.pathsep.join([str(Path(sys.executable).parent), ENV.get("PATH", "")]))


@pytest.mark.skipif(deepspeed_launcher() is None, reason="deepspeed is not installed (pip install deepspeed)")
def test_deepspeed_launches_two_cpu_processes_from_a_hostfile(tmp_path, data_prefix):
    """launch/deepspeed.sh with a `localhost slots=2` hostfile: DeepSpeed picks its CPU accelerator here."""
    config = write_config(tmp_path, data_prefix, train_iters=2, **QUIET)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = {**ENV, "HOSTFILE": str(hostfile), "PATH": str(Path(deepspeed_launcher()).parent) + os.pathsep + ENV["PATH"],
           # one host: no ssh, and no `ssh host hostname -I` to find the master's address
           "DS_ARGS": f"--no_ssh_check --master_addr 127.0.0.1 --master_port {free_port()}"}
    result = subprocess.run(["bash", str(REPO / "launch" / "deepspeed.sh"), str(config)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "--local_rank=1" in result.stdout + result.stderr  # the launcher did pass it, and train.py ignored it
    records = read_metrics(tmp_path / "logs")
    assert [(r["step"], r["tokens"]) for r in records if "loss" in r] == [(1, 2 * 4 * 32), (2, 2 * 2 * 4 * 32)]


# --- a rank that hangs or dies --------------------------------------------------------------------------------

def _all_started(out_dir: str, rank: int, world_size: int) -> None:
    """A file barrier before init, so that a slow start cannot use up the short rendezvous timeout."""
    Path(out_dir, f"started{rank}").touch()
    deadline = time.monotonic() + 120
    while not all(Path(out_dir, f"started{r}").exists() for r in range(world_size)) and time.monotonic() < deadline:
        time.sleep(0.05)


def _rank_that_may_fail(rank: int, port: int, behaviour: str, out_dir: str) -> None:
    """Rank 0 all-reduces; rank 1 joins and then hangs, or exits, or never joins at all."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # what torchrun sets
    from megatron.parallel.distributed import describe_failure, init_distributed

    done = Path(out_dir) / "rank0.json"
    _all_started(out_dir, rank, 2)
    if rank == 1:
        if behaviour == "never_joins":
            return
        init_distributed("cpu", timeout_minutes=0.05)
        if behaviour == "exits":
            os._exit(0)
        while not done.exists():  # hangs: no all_reduce, until rank 0 has given up
            time.sleep(0.1)
        os._exit(0)
    start = time.monotonic()
    try:
        init_distributed("cpu", timeout_minutes=0.05)  # 3 s
        torch.distributed.all_reduce(torch.ones(4))
        outcome = {"error": None}
    except RuntimeError as err:
        outcome = {"error": str(err), "message": describe_failure(err)}
    outcome["seconds"] = time.monotonic() - start
    done.write_text(json.dumps(outcome))
    os._exit(0)  # leave the broken group without a teardown that could wait on the dead peer


@pytest.mark.parametrize("behaviour", ["hangs", "exits", "never_joins"])
def test_a_rank_that_hangs_or_dies_makes_the_other_fail_within_the_timeout(tmp_path, behaviour):
    mp.start_processes(_rank_that_may_fail, args=(free_port(), behaviour, str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    assert outcome["error"] is not None, "rank 0's all_reduce completed without rank 1"
    assert outcome["seconds"] < 15
    if behaviour == "exits":  # the peer's socket closes at once: no need to wait for the timeout
        assert "lost the connection to another rank" in outcome["message"]
    else:
        assert outcome["seconds"] > 2.5, "gave up before distributed_timeout_minutes"
        assert "timed out" in outcome["error"].lower()
        assert "distributed_timeout_minutes=0.05" in outcome["message"]


def pid_of_rank(token: str, rank: int) -> int | None:
    """The pid of the training process with RANK=rank among those started with LAUNCH_TEST_TOKEN=token."""
    wanted = {f"LAUNCH_TEST_TOKEN={token}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted <= set((entry / "environ").read_bytes().split(b"\0")):
                    return int(entry.name)
            except OSError:
                continue
    return None


def start_two_nodes_and_break_rank_1(tmp_path: Path, data_prefix: str, sig: int):
    """Two torchrun nodes on a long run; once training is under way, sends `sig` to rank 1 (node 1's process).

    Returns the two torchrun processes and rank 1's pid.
    """
    config = write_config(tmp_path, data_prefix, train_iters=1000, distributed_timeout_minutes=0.1, **MOE_EP2,
                          **QUIET)  # 6 s: short, but longer than the two nodes' start-up skew
    token = uuid.uuid4().hex
    env, port = {**ENV, "LAUNCH_TEST_TOKEN": token}, free_port()
    nodes = [torchrun_node(config, node_rank, port, env=env) for node_rank in (0, 1)]
    metrics, deadline = tmp_path / "logs" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        if time.monotonic() > deadline or any(node.poll() is not None for node in nodes):
            finish(nodes, timeout=1)
            pytest.fail("training did not start")
        time.sleep(0.2)
    pid = pid_of_rank(token, 1)
    if pid is None:
        finish(nodes, timeout=1)
        pytest.fail("rank 1's process not found")
    os.kill(pid, sig)
    return nodes, pid


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds rank 1's process in /proc")


@pytest.mark.slow  # CI's time budget: the hung and exiting ranks stay in CI
@needs_proc
def test_killing_a_rank_under_torchrun_ends_the_job_with_a_clear_error(tmp_path, data_prefix):
    nodes, _ = start_two_nodes_and_break_rank_1(tmp_path, data_prefix, signal.SIGKILL)
    (code0, err0), (code1, err1) = finish(nodes, timeout=30)  # both nodes end by themselves, at once
    assert code1 != 0 and "Signal 9 (SIGKILL)" in err1  # node 1's torchrun names its dead rank
    assert code0 != 0  # rank 0's next collective fails; one line, not a backtrace:
    assert "rank 0: distributed error: lost the connection to another rank, which probably died" in err0


@needs_proc
def test_a_hung_rank_under_torchrun_makes_the_others_fail_after_the_timeout(tmp_path, data_prefix):
    nodes, pid = start_two_nodes_and_break_rank_1(tmp_path, data_prefix, signal.SIGSTOP)  # frozen, not dead
    start = time.monotonic()
    try:
        [(code0, err0)] = finish(nodes[:1], timeout=30)
        seconds = time.monotonic() - start
    finally:  # the frozen rank stays frozen (its torchrun sees nothing wrong) until something kills it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        [(code1, _)] = finish(nodes[1:], timeout=30)
    assert code0 != 0 and code1 != 0
    assert 5.5 < seconds < 25
    assert "rank 0: distributed error: a collective or the rendezvous waited longer than " \
           "distributed_timeout_minutes=0.1" in err0


def _expert_group_member(rank: int, port: int, out_dir: str) -> None:
    """4 ranks, mesh (edp 2, ep 2): rank 0 all-reduces over its EP group {0, 1}; rank 1 never does."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from torch.distributed.device_mesh import init_device_mesh

    from megatron.parallel.distributed import describe_failure, init_distributed, subgroup_backend_override

    _all_started(out_dir, rank, 4)
    init_distributed("cpu", timeout_minutes=0.05)
    world = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",),
                             backend_override=subgroup_backend_override((4,), ("dp",)))
    shape, names = (2, 2), ("edp", "ep")
    experts = init_device_mesh("cpu", shape, mesh_dim_names=names,
                               backend_override=subgroup_backend_override(shape, names))
    torch.distributed.all_reduce(torch.ones(1), group=world.get_group())  # everyone is here
    done = Path(out_dir) / "rank0.json"
    if rank == 0:
        start = time.monotonic()
        try:
            torch.distributed.all_reduce(torch.ones(1), group=experts["ep"].get_group())
            outcome = {"message": None}
        except RuntimeError as err:
            outcome = {"message": describe_failure(err)}
        outcome["seconds"] = time.monotonic() - start
        done.write_text(json.dumps(outcome))
    while not done.exists():
        time.sleep(0.1)
    os._exit(0)


@pytest.mark.slow  # CI's time budget; run with -m slow
def test_expert_parallel_subgroups_get_the_timeout_too(tmp_path):
    # without subgroup_backend_override torch gives mesh sub-groups gloo's default 30 minutes
    mp.start_processes(_expert_group_member, args=(free_port(), str(tmp_path)), nprocs=4, start_method="spawn")
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    assert 2.5 < outcome["seconds"] < 15
    assert "distributed_timeout_minutes=0.05" in outcome["message"]


@pytest.mark.parametrize("preempted", [True, False])
def test_slurm_template_requeues_a_preempted_run_only(tmp_path, preempted):
    """launch/slurm.sbatch with stand-ins for srun and scontrol: a run that stopped on a signal (it wrote its step
    to $MEGATRON_STOPPED_FILE, as train.py does) is requeued; a finished one is not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\n" + ('echo 7 > "$MEGATRON_STOPPED_FILE"\n' if preempted else "")
                                  + 'echo "$@" > "$CALLS/srun"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nif [ "$1" = show ]; then echo node1; exit 0; fi\n'
                                      'echo "$@" >> "$CALLS/scontrol"\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node1"}
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "configs/tiny.yml", "--seed", "3"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "srun").read_text().split() == ["--kill-on-bad-exit=1", "python", "train.py",
                                                       "configs/tiny.yml", "--seed", "3"]
    requeued = (tmp_path / "scontrol").read_text().split() if (tmp_path / "scontrol").exists() else []
    assert requeued == (["requeue", "4242"] if preempted else [])
    assert not list(tmp_path.glob(".stopped_*"))  # the marker is cleaned up either way
