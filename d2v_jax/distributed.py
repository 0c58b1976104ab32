"""Multi-process start-up: which jax.distributed.initialize() call this process needs.

Every process of a multi-host job runs the same command (launch/); this picks, in order:

  D2V_DISTRIBUTED=0          never initialise (a single process, whatever the environment says)
  --coordinator_address ...  explicit: host:port of process 0, --num_processes, --process_id
                             (launch/local.sh and launch/slurm.sbatch pass these)
  D2V_DISTRIBUTED=1          initialise and let JAX detect the cluster (TPU VM pod slices
                             via the metadata server, SLURM, Kubernetes...); launch/tpu.sh sets it
  SLURM, under srun          one process per task (SLURM_NTASKS > 1 inside a job step)
  TPU_WORKER_HOSTNAMES=a,b   a multi-host TPU slice whose environment lists the workers (GKE)
  MEGASCALE_COORDINATOR_ADDRESS   a multislice TPU job

and otherwise runs as one process. `plan()` is pure (tested); `initialize()` applies it and is
the one start-up path of every entry point that touches the job's devices (the trainer; the
probe, the export, the benchmarks and tools/probe_curve.py through `add_args` /
`initialize_from_args`): it prints the plan once (process 0). `python -m d2v_jax.compile` is
the exception by design: it compiles ahead of time for a topology it only describes, on one
host, and never joins a job.

With more than one process, `initialize()` also makes the job behave as one machine:

  * a dead peer ends the job: a heartbeat thread (d2v_jax/watchdog.py `Watchdog`) publishes this process's beat
    through the coordination service every `peer_timeout / 10` s and reads everyone's; a peer
    whose beat has not changed for `peer_timeout` s (default 60; --peer_timeout or
    D2V_PEER_TIMEOUT) is named on every surviving process ("error: process N stopped
    responding ...") and they exit 1 at once (os._exit: no hang in a collective, an orbax
    barrier or JAX's shutdown barrier). A process that fails with an error tells its peers,
    which stop at once. JAX's own heartbeat timeout is set to 2 * peer_timeout + 10 s as a
    backstop (it aborts with its own message). Process 0 hosts JAX's coordination service:
    when it dies, JAX itself ends every other process within a second (exit 134, "Terminating
    process because the JAX distributed service detected fatal errors ... the leader task was
    preempted/died"), usually before this module can print its own line naming process 0.
  * preemption is agreed: `StopVote` reduces every process's SIGTERM flag over all devices
    (one tiny all-reduce per step, read one step late with the metrics), so every process
    learns of a SIGTERM that reached any of them after the same step, and all save that step.
    JAX's own SIGTERM listener (the preemption sync service) is switched off for this: the
    trainer's handler is the only one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Mapping

import jax

from d2v_jax import cli, watchdog

DEFAULT_PEER_TIMEOUT = 60.0   # seconds without a heartbeat before a peer counts as dead


@dataclasses.dataclass(frozen=True)
class Plan:
  mode: str                    # none | explicit | auto | slurm | tpu
  kwargs: dict                 # for jax.distributed.initialize
  why: str


def _slurm_tasks_per_node(env: Mapping[str, str]) -> list[int]:
  """SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE, e.g. "4(x2),1" -> [4, 4, 1]."""
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
  out = []
  for part in filter(None, spec.split(",")):
    m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if m:
      out += [int(m.group(1))] * int(m.group(2) or 1)
  return out


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, env: Mapping[str, str] | None = None) -> Plan:
  env = os.environ if env is None else env
  switch = env.get("D2V_DISTRIBUTED", "").strip().lower()
  if switch in ("0", "off", "false", "no"):
    return Plan("none", {}, "D2V_DISTRIBUTED=0")
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id "
                       "(the same on every process, except --process_id: 0..N-1)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    # 'deactivate': the flags are the whole truth; SLURM auto-detection would otherwise
    # restrict each process to GPU SLURM_LOCALID.
    return Plan("explicit", dict(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id,
                                 cluster_detection_method="deactivate"),
                f"explicit coordinator {coordinator_address}, process {process_id}/{num_processes}")
  if switch in ("1", "on", "true", "yes", "auto"):
    return Plan("auto", {}, "D2V_DISTRIBUTED=1: cluster detected by JAX")
  ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
  if ntasks > 1 and "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
    kwargs = {}
    per_node = _slurm_tasks_per_node(env)
    gpus = env.get("SLURM_GPUS_ON_NODE", "")
    if per_node and max(per_node) == 1 and gpus.isdigit() and int(gpus) > 1:
      # One process per node drives all its GPUs (JAX's default would be GPU SLURM_LOCALID).
      kwargs["local_device_ids"] = list(range(int(gpus)))
    return Plan("slurm", kwargs, f"SLURM job step with {ntasks} tasks")
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return Plan("tpu", {}, f"TPU slice with {len(hosts)} workers")
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return Plan("tpu", {}, "multislice TPU job (MEGASCALE_COORDINATOR_ADDRESS)")
  return Plan("none", {}, "single process")


def peer_timeout(value: float | None = None, env: Mapping[str, str] | None = None) -> float:
  """--peer_timeout, else D2V_PEER_TIMEOUT, else DEFAULT_PEER_TIMEOUT (seconds, > 0)."""
  if value is None:
    return cli.env_seconds("D2V_PEER_TIMEOUT", DEFAULT_PEER_TIMEOUT, env)
  if not value > 0:
    raise ValueError(f"the peer timeout ({value}) must be > 0 seconds")
  return float(value)


def describe(p: Plan, processes: int, devices: int, local: int, timeout: float | None) -> str:
  """The one line process 0 prints at start-up."""
  line = (f"distributed: {p.why} ({p.mode}); {processes} process{'es' if processes > 1 else ''}, "
          f"{devices} device{'s' if devices != 1 else ''} ({local} local)")
  if processes > 1 and timeout is not None:
    line += f"; a process silent for {timeout:g} s ends the job (--peer_timeout)"
  return line


_STATE: dict = {"plan": None}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout: float | None = None,
               announce: bool = True) -> Plan:
  """The start-up of every entry point, before any other JAX use: jax.distributed.initialize()
  when the plan says so, the peer watchdog when there is more than one process, and the plan
  printed once by process 0. Idempotent (a second call returns the first plan)."""
  if _STATE["plan"] is not None:
    return _STATE["plan"]
  p = plan(coordinator_address, num_processes, process_id)
  t = peer_timeout(timeout)
  if p.mode != "none" and not jax.distributed.is_initialized():
    # The trainer's SIGTERM handler + StopVote agree on preemption; JAX's listener would
    # swallow SIGTERM (and orbax would act on it) without the trainer knowing.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(**p.kwargs, heartbeat_timeout_seconds=int(2 * t + 10))
  _STATE["plan"] = p
  if jax.process_count() > 1:
    # the coordination service's client: JAX exposes it only in its internal module
    from jax._src import distributed as jax_distributed
    watchdog.start(jax_distributed.global_state.client, jax.process_index(), jax.process_count(),
                   t, jax_distributed.global_state.coordinator_address or "")
  if announce and jax.process_index() == 0:
    print(describe(p, jax.process_count(), jax.device_count(), jax.local_device_count(), t),
          flush=True)
  return p




















def add_args(parser) -> None:
  """The trainer's start-up flags on an argparse entry point (probe, export, bench, tools), so
  launch/local.sh, launch/slurm.sbatch and launch/tpu.sh start every command the same way."""
  g = parser.add_argument_group("multi-process start-up (d2v_jax/distributed.py; launch/ "
                                "passes these, or the environment says)")
  g.add_argument("--coordinator_address", help="host:port of process 0")
  g.add_argument("--num_processes", type=int)
  g.add_argument("--process_id", type=int)
  g.add_argument("--peer_timeout", type=float,
                 help=f"seconds before a silent process ends the job (default {DEFAULT_PEER_TIMEOUT:g})")


def initialize_from_args(a) -> Plan:
  """`initialize()` from `add_args`'s flags; a bad plan is one error line and exit 2."""
  try:
    return initialize(a.coordinator_address, a.num_processes, a.process_id,
                      timeout=a.peer_timeout)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


def is_writer() -> bool:
  """Process 0 writes a tool's files and prints its results (every process computes them)."""
  return jax.process_index() == 0


def main(argv: list[str] | None = None) -> int:
  """python -m d2v_jax.distributed [--coordinator_address ... --num_processes N --process_id I]:
  prints the plan this environment gets (a dry run: nothing is initialised)."""
  ap = argparse.ArgumentParser(prog="python -m d2v_jax.distributed", description=main.__doc__)
  add_args(ap)
  a = ap.parse_args(argv)
  try:
    p = plan(a.coordinator_address, a.num_processes, a.process_id)
    t = peer_timeout(a.peer_timeout)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"plan: {p.mode} ({p.why}); jax.distributed.initialize("
        + ", ".join(f"{k}={v!r}" for k, v in p.kwargs.items()) + ")"
        + (f"; peer timeout {t:g} s" if p.mode != "none" else ""))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
