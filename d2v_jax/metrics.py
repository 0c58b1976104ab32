"""Process-0 metric writers (JSON lines + TensorBoard), throughput, ETA, and run guards."""

from __future__ import annotations

import json
import math
import os
import sys
import time


class Writer:
  """Writes metrics to WORKDIR/metrics.jsonl and TensorBoard events (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._f = open(self.path, "a")
    try:
      import tensorflow as tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tb"))
    except ImportError:  # TensorBoard events are a convenience; JSON lines are the record
      self._tb = None

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _py(v) for k, v in scalars.items()}}
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()
    if self._tb is not None:
      import tensorflow as tf
      with self._tb.as_default(step=int(step)):
        for k, v in row.items():
          if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
            tf.summary.scalar(k, v)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._f.close()
      if self._tb is not None:
        self._tb.close()


def _py(v):
  try:
    v = v.item() if hasattr(v, "item") else v
  except (TypeError, ValueError):
    return v
  return v


def read(workdir: str) -> list[dict]:
  """All rows of WORKDIR/metrics.jsonl (later rows of a resumed run follow earlier ones)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class Window:
  """Mean of each metric over the steps since the last log (what the log line shows); the
  non-finite counter is summed instead, so a skipped step is never averaged away."""

  def __init__(self):
    self.sums, self.n = {}, 0

  def add(self, m: dict) -> None:
    for k, v in m.items():
      self.sums[k] = self.sums.get(k, 0.0) + v
    self.n += 1

  def mean(self) -> dict:
    out = {k: (v if k == "nonfinite" else v / max(self.n, 1)) for k, v in self.sums.items()}
    self.sums, self.n = {}, 0
    return out


class Throughput:
  """Examples/s and tokens/s over the window since the last call, and an ETA."""

  def __init__(self, start_step: int, total_steps: int):
    self.t0 = self.t = time.perf_counter()
    self.start, self.last, self.total = start_step, start_step, total_steps

  def tick(self, step: int, examples_per_step: int, tokens_per_step: int) -> dict:
    now = time.perf_counter()
    dt, ds = max(now - self.t, 1e-9), step - self.last
    self.t, self.last = now, step
    rate = ds / dt
    done = step - self.start
    eta = (self.total - step) * (now - self.t0) / max(done, 1)
    return {"examples_per_s": examples_per_step * rate, "tokens_per_s": tokens_per_step * rate,
            "steps_per_s": rate, "eta_s": eta}


def progress_line(step: int, total: int, m: dict) -> str:
  eta = m.get("eta_s", 0.0)
  return (f"step {step:>7d}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | tau {m['tau']:.5f} "
          f"| {m.get('examples_per_s', 0):.1f} ex/s {m.get('tokens_per_s', 0):.0f} tok/s "
          f"| ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")


class Guards:
  """Host-side run guards on the metrics of each step (ALGORITHM.md §1.3 collapse checks).

  non-finite: the step already skipped the update on device; here we count consecutive
  skips and stop when guards.max_nonfinite is exceeded. Collapse: after guards.collapse_after
  steps, target_var / pred_var below their minimum -> warn or stop (guards.collapse_policy).
  """

  def __init__(self, g):
    self.g = g
    self.nonfinite_run = 0
    self.nonfinite_total = 0

  def check(self, step: int, m: dict) -> str | None:
    """Returns a message when training must stop, else None (warnings go to stderr)."""
    g = self.g
    if m.get("nonfinite", 0):
      self.nonfinite_run += 1
      self.nonfinite_total += 1
      if self.nonfinite_run > g.get("max_nonfinite", 10):
        return (f"{self.nonfinite_run} consecutive steps with non-finite loss/gradients at step "
                f"{step} (guards.max_nonfinite={g.get('max_nonfinite', 10)}); lower the lr or check the data")
    else:
      self.nonfinite_run = 0
    if step >= g.collapse_after:
      low = []
      if g.min_target_var > 0 and m["target_var"] < g.min_target_var:
        low.append(f"target_var={m['target_var']:.4g} < {g.min_target_var}")
      if g.min_pred_var > 0 and m["pred_var"] < g.min_pred_var:
        low.append(f"pred_var={m['pred_var']:.4g} < {g.min_pred_var}")
      if low:
        msg = f"representation collapse at step {step}: " + ", ".join(low)
        if g.get("collapse_policy", "stop") == "stop":
          return msg
        print(f"warning: {msg}", file=sys.stderr)
    return None
