"""Test-only: a trainer subprocess started by tests/reliability_utils.py with D2V_TEST_KILL set
gets the fault injection of tests/faults.py (this folder is first on its PYTHONPATH)."""

import os
import sys

if os.environ.get("D2V_TEST_KILL"):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import faults
  faults.install()
