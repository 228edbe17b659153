"""The opt-in reward cache and repeat tracking (tiers 1-3).

Off (the paper's setting), every sampled child is trained and repeats are only
marked (`repeat_of`); on, a repeat takes the first successful result of its
architecture (`metrics.cached_from`), on one process or many, and on resume.
"""

import json
from typing import Any

import pytest

import helpers_tiny
from helpers_tiny import ToyEvaluator
from rlnas import evaluators
from rlnas import search
from rlnas.evaluators import ChildResult
from rlnas.reward_cache import RewardCache


def test_serves_the_first_successful_result_only_when_on():
  cache = RewardCache(enabled=True)
  cache.note("a", 0, evaluators.failed("diverged", 0.0))
  assert cache.lookup("a") is None and cache.repeat_of("a", 3) == 0
  cache.note("a", 3, ChildResult(0.5, val_accuracies=[0.7, 0.8],
                                 metrics={"num_params": 9, "train_seconds": 1.0}))
  cache.note("a", 5, ChildResult(0.9))  # Later draws do not replace the first.
  hit = cache.lookup("a")
  assert hit.reward == 0.5 and hit.val_accuracies == [0.7, 0.8]
  assert hit.metrics == {"num_params": 9, "cached_from": 3}
  assert cache.repeat_of("a", 6) == 0 and cache.repeat_of("b", 6) is None
  assert cache.repeat_of("a", 0) is None  # A child is not a repeat of itself.
  # A served result never becomes a source itself.
  other = RewardCache(enabled=True)
  other.note("a", 7, hit)
  assert other.lookup("a") is None
  off = RewardCache(enabled=False)
  off.note("a", 0, ChildResult(0.5))
  assert off.lookup("a") is None and off.repeat_of("a", 1) == 0


def _config(reward_cache: bool, max_children: int = 12):
  config = helpers_tiny.get_config("toy")
  # 4 architectures (2 x 2 choices, no anchors after one layer): repeats are certain.
  sp = config.space
  sp.num_layers = 1
  sp.filter_heights, sp.filter_widths, sp.num_filters = (1, 3), (1, 5), (8,)
  config.toy.delay = 0.0
  config.search.max_children = max_children
  config.search.reward_cache = reward_cache
  return config


def _history(workdir) -> list[dict[str, Any]]:
  return [r for r in helpers_tiny.comparable_history(workdir)]


def _check_repeats(history, served: bool):
  first = {}
  for r in history:
    assert r["repeat_of"] == first.get(r["key"]), r
    first.setdefault(r["key"], r["child_id"])
    source = r["metrics"].get("cached_from")
    if served and r["repeat_of"] is not None and source is None:
      # Trained again only because no earlier copy succeeded.
      assert all(h["status"] != "ok" for h in history[:r["child_id"]]
                 if h["key"] == r["key"]), r
    if source is not None:
      assert served
      assert r["reward"] == history[source]["reward"]
      assert r["val_accuracies"] == history[source]["val_accuracies"]
      assert "cached_from" not in history[source]["metrics"]


@pytest.mark.parametrize("reward_cache", [False, True])
def test_repeats_are_marked_and_served_only_with_the_cache(tmp_path, reward_cache):
  ToyEvaluator.calls.clear()
  search.run(_config(reward_cache), str(tmp_path / "w"))
  history = _history(tmp_path / "w")
  assert len(history) == 12
  repeats = [r for r in history if r["repeat_of"] is not None]
  assert len(repeats) >= 8  # 12 children of 4 architectures.
  _check_repeats(history, served=reward_cache)
  # best.json is that child's history line.
  best = helpers_tiny.without_timing(json.load(open(tmp_path / "w" / "best.json")))
  assert best == history[best["child_id"]]
  served = [r for r in history if "cached_from" in r["metrics"]]
  if reward_cache:
    assert served
    assert sorted(ToyEvaluator.calls) == sorted(
        r["child_id"] for r in history if "cached_from" not in r["metrics"])
  else:
    assert not served and sorted(ToyEvaluator.calls) == list(range(12))


def test_a_resumed_search_serves_what_the_first_run_trained(tmp_path):
  workdir = str(tmp_path / "w")
  search.run(_config(True, max_children=6), workdir)
  ToyEvaluator.calls.clear()
  search.run(_config(True, max_children=12), workdir)
  history = _history(workdir)
  assert len(history) == 12
  _check_repeats(history, served=True)
  trained_before = {r["key"] for r in history[:6]
                    if r["status"] == "ok" and "cached_from" not in r["metrics"]}
  for r in history[6:]:
    if r["key"] in trained_before:
      assert r["child_id"] not in ToyEvaluator.calls
      assert r["metrics"]["cached_from"] < 6


class _Group:
  """One process standing in for a multi-process group."""
  is_primary = True

  def broadcast_json(self, name, obj):
    del name
    return obj


class _History:
  def __init__(self):
    self.lines = []

  def replay(self, record):
    del record
    return None

  def append(self, record):
    self.lines.append(record)


class _Arch:
  def __init__(self, key):
    self.key, self.tokens = key, [ord(c) for c in key]

  def to_json(self):
    return {"text": self.key}


class _ParallelEvaluator:
  """Finishes children out of order, reports them in order, fails 'bad' once."""
  parallel = True

  def __init__(self):
    self.calls = []

  def evaluate(self, archs, child_ids, *, should_stop=None, on_result=None):
    del should_stop
    self.calls.append(list(child_ids))
    results = [evaluators.failed("boom", 0.0) if a.key == "bad" and len(self.calls) == 1
               else ChildResult(reward=float(i)) for a, i in zip(archs, child_ids)]
    if on_result is not None:
      for j, r in enumerate(results):
        on_result(j, r)
    return results


def test_the_parallel_path_evaluates_a_repeat_within_a_step_once():
  cache = RewardCache(enabled=True)
  cache.note("old", 0, ChildResult(0.25))
  history, evaluator = _History(), _ParallelEvaluator()
  keys = ["x", "old", "x", "bad", "y", "bad"]
  results, evaluated = search._evaluate_in_parallel(  # pylint: disable=protected-access
      _Group(), evaluator, history, cache, 1, 10, [_Arch(k) for k in keys], 1,
      lambda: False)
  # Served: "old" (an earlier step) and the second "x"; the second "bad"
  # is trained after its first copy failed.
  assert evaluator.calls == [[10, 13, 14], [15]]
  assert evaluated == 4
  assert [r.reward for r in results] == [10.0, 0.25, 10.0, 0.0, 14.0, 15.0]
  assert [line["child_id"] for line in history.lines] == list(range(10, 16))
  assert [line["repeat_of"] for line in history.lines] == [None, 0, 10, None, None, 13]
  assert [line["metrics"].get("cached_from") for line in history.lines] == [
      None, 0, 10, None, None, None]
