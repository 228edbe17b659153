"""NAS-Bench-201 benchmark: RS, REA and REINFORCE variants, 500 runs each.

    .venv/bin/python bench/nb201.py                 # results table + plot
    .venv/bin/python bench/nb201.py --tune          # + the tuning ablations

Expected run time: about 2 minutes on a shared 2-core CPU (`--tune` adds
about 10). Writes bench/nb201_results.md and bench/nb201_curves.png.

Protocol (NAS-Bench-201, Dong & Yang 2020, search experiments): CIFAR-10, a simulated
budget of 12,000 s, each query charged 12 epochs of training time; the result
of a run is the test accuracy of the cell with the best validation accuracy
seen. Reward = `cifar10_valid_acc` of the shared table, i.e. 200-epoch
validation accuracy, while the paper rewarded 12-epoch validation accuracy:
ours is a less noisy reward, so the published figures are a reference and the
fair comparison is between methods run here, in the same runner.

Honest tuning: hyperparameters were chosen on mean best *validation* accuracy
over tuning seeds 10000..10999 (`--tune` re-runs those ablations); the
reported rows use seeds 0..499, never used for tuning. Test accuracy is
reported only.
"""

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from rlnas import nb201_runner as runner  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlnas import tabular  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlnas.controller import Controller  # pylint: disable=g-import-not-at-top,wrong-import-position
from rlnas.spaces import nb201  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_TABLE = os.path.join(REPO, "..", "shared", "nasbench",
                             "nb201_cifar10.csv")
REPORT_SEEDS = np.arange(500)
TUNE_SEEDS = np.arange(10000, 11000)

# NAS-Bench-201 paper (CIFAR-10, 500 runs, 12,000 s, 12-epoch reward): mean
# +- std of validation and test accuracy, as quoted in the shared table's
# README; "-" where we do not quote a figure.
PUBLISHED = {
    "REINFORCE": ("91.09 +- 0.37", "93.85 +- 0.37"),
    "RS": ("-", "93.70 +- 0.36"),
    "optimum": ("91.61", "94.37"),
}


# ----------------------------------------------------------------------------
# The methods.


def lstm(shared_head: bool = False, **kw) -> Controller:
  """The NAS-RL controller over the NB201 decisions (Zoph & Le 2017, 2 x 35)."""
  return Controller(nb201.NB201Space(shared_head=shared_head).decisions, **kw)


# Tuned on validation accuracy (seeds 10000..10999); see `ablations`.
TUNED_LOGITS = runner.Reinforce(
    policy=runner.LogitsPolicy(), learning_rate=2.0, baseline_decay=0.5,
    entropy_weight=0.1, optimizer_name="sgd", normalize_advantage=True)
TUNED_LSTM = runner.Reinforce(
    policy=lstm(), learning_rate=1.0, baseline_decay=0.5, entropy_weight=0.1,
    optimizer_name="sgd", normalize_advantage=True)


def methods() -> list[tuple[str, object, str]]:
  """(name, strategy, what it is) of every reported row."""
  paper = runner.Reinforce(learning_rate=0.01, baseline_decay=0.9)
  return [
      ("RS", runner.RandomSearch(), "uniform cells"),
      ("REA", runner.RegularizedEvolution(),
       "P=10, S=3, NATS-Bench mutation (node, then edge)"),
      ("REA, uniform edge", runner.RegularizedEvolution(uniform_edge=True),
       "P=10, S=3, rlnas mutation (edge uniformly)"),
      ("REINFORCE logits, paper", paper,
       "independent logits, Adam 0.01, EMA 0.9 (NATS-Bench settings)"),
      ("REINFORCE LSTM, paper", runner.Reinforce(
          policy=lstm(), learning_rate=0.01, baseline_decay=0.9),
       "Zoph & Le LSTM 2x35, per-edge heads, Adam 0.01, EMA 0.9"),
      ("REINFORCE logits, tuned", TUNED_LOGITS, _describe(TUNED_LOGITS)),
      ("REINFORCE logits, tuned + no repeats",
       runner.NoRepeats(TUNED_LOGITS), "same, never re-queries a cell"),
      ("REINFORCE LSTM, tuned + no repeats", runner.NoRepeats(TUNED_LSTM),
       _describe(TUNED_LSTM) + ", never re-queries a cell"),
      ("REA + no repeats", runner.NoRepeats(runner.RegularizedEvolution()),
       "REA, never re-queries a cell"),
      ("REA greedy (S=10) + no repeats", runner.NoRepeats(
          runner.RegularizedEvolution(sample_size=10, uniform_edge=True)),
       "P=10, S=10 (parent ~ the best member), uniform edge, no repeats"),
  ]


