"""The search loop: propose, evaluate, learn, record, checkpoint, repeat.

    config ──> space (decisions) ──> strategy.propose ──> tokens [M, T]
                                                           │ space.from_tokens
                                                           v
    strategy.update <── rewards [M] <── evaluator.evaluate(archs, child_ids)

Each controller step samples M = config.search.children_per_step architectures
(Zoph & Le 2017, sec. 4.1: m = 8), evaluates them, applies one strategy update,
appends one history line per child, replaces best.json, writes TensorBoard
scalars and a checkpoint. Restarting in the same workdir resumes exactly:
children already in the history are not trained again (their results are read
back), everything else is recomputed from the checkpoint and `fold_in` keys.

What survives what (tested in tests/test_survival.py):
- SIGKILL at any moment: the history holds every child finished before it
  (one fsynced line each; a torn last line is dropped on resume), the newest
  complete checkpoint holds the controller after the last finished step, and
  the resumed run replays the children of the unfinished step from the history
  in order, so it ends with the same controller parameters, baseline and
  history as a run never interrupted.
- SIGTERM/SIGINT: the child in training stops at its next training step (for
  evaluators that accept `should_stop`), is not recorded and is retrained on
  resume; the search exits cleanly saying how to resume. A second signal
  stops at once (still resumable).
"""

import dataclasses
import inspect
import math
import os
import signal
import time
from typing import Any, Callable

from absl import logging
import ml_collections
import numpy as np

