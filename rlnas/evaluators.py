"""Evaluators: the one interface between a search strategy and the children.

An evaluator takes architectures (and their global child ids) and returns one
`ChildResult` each: a reward and metrics. Nothing else crosses the boundary, so
a local child trainer, a multi-device/multi-host evaluator, a tabular benchmark
or a weight-sharing evaluator plug into the same search loop.

A child that cannot be built, diverges, raises or runs out of memory is a
failed child with `config.search.failure_reward`, not a crash: a bad
architecture is data for the controller. Its `error` says why and goes into
the history.

A stop request (SIGTERM/SIGINT) reaches a long child through the optional
`should_stop` keyword of `evaluate`: the evaluator raises `Interrupted` (a
BaseException, so no `except Exception` swallows it) and reports nothing for
that child; the search loop retrains it when it resumes.
"""

import dataclasses
import os
from typing import Any, Callable, Protocol, Sequence

import jax
import ml_collections

from rlnas import child as child_lib
from rlnas import data as data_lib
from rlnas import reinforce
from rlnas.child import layerwise
from rlnas.child import trainer
from rlnas.spaces import base

OK = "ok"
FAILED = "failed"

# Raised by `evaluate` when its `should_stop` returns True.
Interrupted = trainer.ChildInterrupted


@dataclasses.dataclass
class ChildResult:
  """One evaluated child.

  reward: the scalar the strategy optimises.
  status: OK, or FAILED with `error` saying why.
  val_accuracies: per-epoch validation accuracy (fractions), if trained.
  metrics: anything else worth a history column (num_params, train_seconds,
    compile_seconds, ...), JSON-serialisable.
  """
  reward: float
  status: str = OK
  val_accuracies: list[float] = dataclasses.field(default_factory=list)
  metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
  error: str | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, record: dict[str, Any]) -> "ChildResult":
    return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)
                  if f.name in record})


class Evaluator(Protocol):

  def evaluate(self, archs: Sequence[base.Architecture],
               child_ids: Sequence[int]) -> list[ChildResult]:
    """One result per architecture, in order. child_ids seed each child.

    An evaluator whose children take long should also accept a keyword
    `should_stop: Callable[[], bool]`, poll it, and raise `Interrupted` when
    it returns True; the search loop passes it to evaluators that accept it.
    """


def child_rng(seed: int, child_id: int) -> jax.Array:
  """A child's key depends on its identity only, not on where it runs."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 2), child_id)


def failed(reason: str, failure_reward: float, **metrics) -> ChildResult:
  return ChildResult(reward=failure_reward, status=FAILED, error=reason,
                     metrics=metrics)


def describe_exception(e: BaseException) -> str:
  """One line for the history: 'out of memory: ...' or 'raised Type: message'."""
  text = str(e).strip()
  line = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:500]
  if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text:
    return f"out of memory: {line}"
  return f"raised {line}"


class ChildTrainerEvaluator:
  """Trains each child from scratch with the JIT-compiled child trainer."""

  def __init__(self, dataset: data_lib.Dataset, config: ml_collections.ConfigDict):
    self.dataset = dataset
    self.child_cfg = config.child
    self.augment_cfg = config.data.augment
    self.reward_cfg = config.reward
    self.failure_reward = float(config.search.failure_reward)
    self.seed = int(config.seed)

  @property
  def engine(self) -> str:
    """'layerwise' or 'jit': config.child.engine, or by backend when 'auto'.

    On CPU the layer-wise engine compiles each distinct layer once per search
    instead of every child once (bench/child_study.md measures both); on
    GPU/TPU one compiled program per child, with a scanned epoch, is the fast
    path.
    """
    engine = self.child_cfg.get("engine", "auto")
    if engine == "auto":
      return "layerwise" if jax.default_backend() == "cpu" else "jit"
    return engine

  @property
  def children_at_once(self) -> int:
    """Children worth training at once in one process (threads).

    The layer-wise engine runs small single-threaded executables, so on CPU
    one child per core uses the machine (bench/README.md: two children at
    once on 2 cores made a whole default search 1.26x faster with a cold
    compilation cache, 1.58x with a warm one); the whole-child programs of
    the jit engine keep an accelerator busy alone.
    `config.distributed.children_per_device = 0` takes this number.
    """
    if self.engine == "layerwise" and jax.default_backend() == "cpu":
      return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
    return 1

  def prepare(self, archs: Sequence[base.Architecture]) -> None:
    """Starts compiling what a step's children need, in background threads."""
    if self.engine != "layerwise":
      return
    try:
      models = [child_lib.build_model(a, self.dataset.num_classes, self.child_cfg)
                for a in archs]
      layerwise.precompile(models, self.dataset, self.child_cfg)
    except Exception:  # pylint: disable=broad-except
      pass  # each child reports its own failure when it is trained

  def evaluate_one(self, arch: base.Architecture, child_id: int,
                   should_stop: Callable[[], bool] | None = None) -> ChildResult:
    try:
      model = child_lib.build_model(arch, self.dataset.num_classes, self.child_cfg)
      rng = child_rng(self.seed, child_id)
      train = (layerwise.train_and_evaluate if self.engine == "layerwise"
               else trainer.train_and_evaluate)
      result = train(model, self.dataset, self.child_cfg, self.augment_cfg, rng,
                     should_stop=should_stop)
    except trainer.ChildTrainingError as e:
      return failed(f"diverged: {e}", self.failure_reward)
    except trainer.UnbuildableChildError as e:
      return failed(f"unbuildable: {e}", self.failure_reward)
    except Exception as e:  # pylint: disable=broad-except
      # XLA errors, out of memory, shapes no layer accepts: the child failed.
      return failed(describe_exception(e), self.failure_reward)
    return ChildResult(
        reward=reinforce.reward_from_accuracies(result.val_accuracies, self.reward_cfg),
        val_accuracies=[round(a, 6) for a in result.val_accuracies],
        metrics={"num_params": result.num_params,
                 "train_seconds": round(result.train_seconds, 4),
                 "compile_seconds": round(result.compile_seconds, 4),
                 "final_train_loss": round(result.train_losses[-1], 6)})

  def evaluate(self, archs: Sequence[base.Architecture],
               child_ids: Sequence[int], *,
               should_stop: Callable[[], bool] | None = None) -> list[ChildResult]:
    return [self.evaluate_one(a, i, should_stop) for a, i in zip(archs, child_ids)]


_REGISTRY = {}


def register(name: str, factory) -> None:
  """factory(config, space) -> Evaluator."""
  _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
  return ("child_trainer",) + tuple(sorted(_REGISTRY))


def make(config: ml_collections.ConfigDict, space) -> Evaluator:
  """The evaluator named by `config.search.evaluator`."""
  name = config.search.evaluator
  if name == "child_trainer":
    # A space without a child network would fail every child; say so now.
    child_lib.build_model(space.from_tokens([0] * space.num_tokens), 1, config.child)
    return ChildTrainerEvaluator(data_lib.load(config.data), config)
  if name in _REGISTRY:
    return _REGISTRY[name](config, space)
  raise ValueError(f"unknown evaluator {name!r}; known: {', '.join(names())} "
                   "(set config.search.evaluator)")
