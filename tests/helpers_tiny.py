"""Tiny searches for the survival tests: configs, a fake evaluator, a kill harness.

Three roles in one file:
- A config file: `--config=tests/helpers_tiny.py:toy` (or `:real`) gives a
  search small enough to run many times per test (`get_config`).
- A fake evaluator, "toy": a closed-form reward of the tokens after a short
  sleep, with some children failing, deterministic, and interruptible through
  `should_stop` like the real child trainer. It can log every evaluation to a
  file so a test can prove that a resumed search retrains nothing it had.
- A launcher: `python tests/helpers_tiny.py --config=... --workdir=...`
  registers "toy" and runs `rlnas.main`, so subprocess tests can SIGKILL a
  real search process (`launch`, `kill_and_resume`).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import ml_collections
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlnas import evaluators  # pylint: disable=g-import-not-at-top,wrong-import-position

TOY = "toy"
# History metrics that measure time, the only fields two identical runs differ in.
TIMING_METRICS = ("train_seconds", "compile_seconds")


# ----------------------------------------------------------------------------
# Configs.


def get_config(kind: str = TOY) -> ml_collections.ConfigDict:
  """A search of a few seconds. kind: 'toy' (fake evaluator) or 'real' (digits)."""
  config = default.get_config()
  config.search.tensorboard = False
  # No persistent compilation cache: kill tests time children, and a cache
  # warmed by an earlier run would make them finish before the kill.
  config.child.compilation_cache_dir = ""
  config.controller.hidden_size = 16
  config.controller.num_layers = 1
  config.controller.learning_rate = 0.05
  config.controller.baseline_decay = 0.5
  sp = config.space
  if kind == TOY:
    # 2 layers x (filter h, filter w, filters) + 1 anchor bit = 7 tokens.
    sp.num_layers = 2
    sp.filter_heights, sp.filter_widths, sp.num_filters = (1, 3), (1, 3, 5), (8, 16)
    config.search.evaluator = TOY
    config.search.children_per_step = 3
    config.search.max_children = 18
    config.search.max_consecutive_failures = 50
    config.search.failure_reward = -0.25
    config.toy = ml_collections.ConfigDict()
    # Seconds each toy child "trains" (polled for should_stop every 5 ms).
    config.toy.delay = 0.15
    # File to append "start ID" / "end ID" lines to ('' = none).
    config.toy.calls_log = ""
  elif kind == "real":
    # 1 layer, 1 epoch of 9 steps on 8x8 digits: ~1-3 s of compile per child.
    sp.num_layers = 1
    sp.filter_heights, sp.filter_widths, sp.num_filters = (1, 3), (1, 3), (4, 8)
    config.child.epochs = 1
    config.child.batch_size = 128
    # The whole-child jit engine: it polls should_stop before every step,
    # which the preemption tests time (the layer-wise engine stops between
    # children; tests/test_search.py runs it through the entry point).
    config.child.engine = "jit"
    config.reward.last_k = 1
    config.search.children_per_step = 2
    config.search.max_children = 4
  else:
    raise ValueError(f"kind must be 'toy' or 'real', got {kind!r}")
  return config


# ----------------------------------------------------------------------------
# The toy evaluator.


def toy_reward(tokens) -> float | None:
  """Closed-form reward in (0, 1), or None (a failed child) for 1 child in 5."""
  tokens = np.asarray(tokens, np.float64)
  if int(tokens.sum() * 7 + tokens[0]) % 5 == 3:
    return None
  weights = np.cos(np.arange(tokens.size) * 1.3 + 0.5)
  return float(0.5 + 0.5 * np.tanh(weights @ tokens / 2))


class ToyEvaluator:
  """Deterministic fake children: a sleep, then `toy_reward` of the tokens."""

  calls: list[int] = []   # child ids evaluated in this process, all instances

  def __init__(self, config: ml_collections.ConfigDict, space):
    del space
    self.delay = float(config.toy.delay)
    self.calls_log = config.toy.calls_log
    self.failure_reward = float(config.search.failure_reward)

  def _log(self, line: str) -> None:
    if self.calls_log:
      with open(self.calls_log, "a") as f:
        f.write(line + "\n")

  def evaluate(self, archs, child_ids, *,
               should_stop: Callable[[], bool] | None = None):
    results = []
    for arch, child_id in zip(archs, child_ids):
      self._log(f"start {child_id}")
      ToyEvaluator.calls.append(child_id)
      end = time.monotonic() + self.delay
      while time.monotonic() < end:
        if should_stop is not None and should_stop():
          self._log(f"interrupted {child_id}")
          raise evaluators.Interrupted("stop requested")
        time.sleep(0.005)
      reward = toy_reward(arch.tokens)
      if reward is None:
        results.append(evaluators.failed("toy failure: tokens hit the bad pattern",
                                         self.failure_reward))
      else:
        results.append(evaluators.ChildResult(reward=reward,
                                              metrics={"toy_tokens": len(arch.tokens)}))
      self._log(f"end {child_id}")
    return results


def register() -> None:
  evaluators.register(TOY, ToyEvaluator)


register()


# ----------------------------------------------------------------------------
# Comparing runs.


def history_lines(workdir: str) -> list[str]:
  """Complete lines of history.jsonl (a torn tail left by a kill is not one)."""
  path = os.path.join(workdir, "history.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  return text.split("\n")[:-1]


def without_timing(record: dict[str, Any], ignore=()) -> dict[str, Any]:
  record = dict(record)
  record["metrics"] = {k: v for k, v in record.get("metrics", {}).items()
                       if k not in TIMING_METRICS + tuple(ignore)}
  return record


def comparable_history(workdir: str, ignore=()) -> list[dict[str, Any]]:
  return [without_timing(json.loads(line), ignore) for line in history_lines(workdir)]


def final_state(config: ml_collections.ConfigDict, workdir: str):
  """(step, strategy state, loop) of the newest checkpoint in `workdir`."""
  from rlnas import checkpointing  # pylint: disable=g-import-not-at-top
  from rlnas import search  # pylint: disable=g-import-not-at-top
  strategy = search.prepare(config).strategy
  loop = {"step": 0, "children_done": 0, "best_reward": -np.inf,
          "steps_since_improvement": 0, "elapsed_seconds": 0.0,
          "consecutive_failures": 0}
  ckpt = checkpointing.Checkpointer(workdir, config.search.checkpoints_to_keep)
  try:
    restored = ckpt.restore(strategy.init_state(), loop)
  finally:
    ckpt.close()
  assert restored is not None, f"no checkpoint in {workdir}"
  return restored


def assert_same_search(config, reference: str, workdir: str, ignore=()) -> None:
  """Same history (timing and `ignore`d metrics aside), best.json, controller
  state bit for bit, loop."""
  import jax  # pylint: disable=g-import-not-at-top
  assert comparable_history(workdir, ignore) == comparable_history(reference, ignore)
  with open(os.path.join(reference, "best.json")) as f:
    best_ref = without_timing(json.load(f), ignore)
  with open(os.path.join(workdir, "best.json")) as f:
    assert without_timing(json.load(f), ignore) == best_ref
  step_ref, state_ref, loop_ref = final_state(config, reference)
  step, state, loop = final_state(config, workdir)
  assert step == step_ref
  leaves_ref = jax.tree_util.tree_leaves_with_path(state_ref)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  assert [p for p, _ in leaves] == [p for p, _ in leaves_ref]
  for (path, a), (_, b) in zip(leaves, leaves_ref):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, path
    assert a.tobytes() == b.tobytes(), f"{jax.tree_util.keystr(path)} differs"
  loop.pop("elapsed_seconds")
  loop_ref.pop("elapsed_seconds")
  assert loop == loop_ref


# ----------------------------------------------------------------------------
# Running searches as processes and killing them.


def subprocess_env(cache_dir: str | None = None) -> dict[str, str]:
  """Environment of a search subprocess; a shared compile cache if given."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  if cache_dir:
    # Restarts then load the controller's and children's executables instead
    # of compiling them again; results are the same executables' results.
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def command(kind: str, workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, os.path.abspath(__file__),
          f"--config={os.path.abspath(__file__)}:{kind}", f"--workdir={workdir}",
          *overrides]


