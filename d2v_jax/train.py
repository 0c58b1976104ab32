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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, resolved config)",
                    flag_values=FLAGS)
flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes", flag_values=FLAGS)
flags.DEFINE_integer("process_id", None, "multi-process: this process's index", flag_values=FLAGS)


def maybe_init_distributed(fv) -> None:
  """jax.distributed.initialize() on TPU VM pods, SLURM, or with explicit coordinator flags."""
  import jax
  explicit = fv.coordinator_address is not None
  on_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  on_tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "localhost").split(",")) > 1
  if explicit:
    jax.distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
  elif on_slurm or on_tpu_pod:
    jax.distributed.initialize()


def preflight(workdir: str) -> None:
  """The run directory must take a write, a rename and a delete (what checkpointing does)."""
  os.makedirs(workdir, exist_ok=True)
  probe = os.path.join(workdir, f".preflight.{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.replace(probe, probe + ".renamed")
    os.remove(probe + ".renamed")
  except OSError as e:
    raise SystemExit(f"error: run directory {workdir!r} is not writable ({e}); "
                     "fix permissions or choose another --workdir")


class _Preempted:
  """SIGTERM (TPU VM maintenance, SLURM) -> save at the current step and exit 0."""

  def __init__(self):
    self.flag = False
    signal.signal(signal.SIGTERM, self._on)

  def _on(self, *_):
    self.flag = True


def run(cfg, workdir: str) -> dict:
  """Trains until cfg.total_steps (or preemption). Returns the last logged metrics."""
  import jax
  import numpy as np

  from d2v_jax import build as build_lib, checkpoint, config as config_lib, metrics as metrics_lib
  from d2v_jax.modality import load as load_modality

  pid, nproc = jax.process_index(), jax.process_count()
  preflight(workdir)
  mod = load_modality(cfg.modality)
  mod.data.prepare(cfg, workdir)
  built = build_lib.build(cfg)
  from d2v_jax import sharding
  sharding.check_batch(cfg.batch_size, built.mesh, nproc)
  if pid == 0:
    config_lib.write_resolved(cfg, workdir)
    sizes, repl = sharding.report(built.state_shardings, built.abstract_state)
    print(f"mesh {dict(built.mesh.shape)} | per-device MiB: "
          + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sizes.items())
          + f" | replicated params: {len(repl)}", flush=True)

  mngr = checkpoint.manager(workdir, keep=cfg.keep_checkpoints)
  if mngr.latest_step() is not None:
    state, meta = checkpoint.restore(mngr, built.abstract_state, built.state_shardings)
    start = int(meta["data_position"])
    if pid == 0:
      print(f"resumed from {workdir} at step {start}", flush=True)
  else:
    state, start = built.init(cfg.seed), 0

  data = iter(mod.data.build_dataset(cfg, workdir, start_step=start, process_index=pid,
                                process_count=nproc))
  writer = metrics_lib.Writer(workdir, enabled=pid == 0)
  guards = metrics_lib.Guards(cfg.guards)
  preempted = _Preempted()
  clock = metrics_lib.Throughput(start, cfg.total_steps)
  meta = lambda s: {"step": s, "data_position": s, "modality": cfg.modality,
                    "config": config_lib.to_dict(cfg)}

  last, pending, step, stop_msg = {}, None, start, None

  window = metrics_lib.Window()

  def flush(pending):
    """Fetches the previous step's metrics (one step late, so the host never stalls) and
    logs their mean over the last log_every steps."""
    s, m, positions = pending
    m = {k: float(np.asarray(v)) for k, v in jax.device_get(m).items()}
    stop = guards.check(s, m)
    window.add(m)
    if s % cfg.log_every == 0 or s == cfg.total_steps or stop:
      logged = window.mean()
      logged.update(clock.tick(s, cfg.batch_size, cfg.batch_size * positions))
      writer.write(s, logged)
      if pid == 0:
        print(metrics_lib.progress_line(s, cfg.total_steps, logged), flush=True)
    return m, stop

  try:
    while step < cfg.total_steps:
      local = next(data)
      batch = build_lib.to_global(local, built.batch_shardings)
      state, m = built.step(state, batch)
      step += 1
      if pending is not None:
        last, stop_msg = flush(pending)
      pending = (step, m, local["mask"].shape[1])
      if stop_msg:
        break
      if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
        checkpoint.save(mngr, step, state, meta(step))
      if preempted.flag:
        if pid == 0:
          print(f"SIGTERM: saving step {step} and exiting", flush=True)
        checkpoint.save(mngr, step, state, meta(step), force=True)
        break
    if pending is not None and not stop_msg:
      last, stop_msg = flush(pending)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  if stop_msg:
    raise SystemExit(f"error: {stop_msg}")
  return last


def main(argv=None) -> None:
  from d2v_jax import config as config_lib

  argv = list(sys.argv if argv is None else argv)
  try:
    fv = config_lib.parse_argv(argv, FLAGS)
  except config_lib.ConfigError as e:
    config_lib.die(str(e))
  if not fv.workdir:
    config_lib.die("--workdir is required (the run directory; rerun the same command to resume)")
  maybe_init_distributed(fv)
  t0 = time.time()
  try:
    run(fv.config, fv.workdir)
  except config_lib.ConfigError as e:
    config_lib.die(str(e))
  print(f"done in {time.time() - t0:.0f} s; run directory: {os.path.abspath(fv.workdir)}", flush=True)


if __name__ == "__main__":
  main()
