"""Tests of rlnas.distributed: one search over several processes and devices.

- In this process: the collectives of a one-process job, the evaluator's
  queue, ordering, failed and interrupted children (no JAX runtime needed).
- One process with 4 virtual CPU devices (a subprocess, since XLA_FLAGS must
  be set before JAX starts): children spread over the devices and give the
  single-device results, for the synthetic evaluator and real child training.
- Two processes on 127.0.0.1 through JAX's coordination service (the real
  entry point, `python -m rlnas.main`): the same history and final controller
  as one process; a stop of both resumes exactly; a killed process or one
  that fails makes the other exit with a clear message in bounded time; and
  launch/local.sh, the README's command, runs a two-process search.

The multi-process searches use the "synthetic" evaluator (a known reward
after a set time, rlnas.workers.SyntheticEvaluator) so that they cost
seconds.
"""

import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

from rlnas import checkpointing
from rlnas import distributed
from rlnas import evaluators
from rlnas import search
from rlnas import spaces
from rlnas import workers
from rlnas.evaluators import ChildResult

REPO = pathlib.Path(__file__).resolve().parents[1]
# History columns that say who evaluated a child and how long it took: the
# only ones allowed to differ between runs on 1 and on 2 processes.
WHO_AND_WHEN = ("process", "device", "computed_on", "worker_seconds",
                "train_seconds", "compile_seconds")
# rlnas/search.py calls rlnas.distributed (the hooks in bench/scaleout.md).
needs_hooks = pytest.mark.skipif(
    not hasattr(search, "distributed"),
    reason="rlnas/search.py lacks the rlnas.distributed hooks")


# ----------------------------------------------------------------------------
# Helpers.


def _space(num_layers=2):
  cfg = ml_collections.ConfigDict({
      "name": "nasrl_cnn", "num_layers": num_layers, "filter_heights": (1, 3),
      "filter_widths": (1, 3), "stride_heights": (1,), "stride_widths": (1,),
      "num_filters": (4, 8), "skip_connections": False})
  return spaces.make(cfg)


def _archs(space, num, seed=0):
  tokens = np.asarray(space.random_tokens(jax.random.PRNGKey(seed), num))
  return [space.from_tokens(t) for t in tokens]


