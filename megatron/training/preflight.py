"""What can be checked about a run's surroundings before its first step, checked there, on every rank at once.

Three checks, each one generic mechanism rather than a case per value:
- **the ranks agree on the config**: every rank hashes its resolved config; if any differs from rank 0's, every
  rank stops with one line naming the keys that differ (instead of a shape error or a timeout later);
- **the output folders can be written**: `save`, `log_dir` and `tensorboard_dir` are created and written to
  once, so a path that is a file, read-only or on a full disk is found now, not at the first save;
- **no run damages checkpoints it did not write**: a fresh run refuses a save folder that holds another run's
  checkpoints (unless `overwrite_save: true`), and a lock file in the save folder, taken atomically, keeps a
  second run from writing the same folder at once (a lock left by a killed run on this host is taken over; an
  unreadable one is held).

Rank 0 looks at the file system and tells the others what it found, so every rank fails with the same line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron.config import ConfigError
from megatron.training.checkpoint import same_folder

log = logging.getLogger("megatron.preflight")
LOCK_NAME = ".lock"


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def differing_keys(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    return sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))


def check_ranks_agree(config: dict[str, Any]) -> None:
    """Every rank's resolved config equals rank 0's; else one line on every rank naming the keys that differ."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, config_digest(config))
    if len(set(digests)) == 1:
        return
    first_other = next(rank for rank, digest in enumerate(digests) if digest != digests[0])
    configs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(configs, config)  # only when they differ: say how
    keys = differing_keys(configs[0], configs[first_other])
    shown = ", ".join(f"{key} ({configs[0].get(key)!r} on rank 0, {configs[first_other].get(key)!r} on rank "
                      f"{first_other})" for key in keys[:4])
    ranks = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    raise ConfigError(f"ranks {ranks} were started with another config than rank 0: {shown}"
                      + (f" and {len(keys) - 4} more" if len(keys) > 4 else ""))


def check_writable(key: str, folder: str | None) -> None:
    """Creates `folder` and writes a file in it once; one line naming the key on any failure."""
    if not folder:
        return
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {folder} is a file; expected a folder to write into")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}: {folder} cannot be written ({err.strerror or type(err).__name__})") from None


def checkpoints_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("global_step*") if p.is_dir()) if folder.is_dir() else []


def resumes_from(load: str | None, save: str) -> bool:
    """Whether `load` names the save folder itself or a checkpoint inside it (then saving there continues it)."""
    if not load:
        return False
    return same_folder(load, save) or same_folder(Path(load).parent, save)


def check_not_overwriting(save: str | None, load: str | None, overwrite: bool) -> None:
    """A run that does not continue the checkpoints in its save folder would write over them and move `latest`."""
    if not save or overwrite or resumes_from(load, save):
        return
    found = checkpoints_in(Path(save))
    if found:
        raise ConfigError(f"save: {save} holds another run's checkpoints ({', '.join(found[-3:])}) and this run does "
                          "not resume from them (load is not that folder): set load to it to continue that run, "
                          "choose another save folder, or set overwrite_save: true to write over them")


