"""One owner per run directory, and every path a run writes checked before it writes any.

The lock, WORKDIR/run.lock, is a small JSON file created with O_EXCL (one creator wins):
holder host, pid, start time, the number of processes of its job and a heartbeat (a counter
and the holder's clock, rewritten in place every `interval` s by a daemon thread). A second
trainer reads it and decides:

  * the holder is on this machine (same host, boot and pid namespace) and its pid is alive
    with the recorded start time, heartbeat fresh: refused at once, naming the holder;
  * its heartbeat is older than `stale` s (D2V_LOCK_STALE_S, default 60), or it is on this
    machine and its pid is gone: the lock is taken over with a line saying so;
  * otherwise (another host, heartbeat still fresh): watched until it either advances
    (alive: refused, within about one heartbeat interval) or goes stale (taken over).

A take-over renames the old lock first (one rename wins) and keeps it as run.lock.stale. The
holder checks each heartbeat that run.lock is still its own file; when another trainer took
it over (this process was silent for `stale` s: stopped, swapped out) the trainer stops
without writing more (check()).

On a pod the job holds the lock, not each process: process 0 takes it and publishes the
outcome through the coordination service; the other processes wait for it, then check that
they see the same lock file (the run directory must be one shared directory).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

from d2v_jax import cli
from d2v_jax.config import ConfigError

LOCK_NAME = "run.lock"
DEFAULT_STALE_S = 60.0
KV_KEY = "d2v/run_lock"


class RunDirError(ConfigError):
  """The run directory cannot be used: held by another trainer, or a path is not writable."""


def stale_seconds(env=None) -> float:
  try:
    return cli.env_seconds("D2V_LOCK_STALE_S", DEFAULT_STALE_S, env)
  except ValueError as e:
    raise RunDirError(str(e)) from None


def _read_first(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


def _pid_start(pid: int) -> str:
  """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with
  the pid it identifies a process, so a recycled pid is not mistaken for the holder."""
  stat = _read_first(f"/proc/{pid}/stat")
  return stat.rsplit(")", 1)[-1].split()[19] if ")" in stat else ""


def _machine() -> dict:
  try:
    pidns = os.readlink("/proc/self/ns/pid")
  except OSError:
    pidns = ""
  return {"host": socket.gethostname(), "boot": _read_first("/proc/sys/kernel/random/boot_id"),
          "pidns": pidns}


def _alive(pid: int, start: str) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # someone else's process: it exists
    pass
  return not start or not _pid_start(pid) or _pid_start(pid) == start


def describe(h: dict) -> str:
  procs = int(h.get("processes", 1) or 1)
  job = f" (process 0 of a {procs}-process job)" if procs > 1 else ""
  return f"pid {h.get('pid')} on host {h.get('host')}{job}, started {h.get('started', '?')}"


class RunLock:
  """The lock of one run directory; acquire() or RunDirError naming the holder."""

  def __init__(self, workdir: str, processes: int = 1, stale: float | None = None,
               remove_dir: bool = False, log=None):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.stale = stale_seconds() if stale is None else float(stale)
    self.interval = min(max(self.stale / 12, 0.05), 5.0)
    self.processes = processes
    self.remove_dir = remove_dir      # the trainer created the directory: remove it if left empty
    self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    self.token = uuid.uuid4().hex
    self.lost: str | None = None      # set by the heartbeat when another trainer took over
    self._fd: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._info: dict = {}

  # ---------------------------------------------------------------- taking it

  def acquire(self) -> "RunLock":
    for _ in range(100):   # each turn either wins, raises, or saw the lock change under it
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
      except FileExistsError:
        holder = self._read(self.path)
        if holder is not None:
          self._judge(holder)   # raises when alive; returns when stale (then: take over)
          self._take_over(holder)
        continue
      except OSError as e:
        raise RunDirError(f"cannot create the lock {self.path} ({e.strerror}); fix the "
                          "directory's permissions or choose another --workdir") from None
      self._fd = fd
      now = time.time()
      self._info = {**_machine(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                    "processes": self.processes, "token": self.token,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                    "beat": 0, "beat_time": now, "argv": " ".join(sys.argv)[:500]}
      self._write()
      self._thread = threading.Thread(target=self._beat, name="d2v-run-lock", daemon=True)
      self._thread.start()
      return self
    raise RunDirError(f"the lock {self.path} keeps changing; another trainer is starting on "
                      "this run directory")

  def _read(self, path: str) -> dict | None:
    """The lock's content; None when it vanished. A lock being rewritten may read partial:
    retried; one that never parses is junk (a crash while writing it): stale."""
    for _ in range(5):
      try:
        with open(path) as f:
          text = f.read()
      except FileNotFoundError:
        return None
      except OSError as e:
        raise RunDirError(f"cannot read the lock {path} ({e.strerror}); fix its permissions "
                          "or choose another --workdir") from None
      try:
        h = json.loads(text)
        if isinstance(h, dict):
          return h
      except ValueError:
        pass
      time.sleep(0.02)
    return {"pid": "?", "host": "?", "beat_time": 0.0, "junk": True}

  def _refuse(self, h: dict, why: str):
    raise RunDirError(f"run directory {self.workdir} is in use by {describe(h)} ({why}); stop "
                      f"that run or wait for it to end, or choose another --workdir (a lock "
                      f"whose holder died is taken over after {self.stale:g} s)")

  def _judge(self, h: dict) -> None:
    """Returns when `h` is stale (its holder is dead); raises RunDirError when it is alive."""
    age = time.time() - float(h.get("beat_time", 0.0) or 0.0)
    here = all(h.get(k) == v for k, v in _machine().items())
    if h.get("junk") or age >= self.stale:
      h["why"] = f"no heartbeat for {age:.0f} s" if not h.get("junk") else "unreadable lock"
      return
    if here:
      pid = int(h.get("pid", -1))
      if _alive(pid, str(h.get("pid_start", ""))):
        self._refuse(h, f"alive, heartbeat {max(age, 0):.0f} s ago")
      h["why"] = f"process {pid} is gone"
      # Gone on this machine: take over once its heartbeat has surely stopped moving.
      wait = 2.5 * self.interval
    else:   # another host: its beat must move within the stale time, or it is dead
      wait = self.stale - max(age, 0.0)
      h["why"] = f"no heartbeat for {self.stale:g} s"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
      time.sleep(min(self.interval / 2, max(deadline - time.monotonic(), 0)))
      now = self._read(self.path)
      if now is None or now.get("token") != h.get("token"):
        return   # it changed hands meanwhile: the caller's next turn reads the new one
      if now.get("beat") != h.get("beat"):
        self._refuse(now, "its heartbeat is moving")

  def _take_over(self, h: dict) -> None:
    aside = f"{self.path}.taking.{os.getpid()}"
    try:
      os.rename(self.path, aside)   # of several trainers taking over, one rename wins
    except FileNotFoundError:
      return
    moved = self._read(aside) or {}
    if moved.get("token") != h.get("token"):   # a fresh lock replaced the stale one: put it back
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
      os.remove(aside)
      return
    os.replace(aside, self.path + ".stale")
    self.log(f"warning: taking over the lock of run directory {self.workdir} from "
             f"{describe(h)} ({h.get('why', 'stale')}); kept as {LOCK_NAME}.stale")

  # ---------------------------------------------------------------- holding it

  def _write(self) -> None:
    data = (json.dumps(self._info, sort_keys=True) + "\n").encode()
    os.pwrite(self._fd, data, 0)
    os.ftruncate(self._fd, len(data))

  def _beat(self) -> None:
    while not self._stop.wait(self.interval) and self.beat():
      pass

  def beat(self) -> bool:
    """One heartbeat; False (and `lost` set) when run.lock is no longer this trainer's file."""
    try:
      self._info["beat"] += 1
      self._info["beat_time"] = time.time()
      self._write()
      if os.stat(self.path).st_ino != os.fstat(self._fd).st_ino:
        raise FileNotFoundError
    except FileNotFoundError:
      h = self._read(self.path) or {"pid": "?", "host": "?"}
      self.lost = (f"lost the lock of run directory {self.workdir} to {describe(h)} (this "
                   f"process was silent for more than {self.stale:g} s); stopping without "
                   "writing more")
      return False
    except OSError:   # a transient storage error: the next beat tries again
      pass
    return True

  def check(self) -> None:
    """Raises RunDirError when another trainer took the lock over."""
    if self.lost:
      raise RunDirError(self.lost)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still this trainer's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=2 * self.interval + 1)
    if self._fd is not None:
      try:
        if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
          os.remove(self.path)
      except OSError:
        pass
      os.close(self._fd)
      self._fd = None
    if self.remove_dir:
      try:
        os.rmdir(self.workdir)   # only when empty: a launch refused at start leaves nothing
      except OSError:
        pass