def _describe(s: runner.Reinforce) -> str:
  kind = "logits" if isinstance(s.policy, runner.LogitsPolicy) else "LSTM"
  text = (f"{kind}, {s.optimizer_name} {s.learning_rate:g}, EMA "
          f"{s.baseline_decay:g}, entropy {s.entropy_weight:g}")
  if s.normalize_advantage:
    text += ", normalised advantage"
  if getattr(s.policy, "temperature", 1.0) != 1.0:
    text += f", T={s.policy.temperature:g}"
  return text


# ----------------------------------------------------------------------------
# The reference implementation style: one run at a time, Python + NumPy.


def numpy_reinforce_run(valid, test, cost, reward, seed: int,
                        budget_s: float = runner.DEFAULT_BUDGET_S,
                        learning_rate: float = 0.01,
                        baseline_decay: float = 0.9):
  """REINFORCE with independent logits as a plain loop, one query at a time.

  The same algorithm as `runner.Reinforce(LogitsPolicy())` with the paper's
  settings (Adam as optax's, rlnas's EMA baseline), written the way the
  reference implementations are (NATS-Bench `reinforce.py`): sample, look up,
  update, repeat, in Python. Returns (best valid, its test accuracy, queries).
  """
  rng = np.random.default_rng(seed)
  logits = 1e-3 * rng.standard_normal((nb201.NUM_EDGES, nb201.NUM_OPS))
  m, v = np.zeros_like(logits), np.zeros_like(logits)
  b1, b2, eps = 0.9, 0.999, 1e-8
  baseline, step, spent = 0.0, 0, 0.0
  best_valid, best_test = -np.inf, np.nan
  places = nb201.NUM_OPS ** np.arange(nb201.NUM_EDGES - 1, -1, -1)
  while True:
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    tokens = np.array([rng.choice(nb201.NUM_OPS, p=p) for p in probs])
    index = int(tokens @ places)
    if spent + cost[index] > budget_s:
      break
    spent += cost[index]
    r = float(reward[index])
    if valid[index] > best_valid:
      best_valid, best_test = float(valid[index]), float(test[index])
    b = r if step == 0 else baseline
    # d/dlogits of -(r - b) log p(tokens) = -(r - b) (onehot - probs).
    onehot = np.eye(nb201.NUM_OPS)[tokens]
    grad = -(r - b) * (onehot - probs)
    step += 1
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad ** 2
    m_hat, v_hat = m / (1 - b1 ** step), v / (1 - b2 ** step)
    logits = logits - learning_rate * m_hat / (np.sqrt(v_hat) + eps)
    baseline = baseline_decay * b + (1 - baseline_decay) * r
  return best_valid, best_test, step


# ----------------------------------------------------------------------------
# Measurements.


@dataclasses.dataclass
class Row:
  name: str
  what: str
  valid_mean: float
  valid_std: float
  test_mean: float
  test_std: float
  queries: float
  first_call_s: float
  second_call_s: float
  curve: np.ndarray  # [G] mean best-so-far test accuracy
  curve_ci: np.ndarray  # [G] 95% CI half-width of the mean


def measure(name, strategy, what, table, seeds, grid) -> Row:
  t0 = time.perf_counter()
  out = jax.block_until_ready(runner.run_many(strategy, table, seeds))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(runner.run_many(strategy, table, seeds))
  second = time.perf_counter() - t0
  valid, test = np.asarray(out.best_valid), np.asarray(out.best_test)
  curves = runner.best_so_far_at(out, grid)
  ci = 1.96 * np.nanstd(curves, 0) / np.sqrt(np.sum(~np.isnan(curves), 0))
  row = Row(name, what, valid.mean(), valid.std(), test.mean(), test.std(),
            float(np.mean(out.step)), first, second, np.nanmean(curves, 0), ci)
  print(f"{name:40s} valid {row.valid_mean:.2f} +- {row.valid_std:.2f}  "
        f"test {row.test_mean:.2f} +- {row.test_std:.2f}  queries "
        f"{row.queries:.1f}  [{first:.1f} s first call, {second:.2f} s again]",
        flush=True)
  return row


