"""A run directory nobody can corrupt (issue 29): one owner (a lock held by a live process is
refused at once, a dead holder's is taken over), every path checked before anything is
written, a failed save that exits in seconds with the previous checkpoint intact, a damaged
newest checkpoint moved aside with the run resuming bitwise from the intact step, SIGINT, and
config drift on resume. Text on the tiny model (block 32, batch 8)."""

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from d2v_jax import checkpoint, config as config_lib, drift, export as export_lib, metrics, rundir, train
from d2v_jax.probe import cli as probe_cli
from reliability_utils import (ROOT, assert_states_equal, env, load_state, parse, run_config,
                               step_losses, text_args, text_setup, train_cmd, tree_hashes,
                               wait_for_line)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return text_setup(str(tmp_path_factory.mktemp("text_setup")))


class Unchanged:
  """No file under `dirs` added, removed or changed inside the block."""

  def __init__(self, *dirs):
    self.dirs = dirs

  def __enter__(self):
    self.before = [tree_hashes(d) for d in self.dirs]

  def __exit__(self, *exc):
    assert [tree_hashes(d) for d in self.dirs] == self.before
    return False


@contextlib.contextmanager
def unwritable(path: str):
  """`path` (a directory) refuses new entries: chattr +i as root (root ignores modes), else
  chmod 555. Skips where neither works (e.g. a filesystem without the immutable flag)."""
  root = os.geteuid() == 0
  if root:
    made = subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0
  else:
    os.chmod(path, 0o555)
    made = True
  try:
    if not made or rundir.problem(path, "dir") is None:
      pytest.skip(f"cannot make {path} unwritable here")
    yield
  finally:
    if root:
      subprocess.run(["chattr", "-i", path], capture_output=True)
    else:
      os.chmod(path, 0o755)


def _cli(main, argv, capsys) -> tuple[int, list[str]]:
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    main(argv)
  return e.value.code, capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------- one owner

HOLD = ("import sys, time\nfrom d2v_jax import rundir\n"
        "rundir.RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(300)\n")


