"""The search loop: propose, evaluate, learn, record, checkpoint, repeat.

    config ──> space (decisions) ──> strategy.propose ──> tokens [M, T]
                                                           │ space.from_tokens
                                                           v
    strategy.update <── rewards [M] <── evaluator.evaluate(archs, child_ids)

Each controller step samples M = config.search.children_per_step architectures
(Zoph & Le 2017, sec. 3.4: m = 8), evaluates them, applies one strategy update,
appends one history line per child, replaces best.json, writes TensorBoard
scalars and a checkpoint. Restarting in the same workdir resumes exactly:
children already in the history are not trained again (their results are read
back), everything else is recomputed from the checkpoint and `fold_in` keys.
"""

import dataclasses
import math
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from rlnas import checkpointing
from rlnas import evaluators
from rlnas import records
from rlnas import spaces
from rlnas import strategies
from rlnas.evaluators import ChildResult


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and the fix."""


class SearchAborted(RuntimeError):
  """Too many consecutive failed children: something other than the architecture is wrong."""


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values a user can get wrong, before any work or any write."""
  s = config.search
  _check(s.strategy in strategies.names(),
         f"config.search.strategy={s.strategy!r} is unknown; use one of "
         f"{', '.join(strategies.names())}")
  _check(s.evaluator in evaluators.names(),
         f"config.search.evaluator={s.evaluator!r} is unknown; use one of "
         f"{', '.join(evaluators.names())}")
  _check(s.children_per_step >= 1, "config.search.children_per_step must be >= 1")
  _check(s.max_children >= 1, "config.search.max_children must be >= 1")
  _check(s.max_minutes >= 0, "config.search.max_minutes must be >= 0 (0 = no limit)")
  _check(s.patience_steps >= 0, "config.search.patience_steps must be >= 0 (0 = off)")
  _check(s.checkpoints_to_keep >= 1, "config.search.checkpoints_to_keep must be >= 1")
  _check(s.max_consecutive_failures >= 1,
         "config.search.max_consecutive_failures must be >= 1")
  d = s.depth_schedule
  if d.every_children:
    _check(d.every_children > 0 and d.add_layers >= 1 and d.start_layers >= 1,
           "config.search.depth_schedule needs start_layers >= 1, add_layers >= 1 "
           "and every_children > 0 (or every_children = 0 to switch it off)")
    _check(d.max_layers >= d.start_layers,
           "config.search.depth_schedule.max_layers must be >= start_layers")
    _check(s.strategy != "evolution",
           "evolution mutates fixed-length token vectors; switch off "
           "config.search.depth_schedule (every_children=0) or use reinforce/random")
  c = config.controller
  _check(c.learning_rate > 0, "config.controller.learning_rate must be > 0")
  _check(0.0 <= c.baseline_decay < 1.0, "config.controller.baseline_decay must be in [0, 1)")
  _check(c.temperature > 0, "config.controller.temperature must be > 0")
  _check(c.hidden_size >= 1 and c.num_layers >= 1,
         "config.controller.hidden_size and num_layers must be >= 1")
  _check(c.entropy_weight >= 0, "config.controller.entropy_weight must be >= 0")
  if s.evaluator == "child_trainer":
    ch = config.child
    _check(ch.epochs >= 1, "config.child.epochs must be >= 1")
    _check(ch.batch_size >= 1 and ch.eval_batch_size >= 1,
           "config.child.batch_size and eval_batch_size must be >= 1")
    _check(ch.learning_rate > 0, "config.child.learning_rate must be > 0")
    _check(ch.loop in ("auto", "python", "scan"),
           f"config.child.loop={ch.loop!r}; use 'auto', 'python' or 'scan'")
    _check(ch.head in ("gap", "flatten"),
           f"config.child.head={ch.head!r}; use 'gap' or 'flatten'")
    r = config.reward
    _check(r.last_k >= 1, "config.reward.last_k must be >= 1")
    _check(r.last_k <= ch.epochs,
           f"config.reward.last_k={r.last_k} exceeds config.child.epochs={ch.epochs}")
    _check(r.power > 0, "config.reward.power must be > 0")
    _check(r.aggregate in ("max", "last"), "config.reward.aggregate must be 'max' or 'last'")


