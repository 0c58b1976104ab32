"""The package's shape (issue 16): an acyclic import graph of d2v_jax, every function-level
import says why (heavy optional dependency, import order), and no module over 400 lines.
Read from the source with ast: nothing is imported."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "d2v_jax")
MAX_LINES = 400


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, names in os.walk(PKG):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = path
  return out


def _imports(path: str, modules: dict) -> set[str]:
  """d2v_jax modules `path` imports anywhere (module level or inside functions)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("d2v_jax"):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        out.add(full if full in modules else node.module)
  return {m for m in out if m in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_import_graph_has_no_cycle():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  assert len(graph) > 60 and sum(map(len, graph.values())) > 150   # the graph is really read
  assert _cycles(graph) == []
  # the finder itself sees a cycle when there is one
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_function_level_imports_say_why():
  """An import inside a function avoids a heavy optional dependency or must follow a set-up
  step; a comment on its line, or above its block of imports, says which."""
  silent = []
  for path in _modules().values():
    src = open(path).read().splitlines()
    for node in ast.walk(ast.parse("\n".join(src))):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for sub in ast.walk(node):
        if isinstance(sub, (ast.Import, ast.ImportFrom)):
          i = sub.lineno - 1
          while i > 0 and src[i - 1].strip().startswith(("import ", "from ")) and "#" not in src[i - 1]:
            i -= 1
          if "#" not in src[sub.lineno - 1] and not (i > 0 and src[i - 1].strip().startswith("#")):
            silent.append(f"{os.path.relpath(path, ROOT)}:{sub.lineno}")
  assert silent == []


def test_modules_are_small():
  sizes = {os.path.relpath(p, ROOT): sum(1 for _ in open(p)) for p in _modules().values()}
  assert max(sizes.values()) > 200   # counted
  assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