def take(workdir: str, pid: int, nproc: int, client=None, remove_dir: bool = False,
         on_release=lambda release: None) -> RunLock | None:
  """The job's lock of `workdir`: process 0 acquires it (returned); with several processes it
  publishes the outcome under KV_KEY of the coordination service `client`, and the others wait
  for it (None returned) or raise the same error. `on_release(lock.release)` is called before
  the lock file exists, so an abort (a second Ctrl-C) during the acquisition releases it too."""
  def acquire() -> RunLock:
    lock = RunLock(workdir, processes=nproc, remove_dir=remove_dir)
    on_release(lock.release)
    return lock.acquire()

  if nproc == 1 or client is None:
    return acquire()
  if pid == 0:
    try:
      lock = acquire()
    except RunDirError as e:
      client.key_value_set(KV_KEY, f"error {e}", allow_overwrite=True)
      raise
    client.key_value_set(KV_KEY, f"ok {lock.token}", allow_overwrite=True)
    return lock
  # Process 0 may watch a foreign holder's heartbeat for up to the stale time first.
  timeout_ms = int((stale_seconds() + 120) * 1000)
  status = client.blocking_key_value_get(KV_KEY, timeout_ms)
  kind, _, rest = status.partition(" ")
  if kind == "error":
    raise RunDirError(rest)
  try:
    with open(os.path.join(workdir, LOCK_NAME)) as f:
      seen = json.load(f).get("token")
  except (OSError, ValueError):
    seen = None
  if seen != rest:
    raise RunDirError(f"process 0 locked {os.path.join(workdir, LOCK_NAME)} but process {pid} "
                      f"does not see that lock there: --workdir must be the same shared "
                      "directory on every host")
  return None