from rlnas import checkpointing
from rlnas import data as data_lib
from rlnas import distributed
from rlnas import evaluators
from rlnas import records
from rlnas import reward_cache
from rlnas import spaces
from rlnas import strategies
from rlnas import tabular  # registers the "tabular" evaluator  # pylint: disable=unused-import
from rlnas import workers
from rlnas.evaluators import ChildResult
from rlnas.reward_cache import RewardCache


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and the fix."""


class SearchAborted(RuntimeError):
  """Too many consecutive failed children: something other than the architecture is wrong."""


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def validate_child(ch: ml_collections.ConfigDict) -> None:
  """Checks `config.child`; shared by the search and the final retraining."""
  _check(ch.epochs >= 1, "config.child.epochs must be >= 1")
  _check(ch.batch_size >= 1 and ch.eval_batch_size >= 1,
         "config.child.batch_size and eval_batch_size must be >= 1")
  _check(ch.learning_rate > 0, "config.child.learning_rate must be > 0")
  _check(ch.optimizer in ("momentum", "adam", "sgd"),
         f"config.child.optimizer={ch.optimizer!r}; use 'momentum', 'adam' or 'sgd'")
  _check(ch.lr_schedule in ("constant", "cosine"),
         f"config.child.lr_schedule={ch.lr_schedule!r}; use 'constant' or 'cosine'")
  _check(ch.weight_decay >= 0, "config.child.weight_decay must be >= 0")
  _check(0.0 <= ch.bn_momentum < 1.0, "config.child.bn_momentum must be in [0, 1)")
  _check(ch.get("min_spatial_size", 1) >= 1,
         "config.child.min_spatial_size must be >= 1 (1 = off)")
  _check(ch.loop in ("auto", "python", "scan"),
         f"config.child.loop={ch.loop!r}; use 'auto', 'python' or 'scan'")
  _check(ch.head in ("gap", "flatten"),
         f"config.child.head={ch.head!r}; use 'gap' or 'flatten'")
  _check(ch.get("engine", "auto") in ("auto", "layerwise", "jit"),
         f"config.child.engine={ch.get('engine')!r}; use 'auto', 'layerwise' or 'jit'")


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
  _check(isinstance(s.get("reward_cache", False), bool),
         "config.search.reward_cache must be True or False")
  _check(isinstance(s.failure_reward, (int, float)) and math.isfinite(s.failure_reward),
         "config.search.failure_reward must be a finite number")
  if s.strategy == "evolution":
    e = config.evolution
    _check(e.population_size >= 1 and e.sample_size >= 1,
           "config.evolution.population_size and sample_size must be >= 1")
    _check(e.sample_size <= e.population_size,
           f"config.evolution.sample_size={e.sample_size} exceeds "
           f"population_size={e.population_size}")
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
    validate_child(config.child)
    r = config.reward
    _check(r.last_k >= 1, "config.reward.last_k must be >= 1")
    _check(r.last_k <= config.child.epochs,
           f"config.reward.last_k={r.last_k} exceeds config.child.epochs={config.child.epochs}")
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
  try:
    evaluator = evaluators.make(config, space)
  except data_lib.DataError:
    raise
  except ValueError as e:  # e.g. a space the evaluator cannot build children of
    raise ConfigError(str(e)) from None
  try:  # several processes or local devices: spread each step's children
    evaluator = workers.wrap(evaluator, config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
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
  """Turns SIGTERM/SIGINT into a request to stop at the next safe point."""

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
    logging.warning("%s received: stopping the current child, saving and "
                    "exiting (send again to stop at once)", self.signal)

  def requested(self) -> bool:
    return self.signal is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _evaluate_in_parallel(group, evaluator, history, cache: RewardCache, step: int,
                          first_id: int, archs, depth: int | None,
                          should_stop) -> tuple[list[ChildResult], int]:
  """All children of a step at once, over every process and device (rlnas.distributed).

  Process 0 reads back what the history already holds (always a prefix of the
  step) and what the reward cache serves, and sends both to the others; the
  rest are evaluated together (a repeat within the step once, when the cache
  is on), and process 0 appends each child to the history once it and all
  before it are done.

  Returns:
    The step's results and how many of them were evaluated (not read back).
  """
  n = len(archs)
  replayed, served = [], {}
  if group.is_primary:
    for i, arch in enumerate(archs):
      line = history.replay({"step": step, "index": i, "child_id": first_id + i,
                             "tokens": list(arch.tokens)})
      if line is None:
        break
      result = ChildResult.from_json(line)
      cache.note(arch.key, first_id + i, result)
      replayed.append(result.to_json())
    for i in range(len(replayed), n):
      hit = cache.lookup(archs[i].key)
      if hit is not None:
        served[str(i)] = hit.to_json()
  shared = group.broadcast_json("replayed", {"replayed": replayed, "served": served})
  results: list[ChildResult | None] = [ChildResult.from_json(r)
                                       for r in shared["replayed"]]
  k = len(results)
  if k == n:
    return results, 0
  results += [None] * (n - k)
  for i, r in shared["served"].items():
    results[int(i)] = ChildResult.from_json(r)
  # With the cache on, a repeat within the step waits for its first copy.
  first_of = {}
  copies: dict[int, list[int]] = {}
  fresh = []
  for i in range(k, n):
    if results[i] is not None:
      continue
    j = first_of.setdefault(archs[i].key, i)
    if j != i and cache.enabled:
      copies.setdefault(j, []).append(i)
    else:
      fresh.append(i)
  written = k

  def flush() -> None:  # Writes the done prefix, in child order.
    nonlocal written
    while written < n and results[written] is not None:
      arch = archs[written]
      if group.is_primary:
        history.append(_history_record(step, written, first_id + written, arch,
                                       depth, results[written],
                                       cache.repeat_of(arch.key, first_id + written)))
      cache.note(arch.key, first_id + written, results[written])
      written += 1

  def record(j: int, result: ChildResult) -> None:
    i = fresh[j]
    results[i] = result
    for c in copies.get(i, ()):
      if result.status == evaluators.OK:
        results[c] = reward_cache.served_copy(result, first_id + i)
    flush()

  evaluated = evaluator.evaluate(
      [archs[i] for i in fresh], [first_id + i for i in fresh],
      should_stop=should_stop, on_result=record) if fresh else []
  for j, result in enumerate(evaluated):
    if results[fresh[j]] is None:
      record(j, result)
  # Copies of a child that failed are trained after all.
  retry = [i for i in range(k, n) if results[i] is None]
  if retry:
    for i, result in zip(retry, evaluator.evaluate(
        [archs[i] for i in retry], [first_id + i for i in retry],
        should_stop=should_stop)):
      results[i] = result
  flush()
  return results, len(evaluated) + len(retry)


def _history_record(step: int, index: int, child_id: int, arch, depth: int | None,
                    result: ChildResult, repeat_of: int | None) -> dict[str, Any]:
  return {"step": step, "index": index, "child_id": child_id, "depth": depth,
          "key": arch.key, "tokens": list(arch.tokens), "repeat_of": repeat_of,
          "architecture": arch.to_json(), **result.to_json()}


def _evaluate(evaluator, arch, child_id: int,
              should_stop: Callable[[], bool]) -> ChildResult:
  """One child; passes `should_stop` to evaluators that accept it."""
  try:
    takes_stop = "should_stop" in inspect.signature(evaluator.evaluate).parameters
  except (TypeError, ValueError):
    takes_stop = False
  if takes_stop:
    return evaluator.evaluate([arch], [child_id], should_stop=should_stop)[0]
  return evaluator.evaluate([arch], [child_id])[0]


def _fmt_minutes(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  return f"{seconds / 60:.1f}m"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the search described by `config` in `workdir`.

  Every check of the config and of the workdir happens before anything is
  written: a bad config leaves the workdir as it was.

  In a multi-process job every process calls it with the same config; only
  process 0 reads and writes the workdir, the others receive its state
  (rlnas.distributed).

  Returns a summary: children done, best reward and architecture, why it stopped.
  """
  # A process that fails tells the others, which would otherwise wait for it.
  with distributed.abort_peers_on_error():
    setup = prepare(config)
    group = distributed.group(config.get("distributed"))
    changed = None
    if group.is_primary:
      if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} exists and is not a directory")
      changed = (checkpointing.check_workdir_config(config, workdir)
                 if os.path.isdir(workdir) else None)
    # From the first write on, SIGTERM/SIGINT only request a stop, honoured at
    # the next safe point (at the latest the next training step of a child).
    with _StopFlag() as stop_flag:
      return _search(config, workdir, setup, changed, stop_flag, group)


