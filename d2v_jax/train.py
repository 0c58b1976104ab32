"""The one trainer: config -> mesh -> data -> state -> restore -> loop (log, checkpoint, stop).

  python -m d2v_jax.train --config configs/text.py:variant=base --workdir DIR [--config.KEY=VALUE ...]

Rerunning the same command resumes from DIR. Every process of a multi-host job runs the same
command. No modality branches here: a modality is found by name (d2v_jax/modality.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from d2v_jax import console  # noqa: F401,E402  (first: quiet console, d2v_jax/console.py)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from d2v_jax import build as build_lib, checkpoint, cli, config as config_lib, distributed, drift  # noqa: E402
from d2v_jax import eval_hook, init_weights, metrics as metrics_lib, resume, rundir, sharding  # noqa: E402
from d2v_jax import hooks, resolve as resolve_lib, validate, watchdog  # noqa: E402
from d2v_jax.models import attention  # noqa: E402



def parse_args(argv: list[str]):
  """(argparse namespace, config) of one command line: --workdir, the distributed start-up's
  flags (d2v_jax/distributed.py add_args, shared with every entry point), --config SPEC and its
  --config.KEY=VALUE overrides. Fresh per call, so main() runs in-process as often as a caller
  likes (tests, notebooks). Bad input: one error line, exit 2."""
  p = cli.ArgumentParser(prog="python -m d2v_jax.train", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", help="run directory (checkpoints, metrics, resolved config); "
                 "rerun to resume")
  p.add_argument("--config", required=True, help="config file[:args], e.g. configs/text.py:variant=base")
  distributed.add_args(p)
  a, rest = p.parse_known_args(argv[1:])
  bad = [r for r in rest if not r.startswith("--config.")]
  if bad:
    p.error(f"unknown arguments {bad}")
  if not a.workdir:
    cli.fail("--workdir is required (the run directory; rerun the same command to resume)")
  cfg = config_lib.parse_argv([argv[0], "--config", a.config, *rest]).config
  return a, cfg


def preflight(workdir: str) -> None:
  """The run directory must take a write, a rename and a delete (what checkpointing does)."""
  why = rundir.problem(workdir, "dir")
  if not why:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      why = e.strerror
    why = why or rundir.problem(workdir, "dir")
  if why:
    raise rundir.RunDirError(f"run directory {workdir!r} is not writable ({why}); fix "
                             "permissions or choose another --workdir")


class _Preempted:
  """SIGTERM (TPU VM maintenance, SLURM) or SIGINT (Ctrl-C) -> save at the current step and
  exit (0 after SIGTERM, 130 after SIGINT: the shell's code for Ctrl-C, so `train && export`
  stops there). A second SIGINT exits at once without saving (the lock is released first; an
  unfinished save is discarded at the next start). The previous handlers are put back when the
  run ends (tests and notebooks call run() in-process). With several processes the flag is
  agreed (watchdog.StopVote): all stop after the same step."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.flag = False
    self.name = "SIGTERM"             # the first signal received
    self.on_abort = None              # releases the run directory's lock (set by _run)
    self._exit = os._exit             # tests replace it
    self._prev = {}
    for sig in self.SIGNALS:
      try:
        self._prev[sig] = signal.signal(sig, self._on)
      except ValueError:  # not the main thread: the caller handles signals
        pass

  def _on(self, signum, _frame):
    name = signal.Signals(signum).name
    if self.flag and signum == signal.SIGINT:
      os.write(2, b"\nSIGINT again: exiting at once without saving (checkpoints on disk are "
                  b"intact; rerun the same command to resume from the latest)\n")
      if self.on_abort is not None:
        self.on_abort()
      self._exit(130)
      return
    if not self.flag:
      self.flag, self.name = True, name
      if signum == signal.SIGINT:   # os.write: print() is not safe inside a signal handler
        os.write(2, b"\nSIGINT: saving at the end of this step, then exiting; press Ctrl-C "
                    b"again to exit at once without saving\n")

  def restore(self) -> None:
    for sig, prev in self._prev.items():
      signal.signal(sig, prev)


