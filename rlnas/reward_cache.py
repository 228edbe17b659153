"""Architectures already evaluated: repeat tracking, and an opt-in reward cache.

REINFORCE resamples its favourite architectures late in a search. In the
paper every sampled architecture is a child trained to convergence whose
validation accuracy is the reward (Zoph & Le 2017, sec. 3.2), so a repeat is
a fresh, noisy draw (here also with its own seed). So by default every child
is trained, and the history only marks repeats (`repeat_of`: the first child
with the same architecture). With `config.search.reward_cache = True` a
repeat instead takes the first successful evaluation's result and records
where it came from (`metrics.cached_from`), which saves its training time but
turns the reward of an architecture into a single draw.

Only successful results are served: a child that failed (diverged, ran out of
memory) is trained again when it comes back.
"""

import dataclasses

from rlnas.evaluators import OK, ChildResult

CACHED_FROM = "cached_from"


class RewardCache:
  """First child and first successful result of every architecture key."""

  def __init__(self, enabled: bool):
    self.enabled = bool(enabled)
    self._first: dict[str, int] = {}
    self._results: dict[str, tuple[int, ChildResult]] = {}

  def note(self, key: str, child_id: int, result: ChildResult) -> None:
    """Records a child (evaluated, replayed or cached), in child order."""
    self._first.setdefault(key, child_id)
    if (result.status == OK and key not in self._results
        and CACHED_FROM not in result.metrics):
      self._results[key] = (child_id, result)

  def repeat_of(self, key: str, child_id: int) -> int | None:
    """The first child before `child_id` with this architecture, or None."""
    first = self._first.get(key)
    return first if first is not None and first < child_id else None

  def lookup(self, key: str) -> ChildResult | None:
    """With the cache on, a copy of the architecture's first successful result
    (training times dropped, `cached_from` added); else None."""
    if not self.enabled or key not in self._results:
      return None
    child_id, result = self._results[key]
    return served_copy(result, child_id)


def served_copy(result: ChildResult, child_id: int) -> ChildResult:
  """`result` as served to a repeat of child `child_id`: its training times
  dropped (nothing was trained) and `cached_from` added."""
  metrics = {k: v for k, v in result.metrics.items() if not k.endswith("_seconds")}
  return dataclasses.replace(result, val_accuracies=list(result.val_accuracies),
                             metrics={**metrics, CACHED_FROM: child_id})
