"""Timing helpers: interleaved repetitions, wall and process-CPU seconds, robust summaries.

Other jobs may share the machine, so every comparison runs its candidates interleaved in
one process (A, B, A, B, ...) and reports medians with the interquartile spread. Process
CPU time (all threads, user + system) is reported next to wall time: it does not grow when
the scheduler gives the process less than its cores, which makes it the steadier number on
a loaded machine (it does include time spent spinning in thread pools).
"""

from __future__ import annotations

import os
import resource
import time
from typing import Callable

import numpy as np


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def load() -> float:
  """1-minute load average (how busy the machine was)."""
  return round(os.getloadavg()[0], 2)


def run_interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, dict]:
  """Calls each fn once per round, `reps` rounds; fn must block until its work is done.

  Returns name -> {"wall": [s...], "cpu": [s...]}.
  """
  out = {k: {"wall": [], "cpu": []} for k in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      c0, t0 = cpu_seconds(), time.perf_counter()
      fn()
      out[name]["wall"].append(time.perf_counter() - t0)
      out[name]["cpu"].append(cpu_seconds() - c0)
  return out


def median(xs) -> float:
  return float(np.median(np.asarray(xs, np.float64)))


def spread(xs) -> float:
  """Interquartile range / median (0 = perfectly steady)."""
  x = np.asarray(xs, np.float64)
  m = np.median(x)
  return float((np.percentile(x, 75) - np.percentile(x, 25)) / m) if m > 0 else 0.0


def pin_to_one_core() -> None:
  """Restricts this process (and threads created later) to one CPU: XLA and PyTorch then
  size their thread pools to 1. Call before jax / torch are imported."""
  cpu = sorted(os.sched_getaffinity(0))[0]
  os.sched_setaffinity(0, {cpu})
  os.environ["OMP_NUM_THREADS"] = "1"