def speed(table, num_python_runs: int) -> dict[str, float]:
  """The jitted runner vs the Python/NumPy loop on paper-settings REINFORCE."""
  host = {k: np.asarray(getattr(table, k))
          for k in ("valid_acc", "test_acc", "cost_s", "reward")}
  t0 = time.perf_counter()
  py = [numpy_reinforce_run(host["valid_acc"], host["test_acc"],
                            host["cost_s"], host["reward"], seed)
        for seed in range(num_python_runs)]
  python_per_run = (time.perf_counter() - t0) / num_python_runs
  # A fresh strategy object is a fresh compilation: the timing includes it.
  strategy = runner.Reinforce(learning_rate=0.01 + 1e-12, baseline_decay=0.9)
  t0 = time.perf_counter()
  out = jax.block_until_ready(runner.run_many(strategy, table, REPORT_SEEDS))
  jit_with_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(runner.run_many(strategy, table, REPORT_SEEDS))
  jit_warm = time.perf_counter() - t0
  python_500 = python_per_run * len(REPORT_SEEDS)
  return {
      "python_runs": num_python_runs, "python_per_run_s": python_per_run,
      "python_500_s": python_500, "python_test_mean":
          float(np.mean([p[1] for p in py])),
      "jit_500_with_compile_s": jit_with_compile, "jit_500_warm_s": jit_warm,
      "jit_test_mean": float(np.mean(out.best_test)),
      "ratio_with_compile": python_500 / jit_with_compile,
      "break_even_runs": (jit_with_compile - jit_warm) / max(
          python_per_run - jit_warm / len(REPORT_SEEDS), 1e-9),
      "ratio_warm": python_500 / jit_warm}


def ablations(table) -> list[tuple[str, float, float]]:
  """One change at a time, on the tuning seeds: (change, mean valid, test)."""
  base = TUNED_LOGITS
  rep, nr = dataclasses.replace, runner.NoRepeats
  paper = runner.Reinforce(learning_rate=0.01, baseline_decay=0.9)
  cases = [
      ("paper: Adam 0.01, EMA 0.9", paper),
      ("paper, Adam 0.1", rep(paper, learning_rate=0.1)),
      ("paper, Adam 0.3", rep(paper, learning_rate=0.3)),
      ("paper, Adam 1.0", rep(paper, learning_rate=1.0)),
      ("paper, Adam 0.1, EMA 0.5", rep(paper, learning_rate=0.1,
                                       baseline_decay=0.5)),
      ("paper, Adam 0.1, EMA 0.99", rep(paper, learning_rate=0.1,
                                        baseline_decay=0.99)),
      ("paper, Adam 0.1, entropy 0.01", rep(paper, learning_rate=0.1,
                                            entropy_weight=0.01)),
      ("paper, Adam 0.1, T=0.5", rep(paper, learning_rate=0.1,
                                     policy=runner.LogitsPolicy(0.5))),
      ("paper, Adam 0.1, T=2", rep(paper, learning_rate=0.1,
                                   policy=runner.LogitsPolicy(2.0))),
      ("paper, SGD 3 (no normalisation)", rep(paper, learning_rate=3.0,
                                              optimizer_name="sgd")),
      ("paper + no repeats", runner.NoRepeats(paper)),
      ("paper, Adam 0.1 + no repeats", runner.NoRepeats(
          rep(paper, learning_rate=0.1))),
      ("tuned: " + _describe(base) + " + no repeats", nr(base)),
      ("tuned, without no-repeats", base),
      ("tuned, Adam 0.1 instead of SGD 2", nr(rep(base, optimizer_name="adam",
                                                  learning_rate=0.1))),
      ("tuned, no advantage normalisation (SGD 3)", nr(rep(
          base, normalize_advantage=False, learning_rate=3.0))),
      ("tuned, SGD 1", nr(rep(base, learning_rate=1.0))),
      ("tuned, SGD 4", nr(rep(base, learning_rate=4.0))),
      ("tuned, EMA 0.9", nr(rep(base, baseline_decay=0.9))),
      ("tuned, EMA 0.3", nr(rep(base, baseline_decay=0.3))),
      ("tuned, entropy 0", nr(rep(base, entropy_weight=0.0))),
      ("tuned, entropy 0.3", nr(rep(base, entropy_weight=0.3))),
      ("tuned, T=0.5", nr(rep(base, policy=runner.LogitsPolicy(0.5)))),
      ("tuned, T=2", nr(rep(base, policy=runner.LogitsPolicy(2.0)))),
      ("LSTM, paper (Adam 0.01, EMA 0.9), per-edge heads", rep(
          paper, policy=lstm())),
      ("LSTM, paper, one head shared by all edges", rep(paper,
                                                        policy=lstm(True))),
      ("LSTM, Adam 0.03", rep(paper, policy=lstm(), learning_rate=0.03)),
      ("LSTM, tuned recipe (SGD 1) + no repeats", runner.NoRepeats(TUNED_LSTM)),
      ("LSTM, tuned recipe, one shared head + no repeats", runner.NoRepeats(
          rep(TUNED_LSTM, policy=lstm(True)))),
  ]
  out = []
  for name, strategy in cases:
    res = runner.run_many(strategy, table, TUNE_SEEDS)
    v, t = float(np.mean(res.best_valid)), float(np.mean(res.best_test))
    print(f"  tune  {name:55s} valid {v:.3f}  test {t:.3f}", flush=True)
    out.append((name, v, t))
  return out


