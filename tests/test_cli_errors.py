"""Every command-line failure is one `error:` line on stderr, exit status 2, no traceback and
nothing written (issue 29): a sweep of failure modes across train, export, probe, init, data,
compile and bench, each CLI's main(argv) run in-process on a scratch tree whose files and
directories are compared before and after. Then the numeric settings (finite, in range) and a
step whose updated parameters overflow counting as non-finite."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from d2v_jax import build as build_lib, compile as compile_cli, config as config_lib, export, init
from d2v_jax import rundir, train, validate
from d2v_jax.bench import __main__ as bench_cli
from d2v_jax.data import __main__ as data_cli
from d2v_jax.probe import cli as probe_cli
from reliability_utils import parse, text_args, text_setup, tree_hashes

SPEC = "configs/text.py:variant=tiny,runlocal"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  """A finished 2-step text run (checkpoint 2) and the bad inputs of the sweep."""
  root = str(tmp_path_factory.mktemp("cli"))
  os.makedirs(os.path.join(root, "setup"))
  setup = text_setup(os.path.join(root, "setup"))
  run = os.path.join(root, "run")
  train.run(parse(text_args(setup, total_steps=2, checkpoint_every=2)), run)
  p = lambda *parts: os.path.join(root, *parts)
  rng = np.random.default_rng(0)
  with open(p("corpus.txt"), "wb") as f:           # named .txt, holds bytes (with NULs)
    f.write(b"\x89PNG\r\n\x1a\n\x00\x00" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
  with open(p("labels.tsv"), "wb") as f:
    f.write(b"\xff\xfe\x00t\x00e\x00x\x00t\x00\t\x00a\x00")   # UTF-16, not UTF-8
  with open(p("bad_config.py"), "w") as f:   # YAML saved as .py
    f.write("model:\n  hidden: 64\n")
  with open(p("config.yaml"), "w") as f:
    f.write("model:\n  hidden: 64\n")
  with open(p("noget.py"), "w") as f:
    f.write("CONFIG = {}\n")
  with open(p("afile"), "w") as f:
    f.write("a file\n")
  for name, text in (("hf_badjson", "<html>404 Not Found</html>"),
                     ("hf_gpt2", json.dumps({"model_type": "gpt2"}))):
    os.makedirs(p(name))
    with open(p(name, "config.json"), "w") as f:
      f.write(text)
  os.makedirs(p("hf_trunc"))                        # a data2vec-text download cut short
  with open(p("hf_trunc", "config.json"), "w") as f:
    json.dump({"model_type": "data2vec-text", "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "intermediate_size": 256, "vocab_size": 300,
               "max_position_embeddings": 34, "pad_token_id": 1, "layer_norm_eps": 1e-5,
               "type_vocab_size": 1}, f)
  with open(p("hf_trunc", "model.safetensors"), "wb") as f:
    f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"embeddings.word_embeddings.weight\":{\"dtype")
  os.makedirs(p("other_model"))
  with open(p("other_model", "config.json"), "w") as f:
    f.write(json.dumps({"model_type": "bert"}))
  shutil.copytree(setup["cache"], p("badcache"))    # the run's block cache, then truncated
  (npy,) = [f for f in os.listdir(p("badcache")) if f.endswith(".npy")]
  with open(p("badcache", npy), "r+b") as f:
    f.truncate(os.path.getsize(p("badcache", npy)) // 3)
  return {"root": root, "run": run, "setup": setup, "p": p, "npy": p("badcache", npy)}


def _train(ctx, workdir=None, **over):
  return ["python -m d2v_jax.train", *text_args(ctx["setup"], **over),
          "--workdir", workdir or ctx["p"]("new_run")]


# (name, main, argv(ctx), the error line: exact, or its start [and a part] as a tuple)
CASES = [
    ("train: missing config file", train.main,
     lambda c: ["t", "--config", "nope.py", "--workdir", c["p"]("w")],
     "error: config file 'nope.py' does not exist; e.g. --config configs/text.py:variant=tiny,runlocal"),
    ("train: unknown variant lists the valid ones", train.main,
     lambda c: ["t", "--config", "configs/text.py:variant=huge", "--workdir", c["p"]("w")],
     "error: config 'configs/text.py:variant=huge': unknown variant 'huge'; valid: "
     "['base', 'large', 'small', 'tiny']"),
    ("train: unknown config argument", train.main,
     lambda c: ["t", "--config", "configs/text.py:colour=red", "--workdir", c["p"]("w")],
     "error: config 'configs/text.py:colour=red': unknown config argument 'colour'; valid: "
     "['fit', 'masking', 'runlocal', 'v2', 'variant']"),
    ("train: .py config that is not Python", train.main,
     lambda c: ["t", "--config", c["p"]("bad_config.py"), "--workdir", c["p"]("w")],
     ("error: config file '", "bad_config.py' does not load (SyntaxError: invalid syntax")),
    ("train: config that is YAML", train.main,
     lambda c: ["t", "--config", c["p"]("config.yaml"), "--workdir", c["p"]("w")],
     ("error: config file '", "config.yaml' is not a Python file (configs/<modality>.py)")),
    ("train: config without get_config", train.main,
     lambda c: ["t", "--config", c["p"]("noget.py"), "--workdir", c["p"]("w")],
     ("error: config file '", "noget.py' has no get_config(arg) function")),
    ("train: unknown key", train.main, lambda c: _train(c) + ["--config.optim.lrr=1"],
     ("error: unknown config key 'optim.lrr' (no 'lrr' under optim; valid there: [",)),
    ("train: value of the wrong type", train.main,
     lambda c: _train(c) + ["--config.total_steps=many"],
     "error: flag --config.total_steps=many: invalid literal for int() with base 10: 'many'"),
    ("train: no --workdir", train.main, lambda c: ["t", "--config", SPEC],
     "error: --workdir is required (the run directory; rerun the same command to resume)"),
    ("train: --workdir is a file", train.main, lambda c: _train(c, c["p"]("afile")),
     lambda c: f"error: run directory {c['p']('afile')!r} is not writable (it is a file, not a "
               "directory); fix permissions or choose another --workdir"),
    ("train: optim.lr=nan", train.main, lambda c: _train(c, **{"optim.lr": "nan"}),
     "error: optim.lr=nan must be a finite number"),
    ("train: a dropout rate above 1", train.main,
     lambda c: _train(c, **{"model.encoder.attention_dropout": 1.5}),
     "error: model.encoder.attention_dropout=1.5 must be in [0, 1]"),
    ("train: checkpoints/ is a file", train.main, lambda c: _train(c, c["p"]("ckfile_run")),
     lambda c: f"error: cannot write {c['p']('ckfile_run')}/checkpoints (it is a file, not a "
               "directory); move it away, fix its permissions or choose another --workdir"),
    ("train: run directory in use", train.main, lambda c: _train(c, c["run"]),
     ("error: run directory ", f"is in use by pid {os.getpid()} on host ")),
    ("train: resume that changes the seed", train.main,
     lambda c: _train(c, c["run"], total_steps=2, checkpoint_every=2, seed=1),
     ("error: resuming ", "at step 2 would change how the run trains: seed 0 -> 1; rerun with ",
      "--config.resume_allow_changes=seed (recorded in config_changes.jsonl)")),
    ("train: corpus that is not text", train.main,
     lambda c: _train(c, **{"data.path": c["p"]("corpus.txt"),
                            "data.cache_dir": c["p"]("cache2")}),
     lambda c: (f"error: text file {c['p']('corpus.txt')} is not text (",)),
    ("train: data.path that matches nothing", train.main,
     lambda c: _train(c, **{"data.path": c["p"]("missing-*.txt")}),
     lambda c: f"error: data.path={c['p']('missing-*.txt')!r} matches no text file; check the path"),
    ("train: truncated corpus cache", train.main,
     lambda c: _train(c, **{"data.cache_dir": c["p"]("badcache")}),
     lambda c: (f"error: cached corpus {c['npy']} is damaged (", "); delete it (it is rebuilt "
                "from data.path at the next start)")),
    ("train: data.tokenizer that is a file", train.main,
     lambda c: _train(c, **{"data.tokenizer": c["p"]("afile")}),
     lambda c: f"error: data.tokenizer={c['p']('afile')!r} is not a directory; give an HF "
               "tokenizer directory (tokenizer.json or vocab files), or leave it empty to train one"),
    ("train: init.hf whose config.json is not JSON", train.main,
     lambda c: _train(c, **{"init.hf": c["p"]("hf_badjson")}),
     lambda c: f"error: {c['p']('hf_badjson')}/config.json does not read as JSON (Expecting value: "
               "line 1 column 1 (char 0)); it must be the model's Hugging Face config.json"),
    ("export: a directory that is no run", export.main,
     lambda c: ["--workdir", c["p"]("setup"), "--out", c["p"]("hf")],
     ("error: ", "setup has no checkpoints/ directory: train first")),
    ("export: a step that does not exist", export.main,
     lambda c: ["--workdir", c["run"], "--out", c["p"]("hf"), "--step", "7"],
     lambda c: f"error: {c['run']} has no checkpoint step 7; its steps: [2]"),
    ("export: --out is a file", export.main,
     lambda c: ["--workdir", c["run"], "--out", c["p"]("afile")],
     lambda c: f"error: cannot write --out {c['p']('afile')} (it is a file, not a directory); "
               "choose another --out"),
    ("export: --out holds another model", export.main,
     lambda c: ["--workdir", c["run"], "--out", c["p"]("other_model")],
     lambda c: f"error: {c['p']('other_model')} is not empty and was not written by d2v_jax.export; "
               "pass --overwrite to replace its model files or choose another --out"),
    ("export: unknown --weights", export.main,
     lambda c: ["--workdir", c["run"], "--out", c["p"]("hf"), "--weights", "ema"],
     "error: argument --weights: invalid choice: 'ema' (choose from 'student', 'teacher') "
     "(see python -m d2v_jax.export --help)"),
    ("probe: missing --data", probe_cli.main,
     lambda c: ["--workdir", c["run"], "--data", c["p"]("nope.tsv")],
     lambda c: f"error: probe data {c['p']('nope.tsv')!r} is not a file; text probes read a "
               "text<TAB>label TSV"),
    ("probe: a TSV that is not UTF-8", probe_cli.main,
     lambda c: ["--workdir", c["run"], "--data", c["p"]("labels.tsv")],
     lambda c: f"error: probe data {c['p']('labels.tsv')} is not UTF-8 text (invalid start byte "
               "at byte 0); text probes read a text<TAB>label TSV"),
    ("probe: a block the model lacks", probe_cli.main,
     lambda c: ["--workdir", c["run"], "--data", c["setup"]["corpus"], "--layer", "9"],
     "error: layer=9: use 1..2 (block number) or -1..-2 (from the end)"),
    ("probe: --out is a directory", probe_cli.main,
     lambda c: ["--workdir", c["run"], "--data", c["setup"]["corpus"], "--out", c["p"]("setup")],
     lambda c: f"error: cannot write --out {c['p']('setup')} (it is a directory, not a file); "
               "choose another --out"),
    ("init: --hf without config.json", init.main,
     lambda c: ["--hf", c["p"]("nohf"), "--workdir", c["p"]("w")],
     lambda c: f"error: --hf {c['p']('nohf')!r} has no config.json; pass --config "
               "configs/<modality>.py"),
    ("init: --hf config.json that is not JSON", init.main,
     lambda c: ["--hf", c["p"]("hf_badjson"), "--workdir", c["p"]("w")],
     lambda c: f"error: {c['p']('hf_badjson')}/config.json does not read as JSON (Expecting value: "
               "line 1 column 1 (char 0)); it must be the model's Hugging Face config.json"),
    ("init: a model family it cannot import", init.main,
     lambda c: ["--hf", c["p"]("hf_gpt2"), "--workdir", c["p"]("w")],
     lambda c: (f"error: --hf {c['p']('hf_gpt2')!r} holds a 'gpt2' model; importable: [",)),
    ("init: truncated weights", init.main,
     lambda c: ["--hf", c["p"]("hf_trunc"), "--workdir", c["p"]("w"),
                f"--config.data.tokenizer={c['setup']['tokenizer']}"],
     lambda c: (f"error: init.hf={c['p']('hf_trunc')!r}: its weights do not read (SafetensorError: ",
                "); download them again")),
    ("init: a run directory that holds a checkpoint", init.main,
     lambda c: ["--hf", c["p"]("hf_trunc"), "--workdir", c["run"],
                f"--config.data.tokenizer={c['setup']['tokenizer']}"],
     lambda c: f"error: {c['run']} already holds a checkpoint (step 2); choose another --workdir"),
    ("data: unknown subcommand", data_cli.main, lambda c: ["frobnicate"],
     ("error: argument cmd: invalid choice: 'frobnicate' (choose from 'batches', 'prepare', ",)),
    ("data: --steps that is no number", data_cli.main, lambda c: ["batches", "--steps", "x"],
     "error: argument --steps: invalid int value: 'x' (see python -m d2v_jax.data batches --help)"),
    ("data: tokenizer --out that exists", data_cli.main,
     lambda c: ["train-tokenizer", "--input", c["setup"]["corpus"], "--out", c["p"]("setup")],
     lambda c: f"error: --out {c['p']('setup')} exists; remove it or pick another directory"),
    ("data: prepare a corpus that is not text", data_cli.main,
     lambda c: ["prepare", "--workdir", c["p"]("prep"), "--config", SPEC,
                f"--config.data.path={c['p']('corpus.txt')}",
                f"--config.data.tokenizer={c['setup']['tokenizer']}"],
     lambda c: (f"error: text file {c['p']('corpus.txt')} is not text (",)),
    ("compile: unknown topology", compile_cli.main,
     lambda c: ["compile", "--config", SPEC, "--topology", "v9-77"],
     ("error: --topology='v9-77': unknown TPU generation 'v9' (known: ['v4', 'v5e', 'v5p', 'v6e'])",)),
    ("compile: missing config file", compile_cli.main,
     lambda c: ["compile", "--config", "configs/speech.py"],
     "error: config file 'configs/speech.py' does not exist; e.g. --config "
     "configs/text.py:variant=tiny,runlocal"),
    ("compile: no slices", compile_cli.main,
     lambda c: ["compile", "--config", SPEC, "--num_slices=0"], "error: --num_slices=0 must be >= 1"),
    ("bench: unknown benchmark", bench_cli.main, lambda c: ["frob"],
     ("error: argument {step,mfu,input,compile,memory,profile,gpu,v2}: invalid choice: 'frob'",)),
    ("bench: no benchmark", bench_cli.main, lambda c: [],
     ("error: the following arguments are required: {step,mfu,",)),
    ("bench: unknown modality", bench_cli.main, lambda c: ["mfu", "--modality", "smell"],
     "error: --modality 'smell': unknown ['smell']; use text, vision, audio or all"),
]


def _snapshot(root: str) -> tuple:
  dirs = sorted(os.path.relpath(d, root) for d, _, _ in os.walk(root))
  return dirs, tree_hashes(root)


@pytest.mark.parametrize("name, main, argv, want", CASES, ids=[c[0] for c in CASES])
def test_cli_failure_is_one_error_line_exit_2_and_nothing_written(ctx, capsys, name, main, argv,
                                                                  want):
  hold = None
  if "ckfile_run" in " ".join(argv(ctx)) and not os.path.exists(ctx["p"]("ckfile_run")):
    os.makedirs(ctx["p"]("ckfile_run"))
    with open(ctx["p"]("ckfile_run", "checkpoints"), "w") as f:
      f.write("not a directory")
  if name == "train: run directory in use":
    hold = rundir.RunLock(ctx["run"]).acquire()   # a live trainer holds the run (this process)
  try:
    before = _snapshot(ctx["root"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
      code = main(argv(ctx))
      raise SystemExit(code)   # the mains that return their status
    err = capsys.readouterr().err
    assert _snapshot(ctx["root"]) == before, "the failed command wrote something"
  finally:
    if hold is not None:
      hold.release()
  want = want(ctx) if callable(want) else want
  lines = err.strip().splitlines()
  assert e.value.code == 2, (e.value.code, err)
  assert len(lines) == 1 and "Traceback" not in err, err
  if isinstance(want, tuple):
    assert lines[0].startswith(want[0]) and all(part in lines[0] for part in want[1:]), lines[0]
  else:
    assert lines[0] == want


def test_the_sweep_covers_every_cli():
  tools = {name.split(":")[0] for name, *_ in CASES}
  assert tools == {"train", "export", "probe", "init", "data", "compile", "bench"}
  assert len(CASES) >= 25


# ---------------------------------------------------------------- numeric settings

@pytest.mark.parametrize("override, message", [
    ({"optim.lr": float("inf")}, "optim.lr=inf must be a finite number"),
    ({"optim.lr": 0.0}, "optim.lr=0.0 must be in (0, 1]"),
    ({"optim.lr": 3.0}, "optim.lr=3.0 must be in (0, 1]"),
    ({"optim.b2": 1.0}, "optim.b1=0.9 and optim.b2=1.0 must be in [0, 1)"),
    ({"optim.eps": 0.0}, "optim.eps=0.0 must be > 0"),
    ({"optim.weight_decay": -0.1}, "optim.weight_decay=-0.1 must be >= 0"),
    ({"optim.clip": -1.0}, "optim.clip=-1.0 must be >= 0 (0 = off)"),
    ({"optim.final_lr_scale": 2.0},
     "optim.init_lr_scale=0.0 and final_lr_scale=2.0 must be in [0, 1]"),
    ({"optim.stage_ratios": (0.5, 0.5, 0.5)},
     "optim.stage_ratios=(0.5, 0.5, 0.5) must be 3 fractions >= 0 with sum <= 1"),
    ({"teacher.tau_end": float("nan")}, "teacher.tau_end=nan must be a finite number"),
    ({"model.encoder.dropout": -0.1}, "model.encoder.dropout=-0.1 must be in [0, 1]"),
    ({"data.random_token_prob": 1.5}, "data.random_token_prob=1.5 must be in [0, 1]"),
    ({"loss.beta": -1.0}, "loss.beta=-1.0 must be >= 0 (0 = squared error)"),
    ({"keep_checkpoints": 0}, "keep_checkpoints=0 must be >= 1"),
    ({"log_every": 0}, "log_every=0 must be >= 1"),
])
def test_numeric_settings_are_checked(override, message):
  cfg = config_lib.load_file(SPEC)
  for key, value in override.items():
    config_lib.set_path(cfg, key, value)
  with pytest.raises(config_lib.ConfigError) as e:
    validate.validate(cfg)
  assert str(e.value) == message


def test_updated_parameters_that_overflow_count_as_nonfinite():
  """A finite loss and gradient whose Adam update overflows the parameters (a huge first
  moment, no second): the step is skipped like a non-finite gradient, nothing changes."""
  cfg = config_lib.load_file(SPEC)
  cfg.data.block_size, cfg.batch_size, cfg.model.vocab_size = 32, 8, 300
  built = build_lib.build(cfg, devices=jax.devices()[:1])
  state = built.init(0)

  def blow_up(path, x):   # opt_state: mu huge (finite), nu zero -> update ~ lr * 1e38 / eps
    name = jax.tree_util.keystr(path)
    if ".mu" in name and np.issubdtype(x.dtype, np.floating):
      return np.full(x.shape, 3e38, x.dtype)
    if ".nu" in name and np.issubdtype(x.dtype, np.floating):
      return np.zeros(x.shape, x.dtype)
    return x

  opt = jax.tree_util.tree_map_with_path(blow_up, jax.device_get(state.opt_state))
  state = state.replace(opt_state=jax.device_put(opt, built.state_shardings.opt_state))
  before = jax.device_get(state.params)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 300, (8, 32)).astype(np.int32)
  mask = np.zeros((8, 32), bool)
  mask[:, 3:9] = True
  batch = {"source": ids, "student": np.where(mask, 3, ids).astype(np.int32), "mask": mask}
  new, m = built.step(state, build_lib.to_global(batch, built.batch_shardings))
  m = jax.device_get(m)
  assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])
  assert int(m["nonfinite"]) == 1
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(jax.device_get(new.params))):
    np.testing.assert_array_equal(a, b)
