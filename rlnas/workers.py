"""Children over workers: every process, local device and child-per-device slot.

`wrap(evaluator, config)` turns an evaluator of one child at a time into one
that evaluates a controller step's children at once: over the processes of a
multi-process job (rlnas.distributed), over each process's local devices, and
over `config.distributed.children_per_device` threads per device (auto: one
per CPU core for the layer-wise child trainer). Children go through one
shared queue, so cheap and expensive children even out; results come back in
child order on every process, through the bounded key-value collectives of
`distributed.Group` (in a one-process job, an in-memory store).

`SyntheticEvaluator` ("synthetic") is a stand-in child with a known reward and
duration, for tests and benchmarks of this machinery (bench/scaleout.py).
"""

import dataclasses
import inspect
import json
import threading
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from rlnas import distributed
from rlnas import evaluators
from rlnas.distributed import DistributedError, Group
from rlnas.evaluators import ChildResult

_STOP_POLL_SECONDS = 1.0   # how often a training child checks for a peer's stop


@dataclasses.dataclass
class _Worker:
  """One local device slot and what it did in the current step."""
  name: str                 # e.g. "p1/cpu:0", or "p1/gpu:3/1" with 2 children per device
  device: Any
  device_name: str
  children: list[int] = dataclasses.field(default_factory=list)
  busy: float = 0.0         # seconds spent in children
  done_at: float = 0.0      # seconds after the step's start when it found no more work


def _device_name(device) -> str:
  return f"{device.platform}:{device.id}"


def _accepts_should_stop(evaluator) -> bool:
  try:
    return "should_stop" in inspect.signature(evaluator.evaluate).parameters
  except (TypeError, ValueError):
    return False


class _StopCheck:
  """`should_stop` of a child: this process's stop request, or a peer's.

  A local request is published at once; a peer's is polled at most once per
  `_STOP_POLL_SECONDS`, since the child polls on every training step.
  """

  def __init__(self, g: Group, key: str, local: Callable[[], bool] | None):
    self._group, self._key, self._local = g, key, local
    self._stopped = False
    self._next_poll = 0.0

  def request(self) -> None:
    self._stopped = True
    self._group.put(self._key, str(self._group.process_index).encode())

  def __call__(self) -> bool:
    if self._stopped:
      return True
    if self._local is not None and self._local():
      self.request()
      return True
    now = time.monotonic()
    if now >= self._next_poll:
      self._next_poll = now + _STOP_POLL_SECONDS
      self._stopped = (self._group.peek(self._key) is not None
                       or self._group.aborted())
    return self._stopped


_INTERRUPTED = json.dumps({"interrupted": True}).encode()