# ----------------------------------------------------------------------------
# Output.


def plot(rows: list[Row], grid: np.ndarray, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 5))
  for row in rows:
    ax.plot(grid, row.curve, label=row.name, lw=1.5)
    ax.fill_between(grid, row.curve - row.curve_ci, row.curve + row.curve_ci,
                    alpha=0.2)
  ax.axhline(94.37, color="k", ls=":", lw=1, label="optimum (94.37)")
  ax.set_xlabel("simulated search time (s)")
  ax.set_ylabel("test accuracy of best-validation cell so far (%)")
  ax.set_title(f"NAS-Bench-201 CIFAR-10, {len(REPORT_SEEDS)} runs each "
               "(mean, 95% CI band)")
  ax.set_ylim(91.5, 94.5)
  ax.set_xlim(grid[0], grid[-1])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def findings(rows: list[Row], tuned, table) -> list[str]:
  """The conclusions, with this run's numbers filled in."""
  r = {row.name: row for row in rows}
  t = {name: v for name, v, _ in tuned}
  best_rl = max((row for row in rows if row.name.startswith("REINFORCE")),
                key=lambda row: row.valid_mean)
  rea, paper = r["REA"], r["REINFORCE logits, paper"]
  valid, test = np.asarray(table.valid_acc), np.asarray(table.test_acc)
  top50 = float(test[np.argsort(-valid)[:50]].mean())
  out = [
      "## Findings", "",
      f"- **Paper settings: REINFORCE is about random search.** REINFORCE "
      f"with independent logits (Adam 0.01, EMA 0.9) gets test "
      f"{paper.test_mean:.2f}, random search {r['RS'].test_mean:.2f}, REA "
      f"{rea.test_mean:.2f}. With ~45 updates of at most 0.01 per logit the "
      "policy barely moves. (The published REINFORCE figure, 93.85, also "
      "differs in its reward, 12-epoch validation accuracy, and its loop "
      "makes one query past the budget.)",
      f"- **LSTM or independent logits does not matter; the update recipe "
      f"does.** At paper settings the LSTM gets "
      f"{r['REINFORCE LSTM, paper'].test_mean:.2f} vs "
      f"{paper.test_mean:.2f}; with the tuned recipe "
      f"{r['REINFORCE LSTM, tuned + no repeats'].test_mean:.2f} vs "
      f"{r['REINFORCE logits, tuned + no repeats'].test_mean:.2f}.",
      "- **What closed the gap to evolution:** (1) never paying twice for a "
      "cell (`NoRepeats`: draw 32 proposals, query the first unseen one); "
      "(2) a step large enough to matter in ~45 updates, made safe by "
      "normalising the advantage by its running RMS and using plain SGD "
      "(with one sample per update Adam's steps are nearly sign-like); "
      "(3) a short baseline memory (EMA 0.5) and an entropy bonus (0.1)."]
  base = next((k for k in t if k.startswith("tuned:")), None)
  if base is not None:
    deltas = ", ".join(f"{k[len('tuned, '):]} {t[k] - t[base]:+.3f}"
                       for k in t if k.startswith("tuned, "))
    shared_vs_per_edge = (
        t["LSTM, tuned recipe, one shared head + no repeats"]
        - t["LSTM, tuned recipe (SGD 1) + no repeats"])
    out.append(
        f"  One change at a time from the tuned logits recipe (validation, "
        f"tuning seeds; tuned = {t[base]:.3f}): {deltas}. No-repeats alone "
        f"at paper settings: "
        f"{t['paper + no repeats'] - t['paper: Adam 0.01, EMA 0.9']:+.3f}. "
        "For the LSTM, one softmax head shared by all edges vs per-edge heads "
        f"with the tuned recipe: {shared_vs_per_edge:+.3f} valid; on the "
        "planted-optimum table of the learning test in tests/test_nb201.py "
        "the shared head collapsed onto repeating one op in all 8 seeds tried "
        "while per-edge heads learned the optimum in 8 of 8, so the nb201 "
        "config uses per-edge heads.")
  verdict = "reaches" if best_rl.test_mean >= 94.0 else "does not reach"
  greedy = r["REA greedy (S=10) + no repeats"]
  out += [
      f"- **Against REA:** the best REINFORCE ({best_rl.name}: test "
      f"{best_rl.test_mean:.2f} +- {best_rl.test_std:.2f}, valid "
      f"{best_rl.valid_mean:.2f}) is "
      f"{'above' if best_rl.valid_mean > rea.valid_mean else 'not above'} "
      f"REA with NATS-Bench settings (test {rea.test_mean:.2f}, valid "
      f"{rea.valid_mean:.2f}) in the same runner. REA tuned as far (a "
      "tournament as large as the population, i.e. mutate the best recent "
      f"cell, plus no repeats) gets test {greedy.test_mean:.2f}, valid "
      f"{greedy.valid_mean:.2f}: at this budget the winning move is "
      "exploitation around the best cell seen, and either method can be "
      "tuned into it.",
      f"- **The 94.0 target:** the best REINFORCE {verdict} a mean test "
      f"accuracy of 94.0 ({best_rl.test_mean:.2f}). With ~42 queries a mean "
      "of 94.0 needs the returned cell to be, on average, among the ~50 best "
      f"of 15,625 by validation accuracy (those 50 average {top50:.2f} "
      "test).", ""]
  return out


