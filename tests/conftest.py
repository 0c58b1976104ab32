"""Test set-up: 8 fake CPU devices (sharding bugs show up in CI), no TF in transformers."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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