def run(cfg, workdir: str, *, devices=None, preempted: _Preempted | None = None) -> dict:
  """Trains until cfg.total_steps (or preemption). Returns the last logged metrics.
  `devices`: a subset of jax.devices() to build the mesh on (default: all). `preempted`: a
  SIGTERM handler installed earlier (main() installs it before the distributed start-up)."""
  own = preempted is None
  if own:
    preempted = _Preempted()   # first, so that a SIGTERM during start-up also exits cleanly
  try:
    return _run(cfg, workdir, devices, preempted)
  finally:
    if own:
      preempted.restore()


def _run(cfg, workdir: str, devices, preempted: _Preempted) -> dict:
  pid, nproc = jax.process_index(), jax.process_count()
  existed = os.path.isdir(workdir)
  preflight(workdir)
  # One owner per run directory (d2v_jax/rundir.py): on a pod the job holds it (process 0).
  wd = watchdog.current()
  lock = rundir.take(workdir, pid, nproc, client=wd.client if wd else None,
                     remove_dir=not existed,
                     on_release=lambda release: setattr(preempted, "on_abort", release))
  try:
    return _run_locked(cfg, workdir, devices, preempted, lock)
  finally:
    preempted.on_abort = None
    if lock is not None:
      lock.release()


def _run_locked(cfg, workdir: str, devices, preempted: _Preempted, lock) -> dict:
  pid, nproc = jax.process_index(), jax.process_count()
  # resolve.resolve in its steps: every range check before anything is prepared or written
  # into the run directory.
  mod = resolve_lib.settings(cfg)
  validate.validate(cfg, mod)
  rundir.check_paths(workdir, cfg, writer=pid == 0)
  resume.precheck(cfg, workdir)   # a resume that would change the run: refused before any work
  guards = metrics_lib.Guards(cfg.guards)
  # The mesh and batch checks come before data preparation (tokenizer training, caching,
  # audio indexing can take minutes; a mesh that does not fit should fail at once).
  mesh = sharding.make_mesh(cfg.mesh, devices)
  sharding.check_batch(cfg.batch_size, mesh, nproc)
  resolve_lib.data(cfg, mod, workdir)   # the modality's prepare(), then the config is frozen
  built = build_lib.build(cfg, mesh=mesh, mod=mod)

  saver = checkpoint.Saver(workdir, keep=cfg.keep_checkpoints)
  finished, changes = False, None
  try:
    t_restore = time.time()
    got = resume.restore(cfg, workdir, saver, built)   # the newest intact step, this config's
    if got is not None:
      state, meta, changes = got.state, got.meta, got.changes
      step, data_pos = int(meta["step"]), int(meta["data_position"])
      if pid == 0:
        fallback = (f" (the newest intact checkpoint; damaged: {[s for s, _ in got.moved]})"
                    if got.moved else "")
        print(f"resumed from {workdir} at step {step} (data position {data_pos}) "
              f"in {time.time() - t_restore:.1f} s{fallback}", flush=True)
        if drift.describe(changes):
          print(drift.describe(changes), flush=True)
    else:  # a new run: fresh weights, or init.hf / init.checkpoint (d2v_jax/init_weights.py)
      state, step, data_pos = init_weights.initial_params(cfg, built, built.init(cfg.seed)), 0, 0
    if pid == 0:
      sizes, repl = sharding.report(built.state_shardings, built.abstract_state)
      print(sharding.report_line(built.mesh, sizes, repl), flush=True)
      print(_attention_line(built.model.spec, mod), flush=True)
    out = _loop(cfg, workdir, built, mod, saver, guards, preempted, state, step, data_pos,
                lock, changes)
    finished = True
  finally:
    if finished:
      saver.close()   # waits for the last save; its failure is the run's error
    else:
      try:
        saver.close()
      except checkpoint.CheckpointError as e:  # keep the error that is already propagating
        print(f"error: {e}", file=sys.stderr, flush=True)
  return out


def _attention_line(spec, mod) -> str:
  """Which attention implementation `model.encoder.attention` resolved to (teacher and
  student) on the mesh's platform, for the modality's bias kind."""
  return attention.describe_attention(spec, bias=getattr(mod.model, "ATTENTION_BIAS", None))