def _synthetic(seconds=0.0, spread=0.0, fail_every=0):
  config = ml_collections.ConfigDict({
      "seed": 0, "search": {"failure_reward": -1.0},
      "synthetic": {"seconds": seconds, "spread": spread, "fail_every": fail_every}})
  return workers.SyntheticEvaluator(config, None)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_JAX_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One persistent JAX compilation cache for this module's subprocesses.

  Compiling the controller takes ~13 s of a ~15 s tiny search on a 2-core
  CPU; with the cache every process after the first takes ~2 s.
  """
  _JAX_CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
  yield
  _JAX_CACHE.clear()


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
  if "dir" in _JAX_CACHE:
    env.update(JAX_COMPILATION_CACHE_DIR=_JAX_CACHE["dir"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


CONFIG_FILE = '''
import os, sys
sys.path.insert(0, {repo!r})
import jax
import ml_collections
from configs import default

# Compiling the controller is most of a tiny search's time on CPU.
jax.config.update("jax_disable_most_optimizations", True)


def get_config():
  config = default.get_config()
  config.seed = 3
  config.search.evaluator = "synthetic"
  config.search.strategy = "reinforce"
  config.search.children_per_step = 3     # not a multiple of 2 processes
  config.search.max_children = 15
  config.search.tensorboard = False
  config.controller.hidden_size = 8
  config.controller.num_layers = 1
  config.space.num_layers = 2
  config.synthetic = ml_collections.ConfigDict(
      {{"seconds": {seconds}, "spread": 1.0, "fail_every": 5}})
  config.distributed.heartbeat_timeout_seconds = 3
  config.distributed.shutdown_timeout_seconds = 10
  config.distributed.collective_timeout_seconds = 60
  return config
'''


def _config_file(tmp_path, seconds=0.0):
  path = tmp_path / f"synthetic_{seconds}.py"
  path.write_text(CONFIG_FILE.format(repo=str(REPO), seconds=seconds))
  return str(path)


def _start(config, workdir, num_processes, *overrides, port=None):
  """Starts a search of `num_processes` processes; returns their Popen objects."""
  port = port or _free_port()
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, "-m", "rlnas.main", f"--config={config}",
           f"--workdir={workdir}", *overrides]
    if num_processes > 1:
      cmd += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              f"--config.distributed.num_processes={num_processes}",
              f"--config.distributed.process_id={i}"]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  return procs


def _finish(procs, timeout=120):
  """Waits for all; returns [(returncode, output)]."""
  out = []
  for p in procs:
    try:
      text, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      text, _ = p.communicate()
      text += "\n[test: killed after timeout]"
    out.append((p.returncode, text))
  return out


def _history(workdir):
  path = pathlib.Path(workdir) / "history.jsonl"
  if not path.exists():
    return []
  records = [json.loads(line) for line in path.read_text().splitlines() if line]
  for r in records:
    r["metrics"] = {k: v for k, v in r["metrics"].items() if k not in WHO_AND_WHEN}
  return records


def _wait_for_history(workdir, lines, procs, timeout=60):
  deadline = time.monotonic() + timeout
  while len(_history(workdir)) < lines:
    assert time.monotonic() < deadline, "search made no progress"
    assert all(p.poll() is None for p in procs), _finish(procs)
    time.sleep(0.05)


def _controller(config_path, workdir):
  """The final controller state in `workdir` (restored from its checkpoint)."""
  spec = importlib.util.spec_from_file_location("cfg", config_path)
  module = importlib.util.module_from_spec(spec)
  # The config file switches XLA optimizations off for its subprocesses; keep
  # that out of this process (later in-process searches would compute with it).
  optimizations_off = jax.config.read("jax_disable_most_optimizations")
  try:
    spec.loader.exec_module(module)
  finally:
    jax.config.update("jax_disable_most_optimizations", optimizations_off)
  setup = search.prepare(module.get_config())
  ckpt = checkpointing.Checkpointer(str(workdir), 3)
  loop = {"step": 0, "children_done": 0, "best_reward": 0.0,
          "steps_since_improvement": 0, "elapsed_seconds": 0.0,
          "consecutive_failures": 0}
  _, state, loop = ckpt.restore(setup.strategy.init_state(), loop)
  ckpt.close()
  return jax.tree_util.tree_leaves(jax.device_get(state)), loop


def _assert_same_search(workdir, reference, config_path):
  got, want = _history(workdir), _history(reference)
  assert [(r["child_id"], r["tokens"]) for r in got] == [
      (r["child_id"], r["tokens"]) for r in want]
  assert got == want
  (leaves, loop), (ref_leaves, ref_loop) = (_controller(config_path, workdir),
                                            _controller(config_path, reference))
  for a, b in zip(leaves, ref_leaves, strict=True):
    np.testing.assert_array_equal(a, b)
  assert loop["step"] == ref_loop["step"] and loop["best_reward"] == ref_loop["best_reward"]


# ----------------------------------------------------------------------------
# In this process (one process, one device).

def _one_device():
  return jax.local_devices()[:1]


def test_one_process_collectives_return_at_once():
  g = distributed.group()
  assert (g.process_index, g.process_count, g.is_primary) == (0, 1, True)
  assert g.all_gather("x", b"a") == [b"a"]
  assert g.broadcast_json("x", {"a": 1}) == {"a": 1}
  assert g.agree("stop", None) is None and g.agree("stop", "max_children") == "max_children"
  state = {"w": np.arange(3.0)}
  assert g.from_primary(state, {"step": 2}) == (state, {"step": 2})
  assert g.sync_state(state, 0) is state
  assert not g.aborted()


def test_a_wait_for_a_stuck_peer_is_bounded():
  g = distributed.group(ml_collections.ConfigDict({"collective_timeout_seconds": 0.3}))
  start = time.monotonic()
  with pytest.raises(distributed.DistributedError, match="collective_timeout_seconds"):
    g.wait(g.begin("never") + "/value", "a result that never comes")
  assert time.monotonic() - start < 2.0


def test_wrap_keeps_a_single_device_evaluator():
  config = ml_collections.ConfigDict({"search": {"failure_reward": 0.0},
                                      "distributed": {"children_per_device": 1}})
  base = _synthetic()
  if len(jax.local_devices()) == 1:
    assert workers.wrap(base, config) is base
  config.distributed.children_per_device = 2
  assert isinstance(workers.wrap(base, config), workers.DistributedEvaluator)


def test_auto_children_per_device_asks_the_evaluator():
  config = ml_collections.ConfigDict({"search": {"failure_reward": 0.0},
                                      "distributed": {"children_per_device": 0}})
  base = _synthetic()
  devices = len(jax.local_devices())
  if devices == 1:  # Says nothing: one child at a time, unwrapped.
    assert workers.wrap(base, config) is base
  base.children_at_once = 3
  wrapped = workers.wrap(base, config)
  assert len(wrapped.workers) == 3 * devices
  assert [w.name for w in wrapped.workers][:3] == [
      f"p0/{workers._device_name(jax.local_devices()[0])}/{s}"  # pylint: disable=protected-access
      for s in range(3)]


def test_evaluator_spreads_uneven_children_and_keeps_their_order():
  space, base = _space(), _synthetic(seconds=0.02, spread=1.0, fail_every=4)
  archs, ids = _archs(space, 7), list(range(10, 17))
  dist = workers.DistributedEvaluator(base, distributed.group(), _one_device(),
                                      children_per_device=3)  # 7 = 3 + 3 + 1
  seen = []
  got = dist.evaluate(archs, ids, on_result=lambda i, r: seen.append(i))
  want = base.evaluate(archs, ids)
  assert seen == list(range(7))
  assert [(r.reward, r.status, r.error) for r in got] == [
      (r.reward, r.status, r.error) for r in want]
  assert got[1].status == evaluators.FAILED  # child 11: every 4th fails
  devices = {r.metrics["device"] + str(r.metrics["worker_seconds"] > 0) for r in got}
  assert devices == {"cpu:0True"}
  assert all(r.metrics["process"] == 0 for r in got)
  assert dist.totals and sum(t[0] for t in dist.totals.values()) == 7
  assert dist.last_scalars["workers/children_per_minute"] > 0
  assert 0 <= dist.last_scalars["workers/idle_fraction"] <= 1


class _Raising:
  """A base evaluator with a bug: it raises instead of returning a failed child."""

  def evaluate(self, archs, child_ids):
    if child_ids[0] % 2:
      raise ZeroDivisionError("boom")
    return [ChildResult(reward=1.0)]


def test_a_child_that_raises_is_a_failed_child_not_a_hang():
  dist = workers.DistributedEvaluator(_Raising(), distributed.group(), _one_device(),
                                      children_per_device=2, failure_reward=-3.0)
  got = dist.evaluate(_archs(_space(), 4), [0, 1, 2, 3])
  assert [r.reward for r in got] == [1.0, -3.0, 1.0, -3.0]
  assert "ZeroDivisionError: boom" in got[1].error


def test_a_stop_request_interrupts_every_worker():
  space = _space()
  dist = workers.DistributedEvaluator(_synthetic(seconds=0.3), distributed.group(),
                                      _one_device(), children_per_device=2)
  start, seen = time.monotonic(), []
  with pytest.raises(evaluators.Interrupted):
    dist.evaluate(_archs(space, 6), list(range(6)),
                  should_stop=lambda: time.monotonic() - start > 0.1,
                  on_result=lambda i, r: seen.append(i))
  assert time.monotonic() - start < 2.0  # not the 6 x 0.3 s the children take
  assert seen == []


# ----------------------------------------------------------------------------
# One process, 4 virtual CPU devices.


FOUR_DEVICES = textwrap.dedent('''
    import json, sys, time
    import jax, ml_collections, numpy as np
    jax.config.update("jax_disable_most_optimizations", True)
    sys.path.insert(0, {repo!r})
    from configs import default
    from rlnas import data, distributed, evaluators, spaces, workers
    assert len(jax.local_devices()) == 4, jax.local_devices()
    config = default.get_config()
    config.space.num_layers = 1
    config.space.num_filters = (4, 8)
    config.child.epochs = 1
    config.child.batch_size = 32
    config.child.eval_batch_size = 64
    config.reward.last_k = 1
    config.synthetic = ml_collections.ConfigDict({{"seconds": 0.2}})
    space = spaces.make(config.space)
    tokens = np.asarray(space.random_tokens(jax.random.PRNGKey(1), 8))
    archs = [space.from_tokens(t) for t in tokens]
    g = distributed.group(config.distributed)
    out = {{}}
    # Synthetic: who ran each child (device) and where its key was drawn.
    base = workers.SyntheticEvaluator(config, space)
    dist = workers.DistributedEvaluator(base, g)
    got = dist.evaluate(archs, list(range(8)))
    out["synthetic"] = [(r.reward, r.metrics["device"], r.metrics["computed_on"]) for r in got]
    out["synthetic_single"] = [r.reward for r in base.evaluate(archs, list(range(8)))]
    # Real child training on a tiny random dataset.
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    split = lambda n: data.Split(rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8),
                                 rng.integers(0, 3, (n,), dtype=np.int32))
    dataset = data.Dataset(train=split(64), validation=split(32), test=None,
                           num_classes=3, input_shape=(8, 8, 1),
                           mean=np.array([127.0], np.float32),
                           std=np.array([64.0], np.float32), name="tiny")
    base = evaluators.ChildTrainerEvaluator(dataset, config)
    got = workers.DistributedEvaluator(base, g).evaluate(archs[:2], [0, 1])
    want = base.evaluate(archs[:2], [0, 1])
    out["real"] = [(r.reward, r.val_accuracies, r.metrics["device"]) for r in got]
    out["real_single"] = [(r.reward, r.val_accuracies) for r in want]
    print("RESULT " + json.dumps(out))
    print("seconds", time.perf_counter() - t0, file=sys.stderr)
''')


def test_four_virtual_devices_share_the_children_and_agree_with_one():
  proc = subprocess.run(
      [sys.executable, "-c", FOUR_DEVICES.format(repo=str(REPO))], cwd=REPO,
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT ", 1)[1])
  synthetic = out["synthetic"]
  assert [r for r, _, _ in synthetic] == out["synthetic_single"]
  assert all(device == drawn for _, device, drawn in synthetic)
  # 8 children of 0.2 s each over 4 free workers: each device takes some.
  assert {device for _, device, _ in synthetic} == {"cpu:0", "cpu:1", "cpu:2", "cpu:3"}
  assert [(r, v) for r, v, _ in out["real"]] == [tuple(x) for x in out["real_single"]]
  assert len({device for _, _, device in out["real"]}) > 1


# ----------------------------------------------------------------------------
# Two processes on 127.0.0.1.


class _Reference:
  """A one-process search with fast children, run once in the background."""

  def __init__(self, tmp):
    self.config = _config_file(tmp)
    self.workdir = tmp / "run"
    self._proc = _start(self.config, self.workdir, 1)
    self._done = False

  def wait(self):
    if not self._done:
      (code, text), = _finish(self._proc)
      assert code == 0, text[-3000:]
      self._done = True
    return self.config, self.workdir


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return _Reference(tmp_path_factory.mktemp("reference"))


def _check_two_process_history(workdir):
  history = [json.loads(line) for line in
             (workdir / "history.jsonl").read_text().splitlines()]
  assert {r["metrics"]["process"] for r in history} == {0, 1}
  assert any(r["status"] == evaluators.FAILED for r in history)


@needs_hooks
def test_two_processes_stopped_and_resumed_give_the_search_of_one(tmp_path, reference):
  # Children of 0.1-0.2 s, so that the search is still running when stopped.
  slow = _config_file(tmp_path, seconds=0.1)
  workdir = tmp_path / "run"
  procs = _start(slow, workdir, 2)
  _wait_for_history(workdir, 4, procs)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  for code, text in _finish(procs, timeout=60):
    assert code == 0, text[-3000:]
  assert 4 <= len(_history(workdir)) < 15
  resumed = _finish(_start(slow, workdir, 2))
  for code, text in resumed:
    assert code == 0, text[-3000:]
  assert "resuming" in resumed[0][1]
  # The config files differ only in the children's duration.
  config, ref = reference.wait()
  _assert_same_search(workdir, ref, config)
  _check_two_process_history(workdir)
  # The log says who evaluated what and who waited for whom.
  assert "on 2 workers" in resumed[0][1] and "waiting for stragglers" in resumed[0][1]
  assert " on p1/cpu:" in resumed[1][1]


@pytest.mark.slow
@needs_hooks
def test_two_processes_give_the_history_and_controller_of_one(tmp_path, reference):
  results = _finish(_start(reference.config, tmp_path / "run", 2))
  for code, text in results:
    assert code == 0, text[-3000:]
  config, ref = reference.wait()
  _assert_same_search(tmp_path / "run", ref, config)
  _check_two_process_history(tmp_path / "run")


@needs_hooks
@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_killed_process_stops_the_other_in_bounded_time(tmp_path, victim):
  config = _config_file(tmp_path, seconds=0.3)
  workdir = tmp_path / "run"
  # Random search: no controller to compile, the same evaluation protocol.
  procs = _start(config, workdir, 2, "--config.search.max_children=60",
                 "--config.search.strategy=random")
  _wait_for_history(workdir, 2, procs)
  procs[victim].kill()
  start = time.monotonic()
  survivor = procs[1 - victim]
  (code, text), = _finish([survivor], timeout=60)
  seconds = time.monotonic() - start
  procs[victim].wait()
  # JAX's heartbeat timeout is 3 s in this config; allow for a loaded machine.
  assert code != 0 and seconds < 30, (code, seconds, text[-3000:])
  assert "another task died" in text, text[-3000:]


@needs_hooks
def test_an_error_on_process_0_stops_the_other_with_its_message(tmp_path):
  config = _config_file(tmp_path)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"seed": 12345}))  # another run
  results = _finish(_start(config, workdir, 2, "--config.search.strategy=random"),
                    timeout=60)
  assert results[0][0] == 2 and "WorkdirMismatchError" in results[0][1]
  assert results[1][0] != 0
  assert "process 0 of 2 failed: WorkdirMismatchError" in results[1][1]


@pytest.mark.slow
@needs_hooks
def test_launch_local_sh_runs_a_two_process_search(tmp_path, reference):
  config = reference.config
  proc = subprocess.run(
      ["bash", str(REPO / "launch" / "local.sh"), "--num_processes=2",
       f"--config={config}", f"--workdir={tmp_path / 'run'}",
       f"--python={sys.executable}"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "all 2 processes finished" in proc.stderr
  _, ref = reference.wait()
  _assert_same_search(tmp_path / "run", ref, config)


@needs_hooks
def test_launch_fields_do_not_make_another_run(tmp_path):
  config = ml_collections.ConfigDict({
      "seed": 0, "search": {"allow_config_change": False},
      "distributed": {"coordinator_address": "127.0.0.1:1234", "process_id": 0}})
  checkpointing.save_config(config, str(tmp_path))
  config.distributed.coordinator_address = "127.0.0.1:4321"
  config.distributed.process_id = 1
  assert checkpointing.check_workdir_config(config, str(tmp_path)) == []
  config.seed = 1
  with pytest.raises(checkpointing.WorkdirMismatchError):
    checkpointing.check_workdir_config(config, str(tmp_path))