# What a run writes under WORKDIR (process 0: the first group; every process: checkpoints,
# and the data caches, which are local), with the kind each must be.
WRITER_PATHS = (("metrics.jsonl", "file"), ("tb", "dir"), ("config.json", "file"),
                ("config_changes.jsonl", "file"))
EVERY_PROCESS_PATHS = (("checkpoints", "dir"),)


def _probe_dir(path: str) -> str | None:
  """None when a file can be created, renamed and removed in directory `path`; else why not."""
  probe = os.path.join(path, f".d2v_probe.{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.replace(probe, probe + ".renamed")
    os.remove(probe + ".renamed")
  except OSError as e:
    return e.strerror or str(e)
  return None


def problem(path: str, kind: str) -> str | None:
  """Why `path` (a "file" or "dir" the run will write) cannot be written, or None."""
  if os.path.lexists(path):
    if kind == "dir":
      if not os.path.isdir(path):
        return "it is a file, not a directory"
      return _probe_dir(path)
    if os.path.isdir(path):
      return "it is a directory, not a file"
    try:
      with open(path, "a"):
        pass
    except OSError as e:
      return e.strerror or str(e)
    return None
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"{parent} is a file, not a directory"
  why = _probe_dir(parent)
  return f"{parent}: {why}" if why else None


def check_paths(workdir: str, cfg, writer: bool) -> None:
  """Every path the run will write, checked before it writes any: one RunDirError line naming
  the first that cannot be written (a save failing mid-run is the alternative)."""
  if "://" in workdir:   # remote run directory: its files go through its own filesystem
    return
  paths = [(os.path.join(workdir, name), kind, "--workdir")
           for name, kind in (WRITER_PATHS if writer else ()) + EVERY_PROCESS_PATHS]
  if "cache_dir" in cfg.get("data", {}):   # the text pipeline's block cache (data/text_corpus.py)
    cache = cfg.data.cache_dir
    paths.append((cache or os.path.join(workdir, "data_cache"), "dir",
                  "--config.data.cache_dir" if cache else "--workdir"))
  for path, kind, where in paths:
    why = problem(path, kind)
    if why:
      raise RunDirError(f"cannot write {path} ({why}); move it away, fix its permissions or "
                        f"choose another {where}")
