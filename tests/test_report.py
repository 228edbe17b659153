"""The history summary and plot (tier 1/3)."""

import json
import os

import pytest

from rlnas import report


def _write_history(workdir, rewards):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "history.jsonl"), "w") as f:
    for i, r in enumerate(rewards):
      f.write(json.dumps({"child_id": i, "key": f"k{i % 3}", "reward": r, "status": "ok",
                          "val_accuracies": [r], "metrics": {
                              "compile_seconds": 1.0, "train_seconds": 0.5}}) + "\n")


def test_summary_numbers(tmp_path):
  rewards = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 0.8]
  _write_history(tmp_path, rewards)
  s = report.summarize([json.loads(l) for l in open(tmp_path / "history.jsonl")])
  # Quarters of 8 children are 2 children: (0.1+0.2)/2 and (0.9+0.8)/2.
  assert s["first_quarter_mean_reward"] == pytest.approx(0.15)
  assert s["last_quarter_mean_reward"] == pytest.approx(0.85)
  assert s["best_reward"] == 0.9 and s["best_child_id"] == 6
  assert s["median_reward"] == pytest.approx(0.45)
  assert s["distinct_architectures"] == 3
  assert s["mean_compile_seconds"] == 1.0


def test_cli_writes_plot_and_rejects_non_workdirs(tmp_path, capsys):
  _write_history(tmp_path / "a", [0.1, 0.5, 0.3, 0.7])
  _write_history(tmp_path / "b", [0.2, 0.2, 0.4, 0.3])
  assert report.main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
  assert os.path.getsize(tmp_path / "a" / "search.png") > 1000
  assert report.main(["report", str(tmp_path / "nothing")]) == 2
  assert "has no history.jsonl" in capsys.readouterr().err