def _loop(cfg, workdir, built, mod, saver, guards, preempted, state, step, data_pos,
          lock=None, changes=None) -> dict:
  """The training loop. `step` counts updates (state.step); `data_pos` counts batches read
  (they differ after a rollback, which skips the bad batches). `lock`: the run directory's
  (process 0), checked every step; `changes`: the resume's config changes (drift.check)."""
  start_step = step
  pid, nproc = jax.process_index(), jax.process_count()
  # Several processes: a SIGTERM that reached any of them is agreed through one tiny all-reduce
  # per step, read with that step's metrics (one step late), so all stop after the same step.
  votes = watchdog.StopVote() if nproc > 1 else None
  stopping = False
  data = iter(mod.data.build_dataset(cfg, workdir, start_step=data_pos, process_index=pid,
                                     process_count=nproc))
  writer = metrics_lib.Writer(workdir, enabled=pid == 0)
  hook = eval_hook.Hook(cfg, built, workdir)  # rank / probe every eval.*_every steps; off by default
  clock = metrics_lib.Throughput(step, cfg.total_steps)
  window = metrics_lib.Window()
  g = cfg.guards
  config_dict = config_lib.to_dict(cfg)
  meta = lambda: {"step": step, "data_position": data_pos, "modality": cfg.modality,
                  "config": config_dict}

  def flush(pending):
    """Fetches a step's metrics (one step late, so the host never stalls), runs the guards
    and logs the mean over the last log_every steps."""
    s, m, positions, _ = pending
    with jax.transfer_guard("disallow"):
      m = {k: float(np.asarray(v)) for k, v in jax.device_get(m).items()}
    if pid == 0 and not resolved_written:
      # Written once a step of this launch has run: a launch rejected at start-up (config
      # that does not fit the checkpoint, unreadable data) leaves the run directory as it was.
      # An existing config.json is only rewritten with its old values recorded (drift.py).
      note = drift.write_config(cfg, workdir, start_step, changes)
      if note:
        print(note, flush=True)
      resolved_written.append(True)
    verdict = guards.check(s, m)
    window.add(m)
    if s % cfg.log_every == 0 or s == cfg.total_steps or verdict:
      logged = window.mean()
      logged["nonfinite_total"] = guards.nonfinite_total
      logged.update(clock.tick(s, cfg.batch_size, cfg.batch_size * positions))
      writer.write(s, logged)
      if pid == 0:
        print(metrics_lib.progress_line(s, cfg.total_steps, logged), flush=True)
    return m, verdict

  last, pending, stop_msg, rollbacks, resolved_written = {}, None, None, 0, []
  try:
    while step < cfg.total_steps or pending is not None:
      if lock is not None:
        lock.check()   # another trainer took the run directory over: write nothing more
      if votes is None:
        stopping = preempted.flag
      dispatched = step < cfg.total_steps and not stopping
      vote = None
      if dispatched:
        local = next(data)
        data_pos += 1
        # The step runs with implicit host <-> device copies refused (big_vision does the same):
        # the batch goes to the devices before it (to_global: with several processes that is
        # a transfer the guard would refuse too), the metrics come back explicitly (flush's
        # device_get), and an accidental transfer inside fails loudly.
        batch = build_lib.to_global(local, built.batch_shardings)
        with jax.transfer_guard("disallow"):
          state, m = built.step(state, batch)
        step += 1
        if votes is not None:
          vote = votes.start(preempted.flag)
        hook(step, state, writer)
      watchdog.progress(step)
      verdict = None
      if pending is not None:
        last, verdict = flush(pending)
        if pending[3] is not None and votes.result(pending[3]):
          stopping = True   # every process reads this vote here: all stop after this step
      pending = (step, m, local["mask"].shape[1], vote) if dispatched else None

      if verdict is not None:
        target = None
        if verdict.action == "rollback":
          before = [s for s in saver.steps() if s < verdict.first_bad]
          target = max(before) if before else None
          if rollbacks >= g.max_rollbacks:
            stop_msg = (f"{verdict.msg}; not rolling back again "
                        f"(guards.max_rollbacks={g.max_rollbacks})")
          elif target is None:
            stop_msg = (f"{verdict.msg}; no checkpoint before step {verdict.first_bad} to roll "
                        "back to")
        else:
          stop_msg = verdict.msg
        if stop_msg:
          break
        # Roll back: the state of checkpoint `target`, the data stream where it is now.
        gone = saver.delete_after(target)
        state, rmeta = saver.restore(built.abstract_state, built.state_shardings, target)
        skipped = (int(rmeta["data_position"]), data_pos - 1)
        step, pending, rollbacks = target, None, rollbacks + 1
        guards.reset()
        window, clock = metrics_lib.Window(), metrics_lib.Throughput(step, cfg.total_steps)
        if pid == 0:
          print(f"warning: {verdict.msg}; rolled back to checkpoint step {target} (rollback "
                f"{rollbacks}/{g.max_rollbacks}, deleted later checkpoints {gone}); "
                f"data continues at position {data_pos}, batches {skipped[0]}..{skipped[1]} "
                "are not used again", file=sys.stderr, flush=True)
        continue

      if dispatched and (step % cfg.checkpoint_every == 0 or step == cfg.total_steps):
        if guards.healthy or step == cfg.total_steps:
          if saver.save(step, state, meta()):
            hooks.call("save_started", step, saver)
        elif pid == 0:
          print(f"warning: not saving step {step} during a non-finite / collapse incident "
                f"(latest checkpoint: {saver.latest_step()})", file=sys.stderr, flush=True)
      saver.poll()
      if dispatched:
        hooks.call("after_step", step, saver)
      if stopping and pending is None:
        sig = preempted.name
        if nproc > 1:   # every process says so: the tests check they agree
          print(f"{sig}: saving step {step} and exiting (process {pid} of {nproc}; every "
                "process stops after this step)", flush=True)
        elif pid == 0:
          print(f"{sig}: saving step {step} and exiting", flush=True)
        saver.save(step, state, meta(), force=True)
        break
  finally:
    writer.close()
  if stop_msg:
    raise SystemExit(f"error: {stop_msg}")
  return last


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  try:
    fv, cfg = parse_args(argv)
  except config_lib.ConfigError as e:
    config_lib.die(str(e))
  preempted = _Preempted()   # before the start-up: a SIGTERM while joining the job also counts
  try:
    distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id,
                           timeout=fv.peer_timeout)
  except ValueError as e:
    config_lib.die(str(e))
  t0 = time.time()
  try:
    run(cfg, fv.workdir, preempted=preempted)
  except config_lib.ConfigError as e:
    watchdog.fail(f"error: {e}", code=2)    # several processes: tell the peers, exit 2
    config_lib.die(str(e))
  except checkpoint.CheckpointError as e:
    watchdog.fail(f"error: {e}", e)
    # A failed save leaves orbax threads waiting on commit signals that never come (up to its
    # 5-minute barrier timeout), and the interpreter's exit would wait for them: the error is
    # the run's result, so leave now (the lock and the metrics files are already closed).
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
  except SystemExit as e:   # guards: every process reaches the same verdict
    if e.code not in (None, 0):
      watchdog.fail(str(e.code) if isinstance(e.code, str) else "error: stopped", code=1)
    raise
  except Exception as e:
    # Several processes: a lost peer is named (or this error is), peers are told, exit 1
    # without waiting in JAX's shutdown barrier. One process: the usual traceback.
    watchdog.fail(f"error: {type(e).__name__}: {checkpoint.first_line(e)}", e, show_traceback=True)
    raise
  finally:
    preempted.restore()
  watchdog.finish()
  if preempted.flag and preempted.name == "SIGINT":
    print(f"stopped by SIGINT after {time.time() - t0:.0f} s (saved); rerun the same command to "
          f"continue: {os.path.abspath(fv.workdir)}", flush=True)
    raise SystemExit(130)
  print(f"done in {time.time() - t0:.0f} s; run directory: {os.path.abspath(fv.workdir)}", flush=True)


if __name__ == "__main__":
  main()
