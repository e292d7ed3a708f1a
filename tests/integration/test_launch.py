"""Launchers on one machine: two torchrun "nodes", the DeepSpeed launcher, and what a dead or hung rank does."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
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


def torchrun_node(config: Path, node_rank: int, port: int, env=None, script: Path = REPO / "train.py"
                  ) -> subprocess.Popen:
    """One of two torchrun "nodes" with one process each, meeting at 127.0.0.1:port (node 0 hosts the store).

    Its output goes to node{node_rank}.log next to the config (a file, so a long run never blocks on a pipe).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
           "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", str(script), str(config)]
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
        Path(out_dir, "pid1").write_text(str(os.getpid()))
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
    if behaviour != "never_joins":  # it joined, so the store knows its host and pid; it never reported giving up
        pid = (tmp_path / "pid1").read_text()
        assert f"rank 1 (host {socket.gethostname()}, pid {pid}) did not arrive" in outcome["message"]
        assert "(all_reduce from tests/integration/test_launch.py:" in outcome["message"]  # where rank 0 gave up


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
    # ... naming the rank that never came, and where rank 0 waited: a torch.distributed call (or, for DDP's gradient
    # all-reduce, which runs inside autograd, the trainer's line), and the training step
    assert f"rank 1 (host {socket.gethostname()}, pid {pid}) did not arrive within 2s" in err0
    assert re.search(r"distributed_timeout_minutes=0\.1 \((\w+ from |in )megatron/[\w/]+\.py:\d+ \(\w+\), "
                     r"training step \d+\)", err0), err0[-2000:]


