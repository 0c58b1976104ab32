"""A quiet console: process-wide defaults that keep libtpu / TensorFlow / CUDA start-up noise
off a run's output. Imported first by every entry point (train, export, probe, init, compile,
bench), before jax or TensorFlow load:

  from d2v_jax import console  # noqa: F401  (first: quiet console)

Only defaults (os.environ.setdefault): a variable the user set wins, and nothing else changes.

* TF_CPP_MIN_LOG_LEVEL=3, GRPC_VERBOSITY=ERROR: TensorFlow / XLA / gRPC C++ info and warnings.
* TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES (a one-host placeholder), only when this is not
  a TPU VM: with libtpu installed (requirements-tpu.txt, for AOT compiles) jax probes for a TPU
  and libtpu prints "could not determine TPU accelerator type" and an `E0000 ... unexpected
  worker hostname` error on every start. On a TPU VM (/dev/accel*, /dev/vfio/N or the TPU
  environment variables present) libtpu needs its real values, so nothing is set.
* The first `import tensorflow` runs with file descriptor 2 captured: TensorFlow's C++ logger
  writes a few lines before anything can configure it (absl "All log messages before
  absl::InitializeLog()", "cudart_stub.cc ... Could not find cuda drivers", CPU feature
  guard). Lines matching NOISE are dropped, every other line is written back to stderr.
  Skipped when the user set TF_CPP_MIN_LOG_LEVEL to 0 or 1 (they asked to see TF's log).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.abc
import os
import re
import sys
import tempfile

USER_TF_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")  # before our default

# Start-up lines of TensorFlow / libtpu / CUDA stubs that carry no information on a CPU host.
NOISE = re.compile("|".join([
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"Logging before InitGoogle\(\) is written to STDERR",
    r"cudart_stub\.cc", r"Could not find cuda drivers",
    r"cpu_feature_guard\.cc", r"This TensorFlow binary is optimized",
    r"^To enable the following instructions", r"oneDNN custom operations are on",
    r"Unable to register cu(DNN|FFT|BLAS) factory", r"computation_placer\.cc",
    r"TF-TRT Warning", r"could not determine TPU (accelerator type|worker hostnames)",
]))

_TPU_VM_ENV = ("TPU_NAME", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID", "TPU_SKIP_MDS_QUERY")


def on_tpu_vm() -> bool:
  """A Cloud TPU VM: TPU device files or the TPU runtime's environment variables."""
  if any(v in os.environ for v in _TPU_VM_ENV):
    return True
  if "tpu" in os.environ.get("JAX_PLATFORMS", "").lower():
    return True
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def set_defaults() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  if not on_tpu_vm():
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def filter_lines(text: str) -> str:
  """`text` without the NOISE lines (an "=== Source Location Trace" block after a dropped
  libtpu error goes with it)."""
  out, dropping = [], False
  for line in text.splitlines(keepends=True):
    if NOISE.search(line):
      dropping = True
      continue
    if dropping and (line.startswith("=== Source Location Trace") or line.startswith("learning/")):
      continue
    dropping = False
    out.append(line)
  return "".join(out)


class _QuietImport(importlib.abc.MetaPathFinder):
  """Meta-path hook for the first import of `tensorflow`: the spec the other finders give,
  with a loader whose exec_module runs under _captured_stderr()."""

  def find_spec(self, name, path=None, target=None):
    if name != "tensorflow":
      return None
    for finder in sys.meta_path:   # (importlib.util.find_spec probes land here too: no exec)
      if finder is self:
        continue
      find = getattr(finder, "find_spec", None)
      spec = find(name, path, target) if find else None
      if spec is not None:
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
          spec.loader = _QuietLoader(spec.loader)
        return spec
    return None


class _QuietLoader(importlib.abc.Loader):
  def __init__(self, loader):
    self._loader = loader

  def __getattr__(self, name):
    return getattr(self._loader, name)

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    for f in list(sys.meta_path):   # once: the hook goes with the first real import
      if isinstance(f, _QuietImport):
        sys.meta_path.remove(f)
    with _captured_stderr():
      self._loader.exec_module(module)
    module.__loader__ = self._loader   # the real loader again, as if imported plainly
    if getattr(module, "__spec__", None) is not None:
      module.__spec__.loader = self._loader


@contextlib.contextmanager
def _captured_stderr():
  """fd 2 -> a temporary file; on exit its lines minus NOISE go back to stderr."""
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):   # no usable fd 2 (embedded interpreters): no capture
    yield
    return
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      kept = filter_lines(tmp.read().decode("utf-8", errors="replace"))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def install() -> None:
  set_defaults()
  wants_tf_log = USER_TF_LOG_LEVEL is not None and USER_TF_LOG_LEVEL.strip() in ("0", "1")
  if not wants_tf_log and "tensorflow" not in sys.modules and not any(
      isinstance(f, _QuietImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietImport())


install()