@dataclasses.dataclass
class Setup:
  """Everything built from the config, before the workdir is touched."""
  space: Any
  strategy: Any
  evaluator: evaluators.Evaluator


def prepare(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config and builds space, strategy and evaluator."""
  validate(config)
  try:
    space = spaces.make(config.space)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.search.depth_schedule.every_children:
    space = space.with_num_layers(config.search.depth_schedule.start_layers)
  strategy = strategies.make(config, space.decisions)
  evaluator = evaluators.make(config, space)
  return Setup(space, strategy, evaluator)


def space_at(config: ml_collections.ConfigDict, space, children_done: int):
  """The space at the depth the schedule gives after `children_done` children.

  Zoph & Le 2017, sec. 4.1: start at 6 layers, add 2 every 1,600 samples.
  """
  d = config.search.depth_schedule
  if not d.every_children:
    return space
  depth = min(d.start_layers + d.add_layers * (children_done // d.every_children),
              d.max_layers)
  return space.with_num_layers(depth)


class _StopFlag:
  """Turns SIGTERM/SIGINT into a request to stop after the current child."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:      # a second signal: stop now
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    logging.warning("%s received: finishing the current child, then saving "
                    "and exiting (send again to stop at once)", self.signal)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _history_record(step: int, index: int, child_id: int, arch, depth: int | None,
                    result: ChildResult) -> dict[str, Any]:
  return {"step": step, "index": index, "child_id": child_id, "depth": depth,
          "key": arch.key, "tokens": list(arch.tokens),
          "architecture": arch.to_json(), **result.to_json()}


def _fmt_minutes(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  return f"{seconds / 60:.1f}m"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the search described by `config` in `workdir`.

  Returns a summary: children done, best reward and architecture, why it stopped.
  """
  setup = prepare(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} exists and is not a directory")
  resuming = os.path.isdir(workdir) and checkpointing.check_workdir_config(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  if not resuming:
    checkpointing.save_config(config, workdir)

  s = config.search
  space, strategy, evaluator = setup.space, setup.strategy, setup.evaluator
  ckpt = checkpointing.Checkpointer(workdir, s.checkpoints_to_keep)
  loop = {"step": 0, "children_done": 0, "best_reward": -np.inf,
          "steps_since_improvement": 0, "elapsed_seconds": 0.0,
          "consecutive_failures": 0}
  state = strategy.init_state()
  restored = ckpt.restore(state, loop)
  if restored is not None:
    _, state, loop = restored
    logging.info("resuming %s at controller step %d (%d children done)",
                 workdir, loop["step"], loop["children_done"])

  # Children evaluated after the last checkpoint are replayed, not retrained.
  history = records.read_history(workdir)
  done = [r for r in history if r["step"] < loop["step"]]
  replay = {(r["step"], r["index"]): r for r in history if r["step"] >= loop["step"]}
  if len(done) != loop["children_done"]:
    raise RuntimeError(
        f"{workdir}: history.jsonl holds {len(done)} children before step "
        f"{loop['step']} but the checkpoint counts {loop['children_done']}; "
        "the workdir was modified by hand. Start a new workdir.")
  if len(done) != len(history) or replay:
    records.rewrite_history(workdir, done)
  best = max(done, key=lambda r: r["reward"]) if done else None

  writer = records.HistoryWriter(workdir)
  scalars = records.ScalarWriter(workdir, enabled=s.tensorboard)
  session_start, session_children = time.perf_counter(), 0
  elapsed_before = loop["elapsed_seconds"]
  stop_reason = None
  try:
    with _StopFlag() as stop_flag:
      while True:
        elapsed = elapsed_before + time.perf_counter() - session_start
        if loop["children_done"] >= s.max_children:
          stop_reason = "max_children"
        elif s.max_minutes and elapsed >= 60 * s.max_minutes:
          stop_reason = "max_minutes"
        elif s.patience_steps and loop["steps_since_improvement"] >= s.patience_steps:
          stop_reason = "no_improvement"
        elif stop_flag.signal:
          stop_reason = f"signal_{stop_flag.signal}"
        if stop_reason:
          break

        step, first_id = loop["step"], loop["children_done"]
        num = min(s.children_per_step, s.max_children - first_id)
        step_space = space_at(config, space, first_id)
        decisions = step_space.decisions
        depth = getattr(step_space, "num_layers", None)
        tokens = strategy.propose(state, step, num, decisions)
        archs = [step_space.from_tokens(t) for t in tokens]
        results: list[ChildResult | None] = [None] * num
        for i, arch in enumerate(archs):
          old = replay.get((step, i))
          if old is not None and old["tokens"] == list(arch.tokens):
            results[i] = ChildResult.from_json(old)
        for i in range(num):
          if results[i] is None:
            if stop_flag.signal:
              break
            results[i] = evaluator.evaluate([archs[i]], [first_id + i])[0]
            session_children += 1
          writer.append(_history_record(step, i, first_id + i, archs[i], depth,
                                        results[i]))
        if any(r is None for r in results):
          stop_reason = f"signal_{stop_flag.signal}"
          break

        rewards = np.array([r.reward for r in results], np.float32)
        for r in results:
          loop["consecutive_failures"] = (
              loop["consecutive_failures"] + 1 if r.status != evaluators.OK else 0)
        if loop["consecutive_failures"] >= s.max_consecutive_failures:
          raise SearchAborted(
              f"{loop['consecutive_failures']} children failed in a row (last: "
              f"{results[-1].error}); this is not a bad architecture but a bad "
              "setup (data, learning rate, memory). Fix it and resume.")
        state, metrics = strategy.update(state, tokens, rewards, decisions)

        step_best = int(np.argmax(rewards))
        if rewards[step_best] > loop["best_reward"]:
          loop["best_reward"] = float(rewards[step_best])
          loop["steps_since_improvement"] = 0
          best = _history_record(step, step_best, first_id + step_best,
                                 archs[step_best], depth, results[step_best])
          records.atomic_write_json(os.path.join(workdir, records.BEST), best)
        else:
          loop["steps_since_improvement"] += 1
        loop["step"] += 1
        loop["children_done"] += num
        loop["elapsed_seconds"] = elapsed_before + time.perf_counter() - session_start
        ckpt.save(loop["step"], state, loop)

        rate = session_children / max(time.perf_counter() - session_start, 1e-9) * 60
        left = s.max_children - loop["children_done"]
        eta = left / rate * 60 if rate > 0 else float("inf")
        if s.max_minutes:
          eta = min(eta, 60 * s.max_minutes - loop["elapsed_seconds"])
        logging.info(
            "step %d  children %d/%d  reward mean %.4f  baseline %s  best %.4f  "
            "%.1f children/min  ETA %s", step, loop["children_done"], s.max_children,
            rewards.mean(), f"{metrics['baseline']:.4f}" if "baseline" in metrics else "-",
            loop["best_reward"], rate, _fmt_minutes(eta))
        scalars.scalars(loop["children_done"], {
            "reward/mean": float(rewards.mean()), "reward/max": float(rewards.max()),
            "reward/best_so_far": loop["best_reward"],
            "children_per_minute": rate,
            "failed_children": sum(r.status != evaluators.OK for r in results),
            **{f"controller/{k}": v for k, v in metrics.items()}})
  finally:
    writer.close()
    scalars.close()
    ckpt.close()

  if stop_reason and stop_reason.startswith("signal"):
    logging.warning("stopped by %s after %d children; resume with the same "
                    "command (same --config and --workdir=%s)", stop_reason[7:],
                    loop["children_done"], workdir)
  summary = {"stop_reason": stop_reason, "children_done": loop["children_done"],
             "controller_steps": loop["step"], "best_reward": loop["best_reward"],
             "best": best, "elapsed_seconds": loop["elapsed_seconds"]}
  logging.info("search stopped (%s): %d children, best reward %.4f", stop_reason,
               loop["children_done"], loop["best_reward"])
  if best is not None:
    logging.info("best architecture (child %d):\n%s", best["child_id"],
                 best["architecture"]["text"])
  return summary