def _three_ranks_one_stopped(rank: int, port: int, stopped: int, out_dir: str) -> None:
    """3 ranks all-reduce once, then rank `stopped` freezes itself (SIGSTOP) and the others all-reduce again."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from megatron.parallel.distributed import all_reduce_mean, describe_failure, init_distributed, note_activity

    _all_started(out_dir, rank, 3)
    init_distributed("cpu", timeout_minutes=0.05)
    all_reduce_mean(torch.ones(1))  # everyone is here
    Path(out_dir, f"pid{rank}").write_text(str(os.getpid()))
    note_activity("training step 5")
    if rank == stopped:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen until the test kills it
    if rank == 1:  # comes 1 s late, so gives up after rank 0, which (holding the store) must wait for it to read
        time.sleep(1)
    start = time.monotonic()
    try:
        all_reduce_mean(torch.ones(1))
        outcome = {"message": None}
    except RuntimeError as err:
        outcome = {"message": describe_failure(err)}
    outcome["seconds"] = time.monotonic() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
    os._exit(0)


@pytest.mark.parametrize("stopped", [2, 0])
def test_every_rank_left_names_the_stopped_one_or_the_store_that_does_not_answer(tmp_path, stopped):
    """Rank 0 holds the store when no torchrun agent does (SLURM, mpirun): frozen, it is named as the store."""
    context = mp.start_processes(_three_ranks_one_stopped, args=(free_port(), stopped, str(tmp_path)), nprocs=3,
                                 start_method="spawn", join=False)
    others = [rank for rank in range(3) if rank != stopped]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"rank{r}.json").exists() for r in others) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:  # the stopped rank stays stopped until killed
        context.processes[stopped].kill()
        for process in context.processes:
            process.join(timeout=30)
    for rank in others:
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        message = outcome["message"]
        assert message.startswith(f"rank {rank}: distributed error: "), message
        assert "(all_reduce from megatron/parallel/distributed.py:" in message and "training step 5)" in message
        if stopped == 0:
            assert "the rendezvous store at 127.0.0.1:" in message and "did not answer within 5s" in message
            assert outcome["seconds"] < 3 + 5 + 10  # the timeout, the bounded wait, slack: never stuck on the store
        else:
            pid = (tmp_path / "pid2").read_text()
            assert f"rank 2 (host {socket.gethostname()}, pid {pid}) did not arrive within 2s" in message
            assert "rank 0 (host" not in message and "rank 1 (host" not in message  # they came, and gave up too
            assert outcome["seconds"] < 3 + 2 + 10


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


# --- a slow rank -----------------------------------------------------------------------------------------------

@needs_proc
@pytest.mark.parametrize("pos_emb", ["rotary", pytest.param("learned", marks=pytest.mark.slow)])
def test_a_rank_slowed_on_purpose_is_named_once_and_again_when_it_recovers(tmp_path, data_prefix, pos_emb):
    """Two torchrun ranks; rank 1 sleeps 0.3 s fetching each batch of steps 3 to 8 (helpers/slow_rank_train.py).
    Rotary tables are buffers, which DDP broadcasts from rank 0 before each forward: there rank 0 waits for rank 1.
    Without buffers (learned positions) the first wait is the gradient all-reduce in the last backward."""
    config = write_config(tmp_path, data_prefix, train_iters=14, straggler_window=2, pos_emb=pos_emb, **QUIET)
    env, port = {**ENV, "SLOW_RANK": "1", "SLOW_FROM": "2", "SLOW_TO": "8", "SLOW_SECONDS": "0.3"}, free_port()
    script = REPO / "tests" / "helpers" / "slow_rank_train.py"
    nodes = [torchrun_node(config, node_rank, port, env=env, script=script) for node_rank in (0, 1)]
    (code0, out0), (code1, out1) = finish(nodes, timeout=150)
    assert code0 == 0 and code1 == 0, out0[-3000:] + out1[-3000:]
    lines = [line for line in out0.splitlines() if "straggler: rank 1" in line]
    assert len(lines) == 2, out0[-3000:]
    assert f"straggler: rank 1 (host {socket.gethostname()}) took " in lines[0]
    assert "x the other ranks' median, in each of the last 2 log intervals (straggler_factor 2)" in lines[0]
    assert "straggler: rank 1 (host" in lines[1] and "is no longer slow" in lines[1]
    assert "straggler:" not in out1  # rank 0 speaks for all
    records = {r["step"]: r for r in read_metrics(tmp_path / "logs") if "loss" in r}
    assert all(records[step]["stragglers/slowest_rank"] == 1 for step in range(3, 9))
    assert records[5]["stragglers/max_work_ratio"] > 2


# --- elastic: losing a node -----------------------------------------------------------------------------------

def elastic_agent(config: Path, name: str, port: int, is_host: bool) -> subprocess.Popen:
    """One node of launch/torchrun_elastic.sh (1 process, --nnodes 1:2), output in {name}.log beside the config.
    The first agent holds the rendezvous store; dead nodes are dropped after 2 s, a round closes 5 s after the
    minimum is there."""
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{ENV['PATH']}", "MIN_NODES": "1",
           "MAX_NODES": "2", "NPROC": "1", "MAX_RESTARTS": "2", "RDZV_ENDPOINT": f"127.0.0.1:{port}",
           "RUN_ID": f"elastic-{port}", "RDZV_CONF": "last_call_timeout=5,join_timeout=120,keep_alive_interval=1,"
           f"keep_alive_max_attempt=2,is_host={str(is_host).lower()}"}
    log_path = config.parent / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", str(REPO / "launch" / "torchrun_elastic.sh"), str(config)], env=env,
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    return proc


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a torchrun agent's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


@pytest.mark.slow  # about 45 s: two agents, a restart after the rendezvous drops the dead node, a reference run
@needs_proc
def test_losing_a_node_re_forms_the_run_at_the_smaller_world_and_continues_its_loss_curve(tmp_path, data_prefix):
    run = tmp_path / "run"
    config = write_config(run, data_prefix, train_iters=30, train_batch_size=8, train_micro_batch_size_per_gpu=2,
                          gradient_accumulation_steps=None, checkpoint_factor=4, eval_interval=0,
                          distributed_timeout_minutes=0.1)
    port = free_port()
    survivor, lost = elastic_agent(config, "A", port, True), elastic_agent(config, "B", port, False)
    metrics, deadline = run / "logs" / "metrics.jsonl", time.monotonic() + 120
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 10):
            if time.monotonic() > deadline or survivor.poll() is not None or lost.poll() is not None:
                pytest.fail("training did not start:\n" + survivor.log_path.read_text()[-3000:])
            time.sleep(0.2)
        for pid in [*children(lost.pid), lost.pid]:  # the node is lost: its worker and its agent, at once
            os.kill(pid, signal.SIGKILL)
        [(code, out)] = finish([survivor], timeout=180)
    finally:
        for proc in (survivor, lost):
            if proc.poll() is None:
                for pid in [*children(proc.pid), proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, out[-4000:]
    assert ("restart 1 of torchrun's elastic agent: 1 rank(s) now; train_batch_size 8 kept with "
            "gradient_accumulation_steps 4 x micro batch 2 x 1 rank(s)") in out
    resumed = int(re.search(r"resumed from \S+global_step(\d+) at step", out).group(1))
    assert resumed >= 4
    records = read_metrics(run / "logs")
    start = max(i for i, r in enumerate(records) if r.get("step") == resumed + 1)  # the restarted run's records
    after = {r["step"]: r for r in records[start:] if "loss" in r}
    assert sorted(after) == list(range(resumed + 1, 31))
    assert after[30]["tokens"] == 30 * 8 * 32  # the global batch was kept through the restart
    # what a run never interrupted would do at that layout: one rank resumed from the same checkpoint
    reference = tmp_path / "reference"
    sys.path.insert(0, str(REPO))
    import train

    train.run([str(config), "--load", str(run / "ckpt" / f"global_step{resumed}"), "--save", str(reference / "ckpt"),
               "--log_dir", str(reference / "logs")])
    expected = train_losses(read_metrics(reference / "logs"))
    assert {step: r["loss"] for step, r in after.items()} == pytest.approx(expected, abs=1e-6)


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