def launch(cmd: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
  log = open(log_path, "a")  # pylint: disable=consider-using-with
  log.write(f"\n===== {' '.join(cmd)}\n")
  log.flush()
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=log)
  log.close()
  return proc


def run_to_end(cmd, env, log_path: str, timeout: float = 300) -> int:
  proc = launch(cmd, env, log_path)
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise


def _damage(workdir: str) -> dict[str, bool]:
  """What a kill left half-written: a torn history line, a checkpoint temporary."""
  path = os.path.join(workdir, "history.jsonl")
  torn = False
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b"\n"
  ckpt_dir = os.path.join(workdir, "checkpoints")
  temporary = os.path.isdir(ckpt_dir) and any(
      "tmp" in name for name in os.listdir(ckpt_dir))
  return {"torn_history_line": torn, "checkpoint_temporary": temporary}


def _finished_before_signal(log_path: str) -> bool:
  """Whether the last process in `log_path` ended its search on its own."""
  with open(log_path) as f:
    last = f.read().rsplit("===== ", 1)[-1]
  return "search stopped (max_children)" in last


def kill_and_resume(cmd, env, workdir: str, log_path: str, *, kills: int,
                    rng: random.Random, min_lines_ahead: int = 0,
                    max_lines_ahead: int = 3, max_delay: float = 0.4,
                    timeout: float = 300, term_every: int = 0,
                    term_signals=(signal.SIGTERM,),
                    on_launch: Callable[[], None] | None = None
                    ) -> list[dict[str, Any]]:
  """Starts the search, kills it `kills` times at random points, runs it to the end.

  A kill point: wait until the process has added min..max_lines_ahead history
  lines, then a random 0..max_delay seconds (so kills land in training, in
  history writes, in checkpoint writes, in start-up and in replays), then
  SIGKILL; every `term_every`-th stop is instead a graceful signal, taken in
  turn from `term_signals` (SIGTERM, SIGINT) and sent after at least one new
  line, which must end the process cleanly (exit 0).
  `on_launch` runs before every process starts.

  After every stop, the complete history lines must be a prefix of every later
  history: nothing recorded is lost, rewritten or retrained.

  Returns one dict per stop: signal, lines before/after, seconds to exit, and
  whether it left a torn history line or a checkpoint temporary directory.
  """
  stops = []
  snapshot = history_lines(workdir)
  for k in range(kills):
    before = len(snapshot)
    if on_launch:
      on_launch()
    proc = launch(cmd, env, log_path)
    use_term = term_every and (k + 1) % term_every == 0
    # SIGTERM once the search runs (a line written), not while Python starts.
    target = before + max(rng.randint(min_lines_ahead, max_lines_ahead),
                          1 if use_term else 0)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and len(history_lines(workdir)) < target:
      if time.monotonic() > deadline:
        proc.kill()
        raise TimeoutError(f"no progress to {target} lines in {timeout} s")
      time.sleep(0.01)
    time.sleep(rng.uniform(0, max_delay))
    if proc.poll() is not None:  # finished on its own before the kill
      assert proc.returncode == 0, f"search failed, see {log_path}"
      break
    sig = signal.SIGKILL
    if use_term:
      sig = term_signals[((k + 1) // term_every - 1) % len(term_signals)]
    sent = time.monotonic()
    proc.send_signal(sig)
    rc = proc.wait(timeout=timeout)
    stop = {"signal": sig.name, "lines_before": before,
            "seconds_to_exit": time.monotonic() - sent}
    if use_term and rc == -sig and _finished_before_signal(log_path):
      # The search had ended and the process was shutting down, after the
      # search's own handlers were gone: nothing was left to stop.
      break
    if use_term:
      assert rc == 0, f"{sig.name} exit status {rc}, see {log_path}"
    else:
      assert rc == -signal.SIGKILL, rc
    lines = history_lines(workdir)
    assert lines[:len(snapshot)] == snapshot, "recorded children were changed"
    snapshot = lines
    stop.update(lines_after=len(lines), **_damage(workdir))
    stops.append(stop)
  if on_launch:
    on_launch()
  rc = run_to_end(cmd, env, log_path, timeout)
  assert rc == 0, f"final run failed ({rc}), see {log_path}"
  assert history_lines(workdir)[:len(snapshot)] == snapshot
  return stops


if __name__ == "__main__":
  from rlnas import main  # pylint: disable=g-import-not-at-top
  main.run()
