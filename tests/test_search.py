"""Smoke tests (tier 3): the real entry point on tiny configs, resumed once."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, *overrides, config="tests/helpers_tiny.py:real"):
  cmd = [sys.executable, "-m", "rlnas.main", f"--config={config}",
         f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _history(workdir):
  with open(os.path.join(workdir, "history.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_entry_point_runs_stops_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  # The CPU default engine (layer-wise compilation), as the default config uses.
  first = _main(workdir, "--config.search.max_children=2", "--config.search.tensorboard=True",
                "--config.child.engine=layerwise")
  assert first.returncode == 0, first.stderr[-3000:]
  assert len(_history(workdir)) == 2
  assert os.listdir(os.path.join(workdir, "tb"))
  # The second invocation resumes the same run with a larger budget.
  second = _main(workdir, "--config.search.max_children=4", "--config.child.engine=layerwise")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resuming" in second.stderr
  history = _history(workdir)
  assert [(r["step"], r["index"], r["child_id"]) for r in history] == [
      (0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3)]
  for r in history:
    assert r["status"] == "ok", r
    assert len(r["val_accuracies"]) == 1 and 0.0 <= r["reward"] <= 1.0
    assert r["metrics"]["num_params"] > 0 and r["metrics"]["compile_seconds"] > 0
  best = json.load(open(os.path.join(workdir, "best.json")))
  assert best["reward"] == max(r["reward"] for r in history)
  assert best["architecture"]["text"].startswith("L0: conv")
  # Progress lines a person can follow.
  assert "children 4/4" in second.stderr and "children/min" in second.stderr


@pytest.mark.parametrize("strategy", ["random", "evolution"])
def test_control_strategies_share_the_loop(tmp_path, strategy):
  workdir = str(tmp_path / strategy)
  out = _main(workdir, f"--config.search.strategy={strategy}",
              "--config.search.max_children=6", "--config.search.children_per_step=3",
              "--config.evolution.population_size=3", "--config.evolution.sample_size=2",
              config="tests/helpers_tiny.py:toy")
  assert out.returncode == 0, out.stderr[-3000:]
  history = _history(workdir)
  assert len(history) == 6
  assert all(len(r["tokens"]) == len(history[0]["tokens"]) for r in history)
  if strategy == "evolution":
    # Children after the first population differ from some member in exactly
    # one decision (one mutation; Real et al. 2019).
    population = [r["tokens"] for r in history[:3]]
    for r in history[3:]:
      diffs = [sum(a != b for a, b in zip(r["tokens"], p)) for p in population]
      assert min(diffs) == 1, (r["tokens"], population)
