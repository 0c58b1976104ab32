"""Process-0 metric writers (JSON lines + TensorBoard), throughput, ETA, and run guards."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import sys
import time


class Writer:
  """Writes metrics to WORKDIR/metrics.jsonl and TensorBoard events (process 0 only).

  Files are opened at the first row, so a launch that fails before its first step leaves the
  run directory as it was."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._f = None
    self._tb = None

  def _open(self) -> None:
    self._f = open(self.path, "a")
    if self._f.tell() > 0:
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":  # a row cut by a crash: end it, so the next row parses
          self._f.write("\n")
    try:
      # TensorFlow (seconds of import) only once TensorBoard events are written
      import tensorflow as tf
      self._tb = tf.summary.create_file_writer(os.path.join(self.workdir, "tb"))
    except ImportError:  # TensorBoard events are a convenience; JSON lines are the record
      self._tb = None

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    if self._f is None:
      self._open()
    row = {"step": int(step), **{k: _py(v) for k, v in scalars.items()}}
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()
    if self._tb is not None:
      # TensorFlow (seconds of import) only once TensorBoard events are written
      import tensorflow as tf
      with self._tb.as_default(step=int(step)):
        for k, v in row.items():
          if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
            tf.summary.scalar(k, v)
      self._tb.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _py(v):
  try:
    v = v.item() if hasattr(v, "item") else v
  except (TypeError, ValueError):
    return v
  return v


def read(workdir: str) -> list[dict]:
  """All rows of WORKDIR/metrics.jsonl (later rows of a resumed run follow earlier ones); a row
  cut short by a crash is left out."""
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return rows


SPARSE_PREFIXES = ("rank_",)  # metrics the step computes only every N steps (NaN between)


def _sparse(k: str) -> bool:
  return k.startswith(SPARSE_PREFIXES)


class Window:
  """Mean of each metric over the steps since the last log (what the log line shows); the
  non-finite counter is summed instead, so a skipped step is never averaged away. Sparse
  metrics (rank_*: NaN on the steps that do not compute them) are averaged over the steps
  that did, and left out of the row when none did (JSON has no NaN)."""

  def __init__(self):
    self.sums, self.counts, self.n = {}, {}, 0

  def add(self, m: dict) -> None:
    for k, v in m.items():
      if _sparse(k) and not math.isfinite(v):
        continue
      self.sums[k] = self.sums.get(k, 0.0) + v
      self.counts[k] = self.counts.get(k, 0) + 1
    self.n += 1

  def mean(self) -> dict:
    def one(k, v):
      if k == "nonfinite":
        return v
      if _sparse(k):
        return v / self.counts[k]
      return v / max(self.n, 1)
    out = {k: one(k, v) for k, v in self.sums.items() if not _sparse(k) or self.counts.get(k)}
    self.sums, self.counts, self.n = {}, {}, 0
    return out


class Throughput:
  """Examples/s and tokens/s over the window since the last call, an ETA, and elapsed_s: the
  wall time since this launch's loop began (first step's compile included), which is what
  equal-time comparisons of two recipes pick checkpoints by."""

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
            "steps_per_s": rate, "eta_s": eta, "elapsed_s": now - self.t0}


def progress_line(step: int, total: int, m: dict) -> str:
  eta = m.get("eta_s", 0.0)
  return (f"step {step:>7d}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | tau {m['tau']:.5f} "
          f"| {m.get('examples_per_s', 0):.1f} ex/s {m.get('tokens_per_s', 0):.0f} tok/s "
          f"| ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")


NONFINITE_POLICIES = ("stop", "rollback")
COLLAPSE_POLICIES = ("warn", "stop", "rollback")
RANK_FLOORS = (("rank_target", "min_target_rank"), ("rank_pred", "min_pred_rank"))


@dataclasses.dataclass
class Verdict:
  """What the trainer must do about an incident: "stop", or "rollback" to a checkpoint
  written before step `first_bad` (the first step of the incident)."""
  action: str
  msg: str
  first_bad: int