def _search(config: ml_collections.ConfigDict, workdir: str, setup: Setup,
            changed: list[str] | None, stop_flag: _StopFlag,
            group: distributed.Group) -> dict[str, Any]:
  """The body of `run`, once config and workdir are checked."""
  primary = group.is_primary
  if primary:
    os.makedirs(workdir, exist_ok=True)
    # The workdir's config.json is the config the run continues with.
    checkpointing.save_config(config, workdir)

  s = config.search
  space, strategy, evaluator = setup.space, setup.strategy, setup.evaluator
  ckpt = checkpointing.Checkpointer(workdir, s.checkpoints_to_keep) if primary else None
  loop = {"step": 0, "children_done": 0, "best_reward": -np.inf,
          "steps_since_improvement": 0, "elapsed_seconds": 0.0,
          "consecutive_failures": 0}
  state = strategy.init_state()
  restored = ckpt.restore(state, loop) if primary else None
  if restored is not None:
    _, state, loop = restored
    logging.info("resuming %s at controller step %d (%d children done)",
                 workdir, loop["step"], loop["children_done"])
  state, loop = group.from_primary(state, loop)

  # Children evaluated after the last checkpoint are replayed, not retrained,
  # unless the config changed (then their results may no longer hold).
  history = records.SearchHistory(
      workdir, loop["step"], loop["children_done"],
      discard_reason=(f"config changed ({', '.join(changed[:5])})"
                      if changed else None)) if primary else records.NoHistory()
  if history.pending:
    logging.info("%d children after the checkpoint will be read back from %s, "
                 "not retrained", len(history.pending), records.HISTORY)
  best = max(history.done, key=lambda r: r["reward"]) if history.done else None
  cache = RewardCache(s.get("reward_cache", False))
  for r in history.done:
    cache.note(r["key"], r["child_id"], ChildResult.from_json(r))

  scalars = records.ScalarWriter(workdir, enabled=s.tensorboard and primary)
  session_start, session_children = time.perf_counter(), 0
  elapsed_before = loop["elapsed_seconds"]
  stop_reason = None
  try:
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
      # Process 0's budgets, or a signal that reached any process.
      stop_reason = group.agree("stop", stop_reason)
      if stop_reason:
        break

      step, first_id = loop["step"], loop["children_done"]
      num = min(s.children_per_step, s.max_children - first_id)
      step_space = space_at(config, space, first_id)
      decisions = step_space.decisions
      depth = getattr(step_space, "num_layers", None)
      tokens = strategy.propose(state, step, num, decisions)
      archs = [step_space.from_tokens(t) for t in tokens]
      results: list[ChildResult] = []
      parallel = getattr(evaluator, "parallel", False)
      # Evaluators that can compile ahead (the layer-wise engine) start on
      # the whole step now.
      if hasattr(evaluator, "prepare"):
        evaluator.prepare([a for a in archs if cache.lookup(a.key) is None])
      if parallel:
        try:
          results, evaluated = _evaluate_in_parallel(
              group, evaluator, history, cache, step, first_id, archs, depth,
              stop_flag.requested)
        except evaluators.Interrupted as e:
          logging.warning("%s", e)
          stop_reason = f"signal_{stop_flag.signal or 'on_another_process'}"
          break
        session_children += evaluated
      # One child at a time (one process, one device, one child per device).
      for i, arch in enumerate(() if parallel else archs):
        record = {"step": step, "index": i, "child_id": first_id + i,
                  "tokens": list(arch.tokens)}
        line = history.replay(record)
        result = None if line is None else ChildResult.from_json(line)
        if result is None:
          if stop_flag.signal:
            break
          result = cache.lookup(arch.key)
          if result is None:
            try:
              result = _evaluate(evaluator, arch, first_id + i, stop_flag.requested)
            except evaluators.Interrupted:
              logging.warning("child %d interrupted; it will be retrained on "
                              "resume", first_id + i)
              break
            session_children += 1
          history.append(_history_record(step, i, first_id + i, arch, depth,
                                         result, cache.repeat_of(arch.key, first_id + i)))
        cache.note(arch.key, first_id + i, result)
        results.append(result)
      if len(results) < num:
        stop_reason = f"signal_{stop_flag.signal}"
        break

      rewards = np.array([r.reward for r in results], np.float32)
      for r in results:
        loop["consecutive_failures"] = (
            loop["consecutive_failures"] + 1 if r.status != evaluators.OK else 0)
      if loop["consecutive_failures"] >= s.max_consecutive_failures:
        # Retried on resume: the cause (memory, data, settings) may be fixed.
        history.drop_last(num, "search aborted after too many failed children; "
                          "this step is retried on resume")
        raise SearchAborted(
            f"{loop['consecutive_failures']} children failed in a row (last: "
            f"{results[-1].error}). That points at the setup (data, learning "
            "rate, memory), not at the architectures: fix it and rerun the "
            f"same command to resume from child {first_id} "
            "(config.search.max_consecutive_failures sets the limit).")
      state, metrics = strategy.update(state, tokens, rewards, decisions)
      state = group.sync_state(state, step)

      step_best = int(np.argmax(rewards))
      if rewards[step_best] > loop["best_reward"]:
        loop["best_reward"] = float(rewards[step_best])
        loop["steps_since_improvement"] = 0
        best = _history_record(step, step_best, first_id + step_best,
                               archs[step_best], depth, results[step_best],
                               cache.repeat_of(archs[step_best].key,
                                               first_id + step_best))
        if primary:
          records.atomic_write_json(os.path.join(workdir, records.BEST), best)
      else:
        loop["steps_since_improvement"] += 1
      loop["step"] += 1
      loop["children_done"] += num
      loop["elapsed_seconds"] = elapsed_before + time.perf_counter() - session_start
      if primary:
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
          **{f"controller/{k}": v for k, v in metrics.items()},
          **getattr(evaluator, "last_scalars", {})})
  except KeyboardInterrupt:
    if not stop_flag.signal:
      raise
    # A second signal: whatever was mid-write is detected on resume.
    stop_reason = f"signal_{stop_flag.signal}_twice"
    group.abort(f"stopped at once by a second {stop_flag.signal}")
  finally:
    history.close()
    scalars.close()
    if ckpt is not None:
      ckpt.close()

  if stop_reason and stop_reason.startswith("signal") and primary:
    logging.warning(
        "stopped by %s: %d children recorded in history.jsonl, %d controller "
        "steps checkpointed. Resume by running the same command again (same "
        "--config and --workdir=%s); recorded children are read back, not "
        "retrained.", stop_flag.signal or "a signal to another process",
        history.lines, loop["step"], workdir)
  summary = {"stop_reason": stop_reason, "children_done": loop["children_done"],
             "controller_steps": loop["step"], "best_reward": loop["best_reward"],
             "best": best, "elapsed_seconds": loop["elapsed_seconds"],
             "children_replayed": history.replayed,
             "children_evaluated": session_children}
  logging.info("search stopped (%s): %d children, best reward %.4f", stop_reason,
               loop["children_done"], loop["best_reward"])
  if best is not None:
    logging.info("best architecture (child %d):\n%s", best["child_id"],
                 best["architecture"]["text"])
  return summary
