"""Mutation check of the step's tests: does each test catch the bug it is named after?

  python tools/mutants.py [--only NAME ...] [--rev REV] [--timeout S] [--out FILE] [--list]
                          [--check] [--no-baseline]

MUTANTS is a named list of one-line bugs in the train step, optimizer, EMA, targets, losses,
masks, objectives, health metrics and guards, each with the fast tests that should catch it.
The tool copies the repository (the working tree's tracked and unignored files, or with --rev
the tree of that commit) to a temporary directory, first runs every listed test there
unmutated (they must pass, or "caught" means nothing), then for each mutant: applies its
one-line change to the copy, runs its tests (pytest -x, in the listed order; tests the copy
does not have are left out), restores the file. It prints a table `mutant | caught by | time`
and exits 1 if any mutant survives. The shared working tree is never modified.

Not run in CI (a few minutes per mutant on a laptop core: ~15-25 min for the list);
tests/test_mutants.py checks the list itself cheaply. --check only applies each mutation to a
copy and compiles it. --rev REV measures the tests of an older commit (the "before" table).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = "tests/test_bench.py::test_torch_reference_matches_our_step"
STEP = "tests/test_step.py::"


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str              # file, relative to the repository root
  old: str               # a substring of exactly one line, present exactly once in the file
  new: str               # its replacement (one line)
  tests: tuple           # pytest node ids, most specific first

  def apply(self, text: str) -> str:
    if "\n" in self.old or "\n" in self.new or self.old == self.new:
      raise ValueError(f"{self.name}: a mutation is one changed line")
    n = text.count(self.old)
    if n != 1:
      raise ValueError(f"{self.name}: {self.old!r} occurs {n} times in {self.path}, not once")
    return text.replace(self.old, self.new)


M = Mutant
MUTANTS = [
    # ---------------------------------------------------------------- d2v_jax/step.py
    M("step: EMA update switched off", "d2v_jax/step.py",
      "teacher = ema.ema_update(state.teacher, ema.select_like(params, state.teacher), tau)",
      "teacher = state.teacher",
      (STEP + "test_teacher_is_the_ema_of_the_student",
       STEP + "test_loss_decreases_and_teacher_moves_by_tau", PARITY + "[text]")),
    M("step: tau of the update count before the update", "d2v_jax/step.py",
      "tau = ema.tau_from_config(state.step + 1, cfg.teacher)",
      "tau = ema.tau_from_config(state.step, cfg.teacher)",
      (STEP + "test_teacher_is_the_ema_of_the_student",
       STEP + "test_loss_decreases_and_teacher_moves_by_tau", PARITY + "[text]")),
    M("guard: skipped step still updates the student", "d2v_jax/step.py",
      "params=keep(params, state.params)", "params=params",
      (STEP + "test_nonfinite_step_is_skipped",)),
    M("guard: skipped step still updates the teacher", "d2v_jax/step.py",
      "teacher=keep(teacher, state.teacher)", "teacher=teacher",
      (STEP + "test_nonfinite_step_is_skipped",)),
    M("guard: skipped step still updates the optimizer state", "d2v_jax/step.py",
      "opt_state=keep(opt_state, state.opt_state))", "opt_state=opt_state)",
      (STEP + "test_nonfinite_step_is_skipped",)),
    M("guard: the gradient is not checked", "d2v_jax/step.py",
      "finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)", "finite = jnp.isfinite(loss)",
      (STEP + "test_finite_loss_with_infinite_gradient_is_skipped",
       STEP + "test_nonfinite_step_is_skipped")),
    M("guard: a skipped step is not counted", "d2v_jax/step.py",
      "step=state.step + 1, params=", "step=state.step + finite.astype(jnp.int32), params=",
      (STEP + "test_nonfinite_step_is_skipped",)),
    M("step: the same dropout key every step", "d2v_jax/step.py",
      "step_rng = jax.random.fold_in(state.rng, state.step)", "step_rng = state.rng",
      (STEP + "test_each_step_draws_its_own_dropout",)),
    M("health: teacher_dist of the teacher before the update", "d2v_jax/step.py",
      "**health.step_metrics(aux, teacher=new_state.teacher,",
      "**health.step_metrics(aux, teacher=state.teacher,",
      ("tests/test_health.py::test_train_step_logs_health_metrics",)),
    # ---------------------------------------------------------------- d2v_jax/optim.py
    M("optim: weight decay off", "d2v_jax/optim.py",
      "weight_decay=o.weight_decay,", "weight_decay=0.0,", (PARITY + "[text]",)),
    M("optim: weight decay x 10", "d2v_jax/optim.py",
      "weight_decay=o.weight_decay,", "weight_decay=o.weight_decay * 10,", (PARITY + "[text]",)),
    M("optim: weight decay on biases and norms", "d2v_jax/optim.py",
      "mask=decay_mask(o))", "mask=None)", (PARITY + "[vision]",)),
    # (vision also names its norms and biases in optim.no_decay: this one is caught by the
    # mask's own test, the parity test sees no difference on vision's parameters)
    M("optim: the 1-D no-decay rule ignored", "d2v_jax/optim.py",
      "return True if o.decay_1d else ndim >= 2", "return True",
      ("tests/test_ema.py::test_weight_decay_mask_sees_through_the_layer_axis",)),
    M("optim: Adam betas (0, 0.5)", "d2v_jax/optim.py",
      "b1=o.b1, b2=o.b2,", "b1=0.0, b2=0.5,", (PARITY + "[text]",)),
    M("optim: gradient clipping removed", "d2v_jax/optim.py",
      "if o.clip > 0:", "if False:", (PARITY + "[text]",)),
    # ---------------------------------------------------------------- d2v_jax/ema.py
    M("ema: tau and 1 - tau swapped", "d2v_jax/ema.py",
      "(t * tau + s.astype(jnp.float32) * (1.0 - tau))",
      "(t * (1.0 - tau) + s.astype(jnp.float32) * tau)",
      ("tests/test_ema.py::test_one_update_and_sharing",)),
    M("ema: anneal runs backwards", "d2v_jax/ema.py",
      "(tau_end - tau_start) * (1.0 - frac)", "(tau_end - tau_start) * frac",
      ("tests/test_ema.py::test_linear_anneal_then_flat",)),
    M("ema: the teacher forward reads the student's weights", "d2v_jax/ema.py",
      "return _merge(jax.tree_util.tree_map(jax.lax.stop_gradient, params), teacher)",
      "return jax.tree_util.tree_map(jax.lax.stop_gradient, params)",
      ("tests/test_ema.py::test_one_update_and_sharing",)),
    # ---------------------------------------------------------------- d2v_jax/targets.py
    M("targets: no per-layer norm before the average", "d2v_jax/targets.py",
      "y = _norm(layer_norm_kind, top, valid).mean(0)", "y = top.mean(0)",
      ("tests/test_targets.py::test_top_k_average_of_layer_normed_layers",)),
    M("targets: the bottom K layers", "d2v_jax/targets.py",
      "top = layers[-top_k:].astype(jnp.float32)", "top = layers[:top_k].astype(jnp.float32)",
      ("tests/test_targets.py::test_top_k_average_of_layer_normed_layers",)),
    M("targets: instance norm counts padded frames", "d2v_jax/targets.py",
      "w = valid[..., None].astype(x.dtype)", "w = jnp.ones_like(valid[..., None], x.dtype)",
      ("tests/test_targets.py::test_instance_norm_excludes_padding",)),
    M("loss: smooth L1 without the 1/2", "d2v_jax/targets.py",
      "0.5 * jnp.square(diff) / beta, a - 0.5 * beta)", "jnp.square(diff) / beta, a - 0.5 * beta)",
      ("tests/test_targets.py::test_smooth_l1_matches_torch",)),
    M("loss: mean over every position, not the masked ones", "d2v_jax/targets.py",
      "return (per_pos * m).sum() / jnp.maximum(n, 1.0), n", "return per_pos.mean(), n",
      ("tests/test_targets.py::test_regression_loss_reductions",)),
    # ---------------------------------------------------------------- d2v_jax/objectives.py
    M("objectives: the teacher sees the masked input", "d2v_jax/objectives.py",
      "out = model.apply(tparams, batch, student=False, deterministic=True)",
      "out = model.apply(tparams, batch, student=True, deterministic=True)",
      (STEP + "test_teacher_sees_the_unmasked_input",)),
    M("objectives: v2 loss over every position", "d2v_jax/objectives.py",
      "loss_mask = mask if valid is None else mask & _repeat(valid, m)",
      "loss_mask = jnp.ones_like(mask)",
      ("tests/test_v2.py::test_v2_loss_equals_a_reference_over_clones_and_cls",)),
    M("objectives: v2 CLS loss weight dropped", "d2v_jax/objectives.py",
      "loss = loss + cls_w * cls.mean()", "loss = loss + cls.mean()",
      ("tests/test_v2.py::test_v2_loss_equals_a_reference_over_clones_and_cls",)),
    M("objectives: v2 clones tiled (paired with other examples' targets)", "d2v_jax/objectives.py",
      "return constrain(jnp.repeat(x, m, axis=0),",
      "return constrain(jnp.tile(x, (m,) + (1,) * (x.ndim - 1)),",
      ("tests/test_v2.py::test_v2_loss_equals_a_reference_over_clones_and_cls",
       "tests/test_v2.py::test_teacher_runs_once_per_example_and_clones_share_targets")),
    # ---------------------------------------------------------------- models, eval hook
    M("attention: logits not scaled by 1/sqrt(head dim)", "d2v_jax/models/attention.py",
      "\"bqhd,bkhd->bhqk\", q, k).astype(jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)",
      "\"bqhd,bkhd->bhqk\", q, k).astype(jnp.float32)",
      (PARITY + "[text]",)),
    M("eval hook: rank_teacher of the student", "d2v_jax/eval_hook.py",
      "teacher = ema.teacher_params(state.params, state.teacher)", "teacher = state.params",
      ("tests/test_health.py::test_hook_writes_rank_and_probe_at_configured_steps",)),
    # ---------------------------------------------------------------- masks
    M("text masks: spans run over special tokens", "d2v_jax/data/masking_text.py",
      "run = tf.pad(run[:, :-1], [[0, 0], [1, 0]]) & maskable",
      "run = tf.pad(run[:, :-1], [[0, 0], [1, 0]])",
      ("tests/test_text_masking.py::test_span_runs_and_specials",)),
    M("v2 masks: one position too many kept", "d2v_jax/data/masking_v2.py",
      "return int(length * (1.0 - mask_prob))", "return int(length * (1.0 - mask_prob)) + 1",
      ("tests/test_v2.py::test_masks_exact_counts_distinct_clones_deterministic_and_same_in_tf_data",)),
    # ---------------------------------------------------------------- guards (metrics.py)
    M("guard: fires at max_nonfinite, not past it", "d2v_jax/metrics.py",
      "if self.nonfinite_run > limit:", "if self.nonfinite_run >= limit:",
      ("tests/test_guards.py::test_nonfinite_counter_fires_after_more_than_max_in_a_row",)),
    M("guard: collapse judged one step late", "d2v_jax/metrics.py",
      "if step >= g.collapse_after:", "if step > g.collapse_after:",
      ("tests/test_guards.py::test_collapse_thresholds_policies_and_messages",)),
]


def by_name(names) -> list[Mutant]:
  known = {m.name: m for m in MUTANTS}
  missing = [n for n in names if n not in known]
  if missing:
    raise SystemExit(f"unknown mutants {missing}; --list shows the names")
  return [known[n] for n in names]


def copy_tree(dst: str, rev: str | None = None, src: str = ROOT) -> str:
  """The repository's files (tracked + unignored, or the tree of `rev`) under dst/repo, with
  data/ linked (the real corpora some tests read). Returns the copy's root."""
  root = os.path.join(dst, "repo")
  os.makedirs(root)
  if rev:
    archive = subprocess.run(["git", "-C", src, "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", root], input=archive.stdout, check=True)
  else:
    files = subprocess.run(["git", "-C", src, "ls-files", "-co", "--exclude-standard", "-z"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
      s = os.path.join(src, f)
      if os.path.isfile(s) and not os.path.islink(s):
        os.makedirs(os.path.dirname(os.path.join(root, f)), exist_ok=True)
        shutil.copy2(s, os.path.join(root, f))
  if os.path.isdir(os.path.join(src, "data")) and not os.path.exists(os.path.join(root, "data")):
    os.symlink(os.path.join(src, "data"), os.path.join(root, "data"))
  return root


def present(root: str, node: str) -> bool:
  """Whether the copy has the test function of a node id (file::name[param])."""
  path, _, name = node.partition("::")
  f = os.path.join(root, path)
  if not os.path.isfile(f):
    return False
  return re.search(rf"^def {re.escape(name.split('[')[0])}\(", open(f).read(), re.M) is not None


def run_tests(root: str, nodes: list[str], timeout: float) -> tuple[str, float]:
  """pytest -x on `nodes` in the copy -> (outcome, seconds): 'passed', 'FAILED <node>', ..."""
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", *nodes]
  env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
  t0 = time.time()
  try:
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout", time.time() - t0
  dt = time.time() - t0
  if r.returncode == 0:
    return "passed", dt
  failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
  if r.returncode == 1 and failed:
    return failed[0].replace("tests/", ""), dt
  return f"error (pytest exit {r.returncode}): {r.stdout[-300:]}", dt


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", nargs="*", default=None, help="mutant names (default: all)")
  p.add_argument("--rev", default=None, help="copy this commit's tree instead of the working tree")
  p.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
  p.add_argument("--out", default=None, help="also write the table (markdown) here")
  p.add_argument("--list", action="store_true", help="print the mutants and their tests")
  p.add_argument("--check", action="store_true", help="apply and compile each mutant; no tests")
  p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
  a = p.parse_args(argv)
  todo = by_name(a.only) if a.only else MUTANTS
  if a.list:
    for m in todo:
      print(f"{m.name}\n  {m.path}: {m.old!r} -> {m.new!r}\n  " + "\n  ".join(m.tests))
    return 0
  with tempfile.TemporaryDirectory(prefix="d2v_mutants_") as tmp:
    root = copy_tree(tmp, a.rev)
    if a.check:
      for m in todo:
        f = os.path.join(root, m.path)
        original = open(f).read()
        open(f, "w").write(m.apply(original))
        try:
          py_compile.compile(f, doraise=True, cfile=os.path.join(tmp, "check.pyc"))
        finally:
          open(f, "w").write(original)
      print(f"{len(todo)} mutants apply and compile")
      return 0
    plan = [(m, [n for n in m.tests if present(root, n)]) for m in todo]
    if not a.no_baseline:
      nodes = list(dict.fromkeys(n for _, ns in plan for n in ns))
      outcome, dt = run_tests(root, nodes, a.timeout * 4)
      print(f"baseline ({len(nodes)} tests, unmutated): {outcome} in {dt:.0f} s", flush=True)
      if outcome != "passed":
        print("the unmutated tests must pass first")
        return 2
    lines = ["| mutant | caught by | time |", "|---|---|---|"]
    print("\n".join(lines), flush=True)
    survived = 0
    for m, nodes in plan:
      f = os.path.join(root, m.path)
      original = open(f).read()
      open(f, "w").write(m.apply(original))
      try:
        outcome, dt = run_tests(root, nodes, a.timeout) if nodes else ("passed", 0.0)
      finally:
        open(f, "w").write(original)
      if outcome == "passed":
        survived += 1
        caught = "**NOT CAUGHT**" + ("" if nodes else " (no test)")
      else:
        caught = outcome
      lines.append(f"| {m.name} | {caught} | {dt:.0f} s |")
      print(lines[-1], flush=True)
    summary = f"{len(plan) - survived}/{len(plan)} mutants caught" + (f" (--rev {a.rev})" if a.rev else "")
    print(summary)
    if a.out:
      with open(a.out, "w") as fh:
        fh.write("\n".join(lines + ["", summary]) + "\n")
  return 1 if survived else 0


if __name__ == "__main__":
  sys.exit(main())