def test_live_holder_refused_at_once_dead_holder_taken_over(tmp_path):
  work = str(tmp_path)
  holder = subprocess.Popen([sys.executable, "-c", HOLD, work], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with pytest.raises(rundir.RunDirError) as e:
      rundir.RunLock(work, stale=2).acquire()
    assert time.monotonic() - t0 < 1.0
    msg = str(e.value)
    assert msg.startswith(f"run directory {work} is in use by pid {holder.pid} on host "
                          f"{socket.gethostname()}, started ")
    assert "(alive, heartbeat " in msg and msg.endswith("or choose another --workdir (a lock "
                                                        "whose holder died is taken over after 2 s)")
  finally:
    holder.kill()
    holder.wait()
  # SIGKILL left run.lock behind: the next trainer sees its pid gone and takes it over.
  lines = []
  t0 = time.monotonic()
  lock = rundir.RunLock(work, stale=2, log=lines.append).acquire()
  assert time.monotonic() - t0 < 2.0
  assert len(lines) == 1 and lines[0].startswith(
      f"warning: taking over the lock of run directory {work} from pid {holder.pid} on host ")
  assert lines[0].endswith(f"(process {holder.pid} is gone); kept as run.lock.stale")
  with open(os.path.join(work, "run.lock")) as f:
    assert json.load(f)["pid"] == os.getpid()
  with open(os.path.join(work, "run.lock.stale")) as f:
    assert json.load(f)["pid"] == holder.pid
  lock.release()
  assert not os.path.exists(os.path.join(work, "run.lock"))


def _foreign_lock(path: str, beat: int = 0) -> dict:
  h = {"host": "elsewhere", "boot": "b", "pidns": "p", "pid": 4242, "pid_start": "1",
       "processes": 1, "token": "t0", "started": "2026-01-01 00:00:00", "beat": beat,
       "beat_time": time.time()}
  with open(path, "w") as f:
    json.dump(h, f)
  return h


def test_lock_of_another_host_refused_while_its_heartbeat_moves(tmp_path):
  work, path = str(tmp_path), str(tmp_path / "run.lock")
  h = _foreign_lock(path)
  stop = threading.Event()

  def beating():   # the other host's heartbeat, rewritten in place like RunLock's
    while not stop.wait(0.05):
      h["beat"] += 1
      h["beat_time"] = time.time()
      with open(path, "r+") as f:
        f.write(json.dumps(h))
        f.truncate()

  t = threading.Thread(target=beating, daemon=True)
  t.start()
  t0 = time.monotonic()
  with pytest.raises(rundir.RunDirError, match="in use by pid 4242 on host elsewhere, started "
                                               r"2026-01-01 00:00:00 \(its heartbeat is moving\)"):
    rundir.RunLock(work, stale=3).acquire()
  assert time.monotonic() - t0 < 1.5     # one heartbeat interval (stale / 12) or so, not 3 s
  stop.set()
  t.join()
  # Its heartbeat stopped: taken over once it is `stale` seconds old, not before.
  lines = []
  t0 = time.monotonic()
  lock = rundir.RunLock(work, stale=1.0, log=lines.append).acquire()
  assert 0.5 < time.monotonic() - t0 < 3
  assert lines[0].endswith("(no heartbeat for 1 s); kept as run.lock.stale"), lines
  lock.release()
  # A lock that does not parse (a crash while it was written) is taken over at once.
  with open(path, "w") as f:
    f.write('{"pid": 1')
  lines = []
  rundir.RunLock(work, stale=60, log=lines.append).acquire().release()
  assert "(unreadable lock)" in lines[0]


def test_a_holder_whose_lock_was_taken_over_stops(tmp_path):
  work = str(tmp_path)
  a = rundir.RunLock(work, stale=0.5).acquire()
  a._stop.set()           # a's heartbeat stops (a process stopped / swapped out for a while)
  a._thread.join()
  time.sleep(0.7)
  b = rundir.RunLock(work, stale=0.5, log=lambda _: None).acquire()
  assert not a.beat()     # a's next heartbeat finds run.lock is no longer its file
  with pytest.raises(rundir.RunDirError, match=f"lost the lock of run directory {work} to pid "
                                               f"{os.getpid()} on host "):
    a.check()
  a.release()             # does not remove b's lock
  with open(os.path.join(work, "run.lock")) as f:
    assert json.load(f)["token"] == b.token
  b.release()
  assert os.listdir(work) == ["run.lock.stale"]


class _KV:
  """The coordination service's key-value store, as rundir.take uses it."""

  def __init__(self):
    self.d = {}

  def key_value_set(self, key, value, allow_overwrite=False):
    self.d[key] = value

  def blocking_key_value_get(self, key, timeout_ms):
    return self.d[key]


def test_on_a_pod_the_job_holds_the_lock(tmp_path):
  work = str(tmp_path / "run")
  os.makedirs(work)
  kv = _KV()
  lock = rundir.take(work, 0, 4, kv)            # process 0 takes it for the job
  assert kv.d[rundir.KV_KEY] == f"ok {lock.token}"
  with open(os.path.join(work, "run.lock")) as f:
    assert json.load(f)["processes"] == 4
  assert rundir.take(work, 3, 4, kv) is None    # the others check it and hold nothing
  # Another job on the same directory: its process 0 is refused, and so are its others.
  kv2 = _KV()
  with pytest.raises(rundir.RunDirError) as e0:
    rundir.take(work, 0, 2, kv2)
  assert "(process 0 of a 4-process job)" in str(e0.value)
  with pytest.raises(rundir.RunDirError) as e1:
    rundir.take(work, 1, 2, kv2)
  assert str(e1.value) == str(e0.value)
  # A process that does not see process 0's lock: the directory is not shared.
  kv3 = _KV()
  kv3.d[rundir.KV_KEY] = "ok some-other-token"
  with pytest.raises(rundir.RunDirError, match="must be the same shared directory on every host"):
    rundir.take(work, 1, 2, kv3)
  lock.release()


# ---------------------------------------------------------------- paths checked at start

@pytest.mark.parametrize("case", ["checkpoints_file", "metrics_dir", "tb_unwritable", "cache_under_file"])
def test_every_path_the_run_writes_is_checked_before_anything_is_written(setup, tmp_path, case):
  work = tmp_path / "run"
  work.mkdir()
  over = {}
  if case == "checkpoints_file":
    (work / "checkpoints").write_text("x")
    want = f"cannot write {work}/checkpoints (it is a file, not a directory); move it away, "
  elif case == "metrics_dir":
    (work / "metrics.jsonl").mkdir()
    want = f"cannot write {work}/metrics.jsonl (it is a directory, not a file); "
  elif case == "tb_unwritable":
    (work / "tb").mkdir()
    want = f"cannot write {work}/tb ("
  else:
    (tmp_path / "afile").write_text("x")
    over = {"data.cache_dir": str(tmp_path / "afile" / "cache")}
    want = (f"cannot write {tmp_path}/afile/cache ({tmp_path}/afile is a file, not a directory); "
            "move it away, fix its permissions or choose another --config.data.cache_dir")
  cfg = parse(text_args(setup, **over))
  with contextlib.ExitStack() as stack:
    if case == "tb_unwritable":
      stack.enter_context(unwritable(str(work / "tb")))
    with Unchanged(str(tmp_path)):
      with pytest.raises(rundir.RunDirError) as e:
        train.run(cfg, str(work))
  assert str(e.value).startswith(want), str(e.value)


# ---------------------------------------------------------------- a failed save never hangs

@pytest.mark.slow
@pytest.mark.serial
def test_failed_save_exits_in_seconds_with_one_line_and_the_previous_checkpoint_intact(
    setup, tmp_path):
  """checkpoints/ stops taking writes after start-up: the launch's first save fails, and the
  trainer exits 1 at once (orbax's commit threads would keep the interpreter waiting about five
  minutes in a barrier: the hang this guards against)."""
  work = str(tmp_path / "run")
  ckpts = os.path.join(work, "checkpoints")
  train.run(parse(text_args(setup, total_steps=2, checkpoint_every=2)), work)   # step 2 saved
  kept = tree_hashes(ckpts)
  args = text_args(setup, total_steps=100_000, checkpoint_every=2, log_every=1000,
                   resume_allow_changes="total_steps")
  proc = subprocess.Popen(train_cmd(args, work), cwd=ROOT, env=env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    wait_for_line(proc, "attention=")   # restored and built; the first step compiles next
    with unwritable(ckpts):
      t_block = time.monotonic()
      out, err = proc.communicate(timeout=240)
      elapsed = time.monotonic() - t_block
      assert tree_hashes(ckpts) == kept
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 1, err[-3000:]
  assert elapsed < 60, elapsed      # the first step's compile and 2 steps, then out
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  assert lines[0].startswith(f"error: saving checkpoint step 4 to {ckpts} failed: ")
  assert lines[0].endswith("; the previous checkpoint (step 2) is intact")
  assert not os.path.exists(os.path.join(work, "run.lock"))
  assert checkpoint.steps_on_disk(work) == [2] and os.listdir(ckpts) == ["2"]


# ---------------------------------------------------------------- damaged checkpoints

def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_bitwise_from_the_intact_one(
    setup, tmp_path, capsys):
  args = text_args(setup, total_steps=4, checkpoint_every=2)
  ref, work = str(tmp_path / "ref"), str(tmp_path / "work")
  train.run(parse(args), ref)
  shutil.copytree(ref, work)
  step4 = os.path.join(work, "checkpoints", "4")
  biggest = max((p for p in glob.glob(f"{step4}/state/**", recursive=True) if os.path.isfile(p)),
                key=os.path.getsize)
  with open(biggest, "r+b") as f:   # a copy cut short (a full disk, an interrupted rsync)
    f.truncate(os.path.getsize(biggest) // 2)
  damaged = tree_hashes(step4)

  # export and probe name the damaged step and list the others; nothing is written.
  hf = str(tmp_path / "hf")
  code, err = _cli(export_lib.main, ["--workdir", work, "--out", hf], capsys)
  assert code == 2 and len(err) == 1, err
  assert err[0].startswith(f"error: checkpoint step 4 of {work} is damaged (")
  assert err[0].endswith("); its other steps: [2] (--step N)") and "with this config" not in err[0]
  code, err = _cli(export_lib.main, ["--workdir", work, "--out", hf, "--step", "3"], capsys)
  assert (code, err) == (2, [f"error: {work} has no checkpoint step 3; its steps: [2, 4]"])
  code, err = _cli(probe_cli.main, ["--workdir", work, "--data", setup["corpus"], "--step", "3"],
                   capsys)
  assert (code, err) == (2, [f"error: {work} has no checkpoint step 3; its steps: [2, 4]"])
  assert not os.path.exists(hf) and not os.path.exists(os.path.join(work, "probe"))

  # resume_strict: refused, nothing moved.
  with Unchanged(work):
    with pytest.raises(config_lib.ConfigError) as e:
      train.run(parse(args + ["--config.resume_strict=True"]), work)
  msg = str(e.value)
  assert msg.startswith(f"checkpoint step 4 of {work} is damaged (") and "\n" not in msg
  assert msg.endswith("; older steps: [2]; rerun without --config.resume_strict=True to move it "
                      "aside and resume from the newest intact step")

  # Default: step 4 is moved aside (not deleted), the run resumes from 2 and redoes 3 and 4.
  capsys.readouterr()
  train.run(parse(args), work)
  out, err = capsys.readouterr()
  moved = os.path.join(work, checkpoint.DAMAGED_DIR, "4")
  warning = [line for line in err.splitlines() if line.strip()]
  assert len(warning) == 1, err
  assert warning[0].startswith(f"warning: checkpoint step 4 of {work} is damaged (")
  assert warning[0].endswith(f"); moved it to {moved} (not deleted); trying step 2")
  assert "Traceback" not in err and "with this config" not in err
  assert f"resumed from {work} at step 2 (data position 2) in " in out
  assert "(the newest intact checkpoint; damaged: [4])" in out
  assert tree_hashes(moved) == damaged
  assert checkpoint.steps_on_disk(work) == [2, 4]
  a, meta_a = load_state(ref)
  b, meta_b = load_state(work)
  assert meta_a["data_position"] == meta_b["data_position"] == 4
  assert_states_equal(a, b)                  # student, teacher, optimizer, rng: bitwise
  want = step_losses(ref)
  assert [(r["step"], r["loss"]) for r in metrics.read(work)][-2:] == [(3, want[3]), (4, want[4])]


# ---------------------------------------------------------------- config drift on resume

def test_resume_that_changes_the_trajectory_is_refused_unless_allowed_and_recorded(
    setup, tmp_path, capsys):
  work = str(tmp_path / "run")
  base = dict(total_steps=2, checkpoint_every=2)
  train.run(parse(text_args(setup, **base)), work)
  lr = float(run_config(work).optim.lr)
  with Unchanged(work):
    with pytest.raises(config_lib.ConfigError) as e:
      train.run(parse(text_args(setup, **base, **{"optim.lr": 1e-3, "seed": 1,
                                                  "log_every": 7})), work)
  assert str(e.value) == (   # log_every is no trajectory key: not listed
      f"resuming {work} at step 2 would change how the run trains: optim.lr {lr} -> 0.001, "
      f"seed 0 -> 1; rerun with the run's settings ({work}/config.json) or allow exactly these "
      f"with --config.resume_allow_changes=optim.lr,seed (recorded in config_changes.jsonl), or "
      f"choose another --workdir")
  with Unchanged(work):
    with pytest.raises(config_lib.ConfigError, match="resume_allow_changes names 'optim.lrr', "
                                                     "which is no config key or section"):
      train.run(parse(text_args(setup, **base, resume_allow_changes="optim.lrr")), work)

  # Allowed (a key and a section): trains on, says so, and keeps the old values.
  before = open(os.path.join(work, "config.json")).read()
  capsys.readouterr()
  train.run(parse(text_args(setup, total_steps=3, checkpoint_every=2,
                            **{"optim.lr": 1e-3, "resume_allow_changes": "total_steps,optim"})),
            work)
  out = capsys.readouterr().out
  assert (f"resuming with changed settings (resume_allow_changes): optim.lr {lr} -> 0.001, "
          "total_steps 2 -> 3\n") in out
  assert "config.json updated from step 2: " in out
  assert f"; the previous values are in {work}/{drift.CHANGES_FILE}" in out
  with open(os.path.join(work, drift.CHANGES_FILE)) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 1 and rows[0]["step"] == 2
  changed = rows[0]["changed"]
  assert changed["optim.lr"] == [lr, 0.001] and changed["total_steps"] == [2, 3]
  assert changed["resume_allow_changes"] == ["", "total_steps,optim"]
  # the rest: what the batch-size rule records of the recipe (scaling.recipe.*)
  assert all(k.startswith("scaling.") for k in set(changed) - {"optim.lr", "total_steps",
                                                               "resume_allow_changes"})
  assert rows[0]["allowed"] == ["optim.lr", "total_steps"]
  assert run_config(work).optim.lr == 0.001 and before != open(f"{work}/config.json").read()
  _, meta = load_state(work)
  assert meta["step"] == 3 and meta["config"]["optim"]["lr"] == 0.001   # step 3's own config


# ---------------------------------------------------------------- two trainers, signals

@pytest.mark.slow
@pytest.mark.serial
def test_second_trainer_refused_within_seconds_and_sigint_saves_a_second_exits_at_once(
    setup, tmp_path, capsys):
  args = text_args(setup, total_steps=10_000, checkpoint_every=1000)
  work = str(tmp_path / "run")
  first = subprocess.Popen(train_cmd(args, work), cwd=ROOT, env=env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    head = "".join(wait_for_line(first, "step       3/10000"))
    t0 = time.monotonic()
    code, err = _cli(train.main, ["python -m d2v_jax.train", *args, "--workdir", work], capsys)
    refused_in = time.monotonic() - t0
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: run directory {work} is in use by pid {first.pid} on host "
                             f"{socket.gethostname()}, started ")
    assert refused_in < 5, refused_in
    first.send_signal(signal.SIGINT)    # Ctrl-C: save the current step, exit 130
    out, _ = first.communicate(timeout=120)
    out = head + out
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 130, out[-3000:]
  assert "Traceback" not in out and "KeyboardInterrupt" not in out
  saved = int(out.split("SIGINT: saving step ")[1].split()[0])
  assert checkpoint.steps_on_disk(work) == [saved] and saved >= 3
  assert "stopped by SIGINT after " in out and not os.path.exists(f"{work}/run.lock")
  steps = [r["step"] for r in metrics.read(work)]
  assert steps == list(range(1, saved + 1))    # one writer: no interleaved rows

  # The same command again, Ctrl-C twice during its start-up: out at once, nothing saved.
  second = subprocess.Popen(train_cmd(args, work), cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    wait_for_line(second, "distributed: ")   # printed before the seconds of start-up
    second.send_signal(signal.SIGINT)
    wait_for_line(second, "press Ctrl-C again to exit at once")
    t0 = time.monotonic()
    second.send_signal(signal.SIGINT)
    out, _ = second.communicate(timeout=60)
    elapsed = time.monotonic() - t0
  finally:
    if second.poll() is None:
      second.kill()
  assert second.returncode == 130 and elapsed < 5, (elapsed, out[-3000:])
  assert "SIGINT again: exiting at once without saving" in out and "Traceback" not in out
  assert checkpoint.steps_on_disk(work) == [saved] and not os.path.exists(f"{work}/run.lock")
