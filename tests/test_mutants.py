"""tools/mutants.py, cheaply (the mutation run itself is a benchmark-like tool, not CI): its
list parses, names the mutants the issue asks for and one per module of the step's core, each
mutation changes exactly one line of the file as it is today and still compiles, each has a
test that exists, and applying one touches a temporary copy, never the working tree."""

import hashlib
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
  spec = importlib.util.spec_from_file_location("mutants", os.path.join(ROOT, "tools", "mutants.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules["mutants"] = mod   # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


# The bugs the suite was found blind to (issue 33), by name, and the core modules of the step.
NAMED = ["step: EMA update switched off", "optim: weight decay off", "optim: weight decay x 10",
         "optim: weight decay on biases and norms", "optim: Adam betas (0, 0.5)",
         "optim: gradient clipping removed", "guard: skipped step still updates the student",
         "health: teacher_dist of the teacher before the update",
         "eval hook: rank_teacher of the student"]
CORE = ["d2v_jax/step.py", "d2v_jax/optim.py", "d2v_jax/ema.py", "d2v_jax/targets.py",
        "d2v_jax/objectives.py", "d2v_jax/metrics.py", "d2v_jax/data/masking_text.py",
        "d2v_jax/data/masking_v2.py", "d2v_jax/models/attention.py"]


def test_the_list(tool):
  names = [m.name for m in tool.MUTANTS]
  assert len(names) == len(set(names)) >= 30
  assert set(NAMED) <= set(names)
  assert set(CORE) <= {m.path for m in tool.MUTANTS}
  assert tool.by_name(NAMED[:2]) == tool.MUTANTS[:1] + [m for m in tool.MUTANTS if m.name == NAMED[1]]
  for m in tool.MUTANTS:
    src = open(os.path.join(ROOT, m.path)).read()
    mutated = m.apply(src)
    a, b = src.splitlines(), mutated.splitlines()
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, m.name
    compile(mutated, m.path, "exec")
    assert m.tests and any(tool.present(ROOT, n) for n in m.tests), m.name
  bad = tool.Mutant("x", "d2v_jax/step.py", "import", "IMPORT", ())
  with pytest.raises(ValueError, match="occurs .* times"):
    bad.apply(open(os.path.join(ROOT, bad.path)).read())


def test_a_mutation_touches_only_the_copy(tool, tmp_path):
  digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
  m = tool.MUTANTS[0]
  before = digest(os.path.join(ROOT, m.path))
  root = tool.copy_tree(str(tmp_path))
  assert root != ROOT and os.path.isfile(os.path.join(root, "tests", "test_step.py"))
  assert digest(os.path.join(root, m.path)) == before
  copy = os.path.join(root, m.path)
  mutated = m.apply(open(copy).read())
  open(copy, "w").write(mutated)
  assert m.new in open(copy).read() and m.old not in open(copy).read()
  assert digest(os.path.join(ROOT, m.path)) == before
  assert tool.present(root, "tests/test_step.py::test_nonfinite_step_is_skipped")
  assert not tool.present(root, "tests/test_step.py::test_no_such_test")