class DistributedEvaluator:
  """Evaluates a controller step's children over all processes and local devices.

  Every process calls `evaluate` with the same architectures. Children go
  through one shared queue (a counter in the KV store): each worker (one per
  local device, or `children_per_device` per device) takes the next child
  when it is free, so cheap and expensive children even out and M need not
  be divisible by the number of workers. Each result, with `process`,
  `device` and `worker_seconds` added to its metrics, is published as soon as
  it is done; every process reads all results back in child order.
  """
  # The search loop hands it a whole step at once (not one child at a time).
  parallel = True

  def __init__(self, base: evaluators.Evaluator, g: Group,
               devices: Sequence[Any] | None = None, children_per_device: int = 1,
               failure_reward: float = 0.0):
    self.base = base
    self.group = g
    self.failure_reward = float(failure_reward)
    devices = list(devices if devices is not None else jax.local_devices())
    p = g.process_index
    self.workers = [
        _Worker(f"p{p}/{_device_name(d)}" + (f"/{s}" if children_per_device > 1 else ""),
                d, _device_name(d))
        for d in devices for s in range(children_per_device)]
    self._takes_stop = _accepts_should_stop(base)
    # Since the start, per worker name: [children, busy seconds, step seconds].
    self.totals: dict[str, list[float]] = {}
    self.last_scalars: dict[str, float] = {}

  def prepare(self, archs: Sequence[Any]) -> None:
    """Lets the base evaluator start compiling a step's children ahead."""
    if hasattr(self.base, "prepare"):
      self.base.prepare(archs)

  def evaluate(self, archs: Sequence[Any], child_ids: Sequence[int], *,
               should_stop: Callable[[], bool] | None = None,
               on_result: Callable[[int, ChildResult], None] | None = None
               ) -> list[ChildResult]:
    """One result per architecture, in order, on every process.

    Args:
      archs: the step's architectures (the same on every process).
      child_ids: their global ids (seed each child).
      should_stop: this process's stop request (SIGTERM/SIGINT).
      on_result: called as on_result(i, result) in index order, as soon as
        child i and all before it are done (process 0 appends it to the
        history); not called for children after an interrupted one.

    Raises:
      evaluators.Interrupted: a stop request reached any process; every
        process raises it after the children in flight have stopped.
      distributed.PeerFailed, DistributedError: see rlnas.distributed.
    """
    g, n = self.group, len(archs)
    prefix = g.begin("evaluate")
    start = time.monotonic()
    errors: list[BaseException] = []
    for w in self.workers:
      w.children, w.busy, w.done_at = [], 0.0, 0.0
    threads = [threading.Thread(
        target=self._work, args=(w, prefix, archs, child_ids, should_stop, errors, start),
        name=f"rlnas-{w.name}", daemon=True) for w in self.workers]
    for t in threads:
      t.start()

    def check_workers():
      if errors:
        raise DistributedError(
            f"a worker thread of process {g.process_index} crashed: "
            f"{type(errors[0]).__name__}: {errors[0]}") from errors[0]

    results: list[ChildResult | None] = [None] * n
    first_interrupted = None
    for i in range(n):
      record = json.loads(g.wait(f"{prefix}/result/{i}",
                                 f"the result of child {child_ids[i]}", check_workers))
      if record.get("interrupted"):
        first_interrupted = i if first_interrupted is None else first_interrupted
        continue
      results[i] = ChildResult.from_json(record)
      if first_interrupted is None and on_result is not None:
        on_result(i, results[i])
    step_seconds = time.monotonic() - start
    for t in threads:
      t.join()
    check_workers()
    self._report(step_seconds, n)
    g.end(prefix)
    if first_interrupted is not None:
      raise evaluators.Interrupted(
          f"stop requested; children {child_ids[first_interrupted]} and later "
          "are retrained on resume")
    return results

  def _evaluate_one(self, arch, child_id: int, stop: _StopCheck) -> ChildResult:
    try:
      if self._takes_stop:
        return self.base.evaluate([arch], [child_id], should_stop=stop)[0]
      return self.base.evaluate([arch], [child_id])[0]
    except evaluators.Interrupted:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # The base evaluator should have turned this into a failed child itself.
      return evaluators.failed(evaluators.describe_exception(e), self.failure_reward)

  def _work(self, w: _Worker, prefix: str, archs, child_ids, should_stop,
            errors: list[BaseException], start: float) -> None:
    """One worker: take the next child from the queue until there is none."""
    g = self.group
    stop = _StopCheck(g, f"{prefix}/stop", should_stop)
    try:
      while True:
        i = g.increment(f"{prefix}/queue") - 1
        if i >= len(archs):
          break
        if stop():  # drain the queue: every child gets exactly one answer
          g.put(f"{prefix}/result/{i}", _INTERRUPTED)
          continue
        t0 = time.perf_counter()
        try:
          with jax.default_device(w.device):
            result = self._evaluate_one(archs[i], child_ids[i], stop)
        except evaluators.Interrupted:
          stop.request()
          g.put(f"{prefix}/result/{i}", _INTERRUPTED)
          continue
        seconds = time.perf_counter() - t0
        result.metrics = {**result.metrics, "process": g.process_index,
                          "device": w.device_name, "worker_seconds": round(seconds, 4)}
        w.children.append(int(child_ids[i]))
        w.busy += seconds
        g.put(f"{prefix}/result/{i}", json.dumps(result.to_json()).encode())
        logging.info("child %d on %s: reward %.4f%s in %.1f s", child_ids[i], w.name,
                     result.reward, "" if result.status == evaluators.OK
                     else f" ({result.status}: {result.error})", seconds)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)
    finally:
      w.done_at = time.monotonic() - start

  def _report(self, step_seconds: float, n: int) -> None:
    """Gathers every worker's step; logs who did what and who waited."""
    mine = [{"name": w.name, "children": w.children, "busy": w.busy,
             "idle": max(step_seconds - w.done_at, 0.0), "seconds": step_seconds}
            for w in self.workers]
    workers = [w for p in self.group.all_gather_json("worker_stats", mine) for w in p]
    for w in workers:
      total = self.totals.setdefault(w["name"], [0, 0.0, 0.0])
      total[0] += len(w["children"])
      total[1] += w["busy"]
      total[2] += w["seconds"]
    idle = sum(w["idle"] for w in workers)
    capacity = sum(w["seconds"] for w in workers)
    self.last_scalars = {
        "workers/children_per_minute": 60 * n / max(step_seconds, 1e-9),
        "workers/straggler_idle_seconds": idle,
        "workers/idle_fraction": 1 - sum(w["busy"] for w in workers) / max(capacity, 1e-9),
        **{f"workers/{name.replace('/', '_').replace(':', '')}/children_per_minute":
           60 * t[0] / max(t[2], 1e-9) for name, t in self.totals.items()}}
    if self.group.is_primary:
      logging.info(
          "%d children in %.1f s on %d workers (idle %.0f%%, %.1f s waiting for "
          "stragglers): %s", n, step_seconds, len(workers),
          100 * self.last_scalars["workers/idle_fraction"], idle,
          "; ".join(f"{w['name']} children {','.join(map(str, w['children'])) or '-'} "
                    f"busy {w['busy']:.1f}s idle {w['idle']:.1f}s, "
                    f"{60 * self.totals[w['name']][0] / max(self.totals[w['name']][2], 1e-9):.1f}"
                    "/min overall" for w in workers))


