"""What makes the processes of a job behave as one machine once they run (started by
d2v_jax/distributed.py): a heartbeat watchdog that ends every process when one is lost or
fails, and the vote that makes every process stop after the same step on a SIGTERM. The
module docstring of d2v_jax/distributed.py describes both."""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_CURRENT: dict = {"watchdog": None}


def start(client, pid: int, nproc: int, timeout: float, coordinator: str = "") -> "Watchdog":
  """Starts this process's watchdog (several processes) and makes it the current one."""
  wd = Watchdog(client, pid, nproc, timeout, coordinator)
  _CURRENT["watchdog"] = wd
  wd.start()
  atexit.register(wd.finish)   # runs before JAX's own exit hook (registered earlier)
  return wd


def current() -> "Watchdog | None":
  return _CURRENT["watchdog"]


def progress(step: int) -> None:
  """The trainer's current step, sent with the heartbeats (named when a process is lost)."""
  wd = _CURRENT["watchdog"]
  if wd is not None:
    wd.step = step


def finish() -> None:
  """A clean end of this process: peers stop watching it."""
  wd = _CURRENT["watchdog"]
  if wd is not None:
    wd.finish()


# A collective or barrier that failed because a peer vanished (gloo on CPU says so at once;
# TPU/GPU collectives may only hang, which the watchdog catches).
_LOST_PEER = re.compile(r"gloo|connection (reset|closed|refused)|socket closed|unavailable|"
                        r"deadline|heartbeat|barrier|coordination|peer", re.IGNORECASE)


def fail(message: str, exc: BaseException | None = None, code: int = 1,
         show_traceback: bool = False) -> None:
  """Ends this process of a multi-process job on an error (never returns when a watchdog
  runs; returns at once with one process). When the error looks like a lost peer, first
  waits up to the peer timeout for the watchdog to name the process that stopped (it exits
  from its thread); then tells the peers this process failed, prints `message` and leaves
  with os._exit(code): JAX's shutdown barrier would wait for the peers, which wait for us."""
  wd = _CURRENT["watchdog"]
  if wd is None:
    return
  if exc is not None and _LOST_PEER.search(f"{type(exc).__name__}: {exc}"):
    wd.check_coordinator()   # process 0 gone: say so now (JAX ends this process at once)
    print(f"error: {_first_line(exc)}; waiting up to {wd.timeout:g} s for the heartbeats to "
          "name the process that stopped", file=sys.stderr, flush=True)
    if wd.lost.wait(wd.timeout + 3 * wd.interval):
      time.sleep(10)   # the watchdog named the lost process and is ending this one
  if exc is not None and show_traceback:
    traceback.print_exception(exc, file=sys.stderr)
  wd.finish("failed")
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)


def _first_line(e: BaseException) -> str:
  text = (str(e).strip() or type(e).__name__).splitlines()[0]
  return text if len(text) <= 300 else text[:297] + "..."


class Watchdog:
  """Heartbeats through the coordination service's key-value store (a daemon thread).

  Every `interval` s this process writes d2v/beat/<pid> = "<count> <step>" and reads all the
  beats. A peer whose value has not changed for `timeout` s stopped responding (killed, OOM,
  hung with the GIL held): this process prints one line naming it and exits 1. A peer that
  wrote "failed" ended with an error: stop at once. "done" = a clean end, no longer watched.
  When the coordination service itself is gone, process 0 (its host) died."""

  PREFIX = "d2v/beat/"

  def __init__(self, client, pid: int, nproc: int, timeout: float, coordinator: str = ""):
    self.client, self.pid, self.nproc = client, pid, nproc
    self.timeout = float(timeout)
    self.interval = min(max(self.timeout / 10, 0.2), 5.0)
    self.coordinator = coordinator
    self.step: int | None = None
    self.lost = threading.Event()       # set just before this process exits for a lost peer
    self._stop = threading.Event()
    self._done = False
    self._lock = threading.Lock()
    self._exit = os._exit                # tests replace it
    self._thread = threading.Thread(target=self._run, name="d2v-peer-watchdog", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def finish(self, state: str = "done") -> None:
    """Stops the thread and publishes `state` (peers stop watching, or stop on "failed")."""
    with self._lock:
      if self._done:
        return
      self._done = True
      self._stop.set()
    if threading.current_thread() is not self._thread:
      self._thread.join(timeout=2 * self.interval + 1)
    try:
      self.client.key_value_set(f"{self.PREFIX}{self.pid}", state, allow_overwrite=True)
    except Exception:   # the service is gone: nothing to tell
      pass

  def check_coordinator(self) -> None:
    """Names process 0 and exits when the coordination service (process 0) is unreachable."""
    if self.pid == 0:
      return
    try:
      self.client.key_value_dir_get(self.PREFIX)
    except Exception as e:
      self._die(self._coordinator_lost(e))

  def _coordinator_lost(self, e: BaseException) -> str:
    where = f" at {self.coordinator}" if self.coordinator else ""
    return (f"error: process 0 stopped responding (the coordination service{where} is "
            f"unreachable: {_first_line(e)})")

  def _beats(self, count: int) -> dict[int, str]:
    self.client.key_value_set(f"{self.PREFIX}{self.pid}", f"{count} {self.step}",
                              allow_overwrite=True)
    out = {}
    for key, value in self.client.key_value_dir_get(self.PREFIX):
      try:
        out[int(key.rstrip("/").rsplit("/", 1)[-1])] = value
      except ValueError:
        pass
    return out

  def _run(self) -> None:
    start = time.monotonic()
    seen = {k: (None, start) for k in range(self.nproc) if k != self.pid}
    count = 0
    while not self._stop.wait(self.interval):
      count += 1
      try:
        beats = self._beats(count)
      except Exception as e:
        if self._stop.is_set():
          return
        self._die(self._coordinator_lost(e))
        return
      now = time.monotonic()
      for k, (value, since) in seen.items():
        new = beats.get(k)
        if new == "done":
          continue
        if new == "failed":
          self._die(f"error: process {k} failed (see its log)")
          return
        if new != value:
          seen[k] = (new, now)
        elif now - since > self.timeout:
          last = value.split()[1] if value and len(value.split()) > 1 else "none"
          self._die(f"error: process {k} stopped responding (no heartbeat for {now - since:.0f} "
                    f"s, peer timeout {self.timeout:g} s; its last step: {last})")
          return

  def _die(self, why: str) -> None:
    with self._lock:
      if self._done:
        return
      self._done = True
    try:
      sys.stdout.flush()
    except Exception:
      pass
    print(f"{why}; process {self.pid} stops too (exit 1). Finished checkpoints are intact: "
          "rerun the same command to resume from the latest", file=sys.stderr, flush=True)
    self.lost.set()
    self._exit(1)


class StopVote:
  """Agreement on a local flag (SIGTERM) across processes: start(flag) dispatches a max over
  one value per device of every process; result() is True on every process when any process
  voted True. The trainer votes after each step and reads the vote with that step's metrics,
  so every process reads the same votes in the same order and stops after the same step."""

  def __init__(self):
    mesh = Mesh(np.array(jax.devices()), ("processes",))
    self._in = NamedSharding(mesh, PartitionSpec("processes"))
    self._local = jax.local_device_count()
    self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

  def start(self, flag: bool):
    x = jax.make_array_from_process_local_data(self._in, np.full((self._local,), int(flag),
                                                                 np.int32))
    return self._max(x)

  @staticmethod
  def result(vote) -> bool:
    return bool(np.asarray(vote.addressable_data(0)))