def write_report(path, command, table, rows, spd, tuned, total_s) -> None:
  best = table.best()
  lines = [
      "# NAS-Bench-201 in rlnas: search strategies on the CIFAR-10 table", "",
      f"Made by `{command}` ({datetime.date.today().isoformat()}, "
      f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other "
      f"jobs, jax {jax.__version__}, {total_s:.0f} s in all).", "",
      "Protocol (NAS-Bench-201 search experiments): 12,000 s simulated budget, each query "
      "charged 12 x `cifar10_epoch_time_s`; a run reports the test accuracy "
      "of the cell with the best validation accuracy it saw. A query that "
      "would cross the budget is not made (the reference loops make it and "
      "stop after it). Reward = `cifar10_valid_acc` / 100.", "",
      "**Reward caveat.** The paper rewarded 12-epoch validation accuracy; "
      "this table gives 200-epoch validation accuracy, a less noisy reward. "
      "The published figures are a reference, not a like-for-like target: the "
      "fair comparison is between the methods run here, in the same runner "
      "on the same seeds.", "",
      f"Table facts: best validation {best['best_valid_acc']:.2f} "
      f"({best['arch_str']}, test {best['test_acc_of_best_valid']:.2f}); "
      f"best test {best['max_test_acc']:.2f}.", "",
      f"## Results: {len(REPORT_SEEDS)} runs per method (seeds 0..499)", "",
      "| method | what | valid acc | test acc | queries | 500 runs: first "
      "call (compile) / again |",
      "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r.name} | {r.what} | {r.valid_mean:.2f} +- {r.valid_std:.2f} | "
        f"{r.test_mean:.2f} +- {r.test_std:.2f} | {r.queries:.1f} | "
        f"{r.first_call_s:.1f} s / {r.second_call_s:.2f} s |")
  lines += ["", "Published (NAS-Bench-201 paper, CIFAR-10, 500 runs, 12-epoch "
            "reward):", "", "| method | valid acc | test acc |",
            "|---|---|---|"]
  for name, (v, t) in PUBLISHED.items():
    lines.append(f"| {name} (paper) | {v} | {t} |")
  lines += [
      "", "Standard error of a mean over 500 runs is about 0.02 (std / "
      "sqrt(500)); differences below ~0.05 are noise.", "",
      "![best-so-far test accuracy](nb201_curves.png)", "",
      "## Speed: one jitted call vs the reference-style Python loop", "",
      "REINFORCE with independent logits, paper settings, 500 runs to the "
      "12,000 s budget, both in this process:", "",
      f"- Python/NumPy loop (`numpy_reinforce_run`, one run at a time): "
      f"{spd['python_per_run_s'] * 1e3:.1f} ms per run, measured over "
      f"{spd['python_runs']} runs -> {spd['python_500_s']:.1f} s for 500 "
      f"(mean test {spd['python_test_mean']:.2f} over its runs).",
      f"- rlnas jitted runner, 500 runs in one call: "
      f"{spd['jit_500_with_compile_s']:.2f} s including compilation, "
      f"{spd['jit_500_warm_s']:.3f} s compiled (mean test "
      f"{spd['jit_test_mean']:.2f}).",
      f"- **Speed-up: {spd['ratio_warm']:.0f}x compiled; "
      f"{spd['ratio_with_compile']:.2f}x including compilation.** XLA's "
      "compile is paid once per strategy configuration; against the NumPy "
      "loop it pays off from about "
      f"{spd['break_even_runs']:.0f} runs of one configuration on.", ""]
  lines += findings(rows, tuned, table)
  if tuned:
    lines += ["## Tuning: one change at a time (seeds 10000..10999, 1000 "
              "runs each; chosen on validation)", "",
              "| setting | valid acc | (test acc) |", "|---|---|---|"]
    lines += [f"| {n} | {v:.3f} | {t:.3f} |" for n, v, t in tuned]
    lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--table", default=DEFAULT_TABLE, help="table CSV")
  parser.add_argument("--out", default=os.path.join(REPO, "bench"),
                      help="directory for nb201_results.md / nb201_curves.png")
  parser.add_argument("--tune", action="store_true",
                      help="also run the tuning ablations (tuning seeds)")
  parser.add_argument("--python_runs", type=int, default=50,
                      help="runs of the Python loop to time (extrapolated)")
  args = parser.parse_args(argv)
  command = "python bench/nb201.py" + (" --tune" if args.tune else "")
  start = time.perf_counter()
  table = tabular.load_csv(args.table)
  print("Reward: 200-epoch validation accuracy from the table; the paper "
        "rewarded 12-epoch validation accuracy (noisier), so its figures are "
        "a reference and the fair comparison is between rows of this run.")
  grid = np.linspace(0, runner.DEFAULT_BUDGET_S, 241)
  print("speed: Python loop vs jitted runner ...", flush=True)
  spd = speed(table, args.python_runs)
  print({k: round(v, 4) for k, v in spd.items()}, flush=True)
  rows = [measure(n, s, w, table, REPORT_SEEDS, grid) for n, s, w in methods()]
  tuned = ablations(table) if args.tune else []
  os.makedirs(args.out, exist_ok=True)
  plot([r for r in rows if r.name in PLOTTED], grid,
       os.path.join(args.out, "nb201_curves.png"))
  write_report(os.path.join(args.out, "nb201_results.md"), command, table,
               rows, spd, tuned, time.perf_counter() - start)
  print(f"wrote {args.out}/nb201_results.md and nb201_curves.png "
        f"({time.perf_counter() - start:.0f} s)")


PLOTTED = ("RS", "REA", "REINFORCE logits, paper", "REINFORCE LSTM, paper",
           "REINFORCE logits, tuned + no repeats",
           "REINFORCE LSTM, tuned + no repeats",
           "REA greedy (S=10) + no repeats")

if __name__ == "__main__":
  main()