def wrap(evaluator: evaluators.Evaluator,
         config: ml_collections.ConfigDict) -> evaluators.Evaluator:
  """`evaluator` spread over every process and local device, if there are several.

  `config.distributed.children_per_device = 0` (auto) takes the evaluator's
  `children_at_once` when the job is a single process (the child trainer
  suggests one child per CPU core on CPU), else 1. One process with one
  device and one child per device gets `evaluator` back unchanged: the search
  then evaluates child by child.
  """
  cfg = config.get("distributed")
  per_device = int(distributed.setting(cfg, "children_per_device"))
  if per_device < 0:
    raise ValueError("config.distributed.children_per_device must be >= 0 (0 = auto)")
  g = Group(cfg)
  if per_device == 0:
    per_device = (int(getattr(evaluator, "children_at_once", 1))
                  if g.process_count == 1 else 1)
  devices = jax.local_devices()
  if g.process_count == 1 and len(devices) * per_device == 1:
    return evaluator
  logging.info("children spread over %d processes x %d local devices x %d per device",
               g.process_count, len(devices), per_device)
  return DistributedEvaluator(evaluator, g, devices, per_device,
                              failure_reward=config.search.failure_reward)


# ---------------------------------------------------------------------------
# A stand-in child for tests and benchmarks of this machinery.


class SyntheticEvaluator:
  """`config.search.evaluator = "synthetic"`: no training, a known reward and duration.

  reward = 0.8 * (fraction of tokens equal to 0) + 0.2 * u, where u ~ U[0, 1)
  is drawn on the current default device from the child's key, so the best
  architecture is all zeros and the reward depends on the child's identity
  only. Each child takes `config.synthetic.seconds * (1 + spread * v)`
  (v ~ U[0, 1) from the same key) of sleep, polling `should_stop`. Every
  `fail_every`-th child (by id) is a failed child. `metrics.computed_on`
  names the device that drew u.
  """

  def __init__(self, config: ml_collections.ConfigDict, space):
    del space
    cfg = config.get("synthetic") or ml_collections.ConfigDict()
    self.seconds = float(cfg.get("seconds", 0.0))
    self.spread = float(cfg.get("spread", 0.0))
    self.fail_every = int(cfg.get("fail_every", 0))
    self.seed = int(config.seed)
    self.failure_reward = float(config.search.failure_reward)

  def evaluate(self, archs, child_ids, *,
               should_stop: Callable[[], bool] | None = None) -> list[ChildResult]:
    return [self._one(a, i, should_stop) for a, i in zip(archs, child_ids)]

  def _one(self, arch, child_id: int, should_stop) -> ChildResult:
    draws = jax.random.uniform(evaluators.child_rng(self.seed, child_id), (2,))
    device = next(iter(draws.devices()))
    u, v = (float(x) for x in np.asarray(draws))
    end = time.perf_counter() + self.seconds * (1 + self.spread * v)
    while (left := end - time.perf_counter()) > 0:
      if should_stop is not None and should_stop():
        raise evaluators.Interrupted("stop requested")
      time.sleep(min(left, 0.02))
    if self.fail_every and child_id % self.fail_every == self.fail_every - 1:
      return evaluators.failed(f"synthetic failure of child {child_id}",
                               self.failure_reward)
    tokens = np.asarray(arch.tokens)
    return ChildResult(reward=float(0.8 * np.mean(tokens == 0) + 0.2 * u),
                       metrics={"computed_on": _device_name(device)})


evaluators.register("synthetic", SyntheticEvaluator)
