"""Reads a search's history and says what happened: summary numbers and a plot.

    python -m rlnas.report WORKDIR [WORKDIR ...]    # prints a summary, writes WORKDIR/search.png

The summary answers "did the controller learn?": mean reward of the first and
last quarter of children, best and median child, failures, and the compile /
train time split per child. Several workdirs (e.g. a REINFORCE run and its
random-search control) are plotted on one figure. The plot needs matplotlib
(`pip install 'rlnas[plots]'`); the summary does not.
"""

import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from rlnas import records


def summarize(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Summary numbers of a history (one record per child, in order)."""
  if not history:
    return {"children": 0}
  rewards = np.array([r["reward"] for r in history], np.float64)
  quarter = max(len(rewards) // 4, 1)
  compile_s = [r["metrics"].get("compile_seconds") for r in history]
  train_s = [r["metrics"].get("train_seconds") for r in history]
  compile_s = [x for x in compile_s if x is not None]
  train_s = [x for x in train_s if x is not None]
  best = int(np.argmax(rewards))
  return {
      "children": len(rewards),
      "failed": sum(r.get("status") != "ok" for r in history),
      "first_quarter_mean_reward": float(rewards[:quarter].mean()),
      "last_quarter_mean_reward": float(rewards[-quarter:].mean()),
      "best_reward": float(rewards[best]),
      "median_reward": float(np.median(rewards)),
      "best_child_id": history[best].get("child_id", best),
      "best_val_accuracies": history[best].get("val_accuracies"),
      "distinct_architectures": len({r["key"] for r in history}),
      "mean_compile_seconds": float(np.mean(compile_s)) if compile_s else None,
      "mean_train_seconds": float(np.mean(train_s)) if train_s else None,
  }


def plot(workdirs: Sequence[str], path: str) -> None:
  """Reward per child (dots), running mean and best so far, one colour per run."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for i, workdir in enumerate(workdirs):
    rewards = np.array([r["reward"] for r in records.read_history(workdir)])
    if rewards.size == 0:
      continue
    colour = f"C{i}"
    x = np.arange(1, rewards.size + 1)
    name = os.path.basename(os.path.normpath(workdir))
    window = max(rewards.size // 10, 1)
    running = np.convolve(rewards, np.ones(window) / window, mode="valid")
    ax.scatter(x, rewards, s=8, alpha=0.35, color=colour)
    ax.plot(x[window - 1:], running, color=colour, label=f"{name}: mean of {window}")
    ax.plot(x, np.maximum.accumulate(rewards), color=colour, linestyle="--",
            label=f"{name}: best so far")
  ax.set_xlabel("child")
  ax.set_ylabel("reward")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str]) -> int:
  workdirs = list(argv[1:])
  if not workdirs:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  for workdir in workdirs:
    if not os.path.exists(os.path.join(workdir, records.HISTORY)):
      print(f"error: {workdir} has no {records.HISTORY}; is it a search workdir?",
            file=sys.stderr)
      return 2
    summary = summarize(records.read_history(workdir))
    print(json.dumps({"workdir": workdir, **summary}, indent=2))
  try:
    plot(workdirs, os.path.join(workdirs[0], "search.png"))
    print(f"plot: {os.path.join(workdirs[0], 'search.png')}")
  except ImportError:
    print("no plot: matplotlib is not installed (pip install 'rlnas[plots]')",
          file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