class Guards:
  """Host-side run guards on the metrics of each step (docs/algorithm.md §1.3 collapse checks).

  Non-finite: the step already skipped the update on device (metrics["nonfinite"] = 1); here
  consecutive skips are counted, and more than guards.max_nonfinite in a row triggers
  guards.nonfinite_policy (stop | rollback). Collapse: from step guards.collapse_after on,
  target_var / pred_var below guards.min_target_var / min_pred_var (0 = off) triggers
  guards.collapse_policy (warn | stop | rollback). Dimensional collapse: from step
  guards.rank_after on, the mean of rank_target / rank_pred (the in-step effective ranks,
  d2v_jax/health.py) over the last guards.rank_window steps that computed them, below
  guards.min_target_rank / min_pred_rank (absolute effective ranks; 0 = off), triggers
  guards.rank_policy (warn | stop | rollback); steps that did not compute a rank (NaN,
  eval.step_rank_every > 1) are not judged. Messages carry the numbers.
  """

  def __init__(self, g):
    self.g = g   # checked by d2v_jax/validate.py
    self.nonfinite_total = 0
    self.reset()

  def reset(self) -> None:
    """Forgets the current incident (after a rollback)."""
    self.nonfinite_run = 0
    self.nonfinite_since: int | None = None
    self.collapse_since: int | None = None
    self.rank_since: int | None = None
    self.rank_recent = {k: collections.deque(maxlen=int(self.g.rank_window))
                        for k, _ in RANK_FLOORS}

  @property
  def healthy(self) -> bool:
    """False during an incident: periodic checkpoints are then held back, so the kept ones
    still include a state from before it (the rollback target)."""
    collapsing = self.collapse_since is not None and self.g.collapse_policy != "warn"
    low_rank = self.rank_since is not None and self.g.rank_policy != "warn"
    return self.nonfinite_run == 0 and not collapsing and not low_rank

  def check(self, step: int, m: dict) -> Verdict | None:
    """Verdict when the trainer must act, else None (warnings go to stderr)."""
    g = self.g
    if m.get("nonfinite", 0):
      self.nonfinite_total += 1
      self.nonfinite_run += 1
      if self.nonfinite_since is None:
        self.nonfinite_since = step
      limit = g.max_nonfinite
      if self.nonfinite_run > limit:
        return Verdict(g.nonfinite_policy,
                       f"{self.nonfinite_run} consecutive steps with non-finite loss/gradients "
                       f"(steps {self.nonfinite_since}..{step}, {self.nonfinite_total} in this "
                       f"run) > guards.max_nonfinite={limit}; lower the lr or check the data",
                       self.nonfinite_since)
      return None   # the step was skipped: its variances say nothing
    self.nonfinite_run, self.nonfinite_since = 0, None
    verdict = self._check_collapse(step, m)
    rank_verdict = self._check_rank(step, m)
    return verdict or rank_verdict

  def _check_rank(self, step: int, m: dict) -> Verdict | None:
    g = self.g
    fresh = [k for k, _ in RANK_FLOORS if math.isfinite(m.get(k, math.nan))]
    for k in fresh:
      self.rank_recent[k].append(m[k])
    floors = [(k, key, g[key]) for k, key in RANK_FLOORS if g[key] > 0]
    if not floors or step < g.rank_after:
      self.rank_since = None
      return None
    if not any(k in fresh for k, _, _ in floors):  # no rank this step: the incident stays as it was
      return None
    mean = lambda k: sum(self.rank_recent[k]) / len(self.rank_recent[k])
    window = lambda k: (f" (mean of the last {len(self.rank_recent[k])} ranks)"
                        if len(self.rank_recent[k]) > 1 else "")
    low = [f"{k}={mean(k):.4g}{window(k)} < guards.{key}={floor}" for k, key, floor in floors
           if self.rank_recent[k] and mean(k) < floor]
    return self._incident("rank", "dimensional collapse", step, low)

  def _check_collapse(self, step: int, m: dict) -> Verdict | None:
    g = self.g
    low = []
    if step >= g.collapse_after:
      if g.min_target_var > 0 and m["target_var"] < g.min_target_var:
        low.append(f"target_var={m['target_var']:.4g} < guards.min_target_var={g.min_target_var}")
      if g.min_pred_var > 0 and m["pred_var"] < g.min_pred_var:
        low.append(f"pred_var={m['pred_var']:.4g} < guards.min_pred_var={g.min_pred_var}")
    return self._incident("collapse", "representation collapse", step, low)

  def _incident(self, kind: str, what: str, step: int, low: list[str]) -> Verdict | None:
    """Tracks the `kind` incident (rank | collapse): starts it at the first low step, ends it
    at the first healthy one; guards.<kind>_policy says what to do (warn: once per incident)."""
    since = f"{kind}_since"
    if not low:
      setattr(self, since, None)
      return None
    first = getattr(self, since) is None
    if first:
      setattr(self, since, step)
    msg = f"{what} at step {step} (since step {getattr(self, since)}): " + ", ".join(low)
    policy = self.g[f"{kind}_policy"]
    if policy == "warn":
      if first:
        print(f"warning: {msg}; training continues (guards.{kind}_policy=warn)",
              file=sys.stderr, flush=True)
      return None
    return Verdict(policy, msg, getattr(self, since))