@dataclass
class SaveLock:
    """`SAVE/.lock`, held by one run at a time, removed when the run ends.

    Taken atomically: the whole lock (host, pid, start time, a token of this run) is written to a temporary file of
    this process's own, then hard-linked to `.lock`; `os.link` fails when the name exists, so of two runs starting
    at the same instant exactly one gets the lock, and no run ever reads a half-written one. A file rather than an
    OS lock (flock) alone, because the lock must be seen by runs on other hosts sharing the folder, where flock may
    be local to one host (Lustre's `localflock`) or unsupported, and because it names its owner for the refusal.

    A lock whose process is gone (known on its own host only) is taken over under an flock on the lock file's
    inode, so two takers cannot both win (see `remove_if_unchanged`); both contend on the dead run's host, where
    flock works, and the kernel drops an flock when its process dies, so a taker killed midway leaves nothing
    stale. An unreadable lock is treated as held: its owner cannot be known, so the line asks for a look."""

    path: Path
    token: str

    @classmethod
    def acquire(cls, folder: str) -> SaveLock:
        path = Path(folder) / LOCK_NAME
        token = uuid.uuid4().hex
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "token": token, **elastic_attempt()}
        for _ in range(10):  # each try ends with the lock, a refusal, or a lock that changed hands meanwhile
            if create_exclusively(path, json.dumps(me), token):
                return cls(path, token)
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue  # released or removed meanwhile: try again
            except (OSError, UnicodeDecodeError) as err:
                raise unreadable_lock(path, folder, type(err).__name__) from None
            holder = parse_lock(text)
            if holder is None:
                raise unreadable_lock(path, folder, f"contents {text[:60]!r}, not the JSON host and pid a run writes")
            if not is_stale(holder):
                raise ConfigError(
                    f"save: {folder} is in use by another run (process {holder['pid']} on {holder['host']} "
                    f"since {holder.get('since')}, lock {path}); if that run is dead, delete the lock file")
            try:
                removed = remove_if_unchanged(path, text)
            except OSError as err:
                raise ConfigError(f"save: the lock {path} of process {holder['pid']}, which is no longer running, "
                                  f"could not be taken over ({err.strerror or type(err).__name__}); delete it if no "
                                  f"run is using {folder}") from None
            if removed:
                log.warning("save: taking over %s, left by process %s on %s, which is no longer running",
                            path, holder["pid"], holder["host"])
        raise ConfigError(f"save: could not take the lock {path}: it changed hands 10 times while this run tried")

    def release(self) -> None:
        """Removes the lock if it is still this run's (not one that replaced it after someone deleted ours)."""
        try:
            holder = parse_lock(self.path.read_text())
        except (OSError, UnicodeDecodeError):
            return
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def unreadable_lock(path: Path, folder: str, why: str) -> ConfigError:
    """Its owner cannot be known, so the lock is held: a person has to look."""
    return ConfigError(f"save: the lock {path} could not be read ({why}); if no run is using {folder}, delete it")


def create_exclusively(path: Path, text: str, token: str) -> bool:
    """Creates `path` holding `text` in one step (written aside, then hard-linked); False when `path` exists."""
    aside = path.with_name(f"{path.name}.{token}.tmp")
    try:
        aside.write_text(text)
        os.link(aside, path)
        return True
    except FileExistsError:
        return False
    finally:
        aside.unlink(missing_ok=True)


def remove_if_unchanged(path: Path, expected: str) -> bool:
    """Removes the lock file at `path` if it still holds `expected` (a stale lock this run read); True if this call
    removed it. Under an exclusive flock on the file's inode: a second taker that opened the same stale file waits,
    then finds `path` gone or leading to another inode (the first taker's new lock), and looks again."""
    try:
        fd = os.open(path, os.O_RDWR)  # read-write: on NFS, flock is emulated by fcntl locks, which need it
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            return False
        if os.pread(fd, len(expected.encode()) + 1, 0) != expected.encode():
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)  # and with it the flock


def parse_lock(text: str) -> dict[str, Any] | None:
    """The lock's owner, or None when `text` is not a lock a run wrote (garbage, empty, cut short)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if names_an_owner(holder) else None


def names_an_owner(holder: Any) -> bool:
    """A host name and a process id (above 0: os.kill(0 or below) would ask about a group of processes)."""
    return (isinstance(holder, dict) and isinstance(holder.get("host"), str) and isinstance(holder.get("pid"), int)
            and holder["pid"] > 0)


def elastic_attempt() -> dict[str, Any]:
    """Under torchrun's elastic agent: the job's run id (--rdzv_id) and this attempt's number, which a restart
    raises; {} otherwise (torchrun's default run id "none" names no job)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return {} if run_id == "none" else {"elastic_run": run_id,
                                        "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}


def is_stale(holder: dict[str, Any]) -> bool:
    """A lock is stale when its process is gone: known only on the host that took it (another host's lock is
    kept, and the message says to delete it if that run is dead), or when an earlier attempt of this same elastic
    job took it: the agents stop every worker before a restart, and the node that held it may be the one lost."""
    mine = elastic_attempt()
    if mine and holder.get("elastic_run") == mine["elastic_run"] and isinstance(holder.get("attempt"), int) \
            and holder["attempt"] < mine["attempt"]:
        return True
    if not names_an_owner(holder) or holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def preflight(args, is_main: bool) -> SaveLock | None:
    """All three checks; rank 0's file-system findings reach every rank, so all stop with the same line.
    Returns the save lock (rank 0 holds it) for the caller to release when the run ends."""
    check_ranks_agree(args.to_dict())
    problem, lock = None, None
    if is_main:
        try:
            for key in ("save", "log_dir", "tensorboard_dir"):
                check_writable(key, getattr(args, key))
            check_not_overwriting(args.save, args.load, args.overwrite_save)
            lock = SaveLock.acquire(args.save) if args.save else None
        except ConfigError as err:
            problem = str(err)
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise ConfigError(problem)
    return lock
