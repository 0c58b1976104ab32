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

and otherwise runs as one process. `plan()` is pure (tested); `maybe_initialize()` applies it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping


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


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> Plan:
  """Calls jax.distributed.initialize() when the plan says so (before any other JAX use)."""
  p = plan(coordinator_address, num_processes, process_id)
  if p.mode != "none":
    import jax
    jax.distributed.initialize(**p.kwargs)
    if jax.process_index() == 0:
      print(f"distributed: {p.why}; {jax.process_count()} processes, "
            f"{jax.device_count()} devices ({jax.local_device_count()} local)", flush=True)
  return p
