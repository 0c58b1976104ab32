"""Test set-up: 8 fake CPU devices (sharding bugs show up in CI), no TF in transformers."""

import os
import sys

# LLVM optimisation off for the CPU backend: the suite is compile-bound (tiny models, few
# steps), and this cuts its compiles ~25-30 % (measured: test_step 87 -> 67 s, test_v2_smoke
# 195 -> 133 s). Tests only: the trainer and the benchmarks keep XLA's defaults.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("USE_TF", "0")
# libtpu (requirements-tpu.txt, for AOT compiles) would otherwise make JAX probe for a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KJV = os.path.join(ROOT, "data", "text", "kjv.txt")


@pytest.fixture(scope="session")
def kjv_path():
  """The real KJV text installed by .ci/setup (Debian bible-kjv); tests that need it skip
  with the reason when set-up has not been run."""
  if not os.path.exists(KJV):
    pytest.skip(f"{KJV} missing: run .ci/setup (installs Debian bible-kjv)")
  return KJV


@pytest.fixture(scope="module")
def fs():
  """fairseq's own data2vec code (tests/fairseq_ref.py); the tests using it skip with the
  reason when .ci/setup has not fetched the reference."""
  import fairseq_ref  # imports torch: only the tests that ask for fairseq pay for it
  try:
    return fairseq_ref.load()
  except RuntimeError as e:
    pytest.skip(str(e))
