"""Tabular NAS-Bench-201 benchmark: the table, its CSV format, and lookups.

A tabular benchmark stores the trained accuracy of every architecture of a
space, so "training" a queried architecture is a lookup and a whole search
costs milliseconds (NAS-Bench-201, Dong & Yang 2020, sec. 1). What a query
would have cost in GPU time is charged to a simulated clock instead.

Table format (CSV, one row per cell, header row required; extra columns are
ignored; the shared `nb201_cifar10.csv` is one such file):

| column | required | meaning |
|---|---|---|
| `arch_str` | one of these two | benchmark arch string `\\|op~0\\|+\\|op~0\\|op~1\\|+...` |
| `op_indices` | one of these two | 6 digits, op index per edge (0 none, 1 skip_connect, 2 nor_conv_1x1, 3 nor_conv_3x3, 4 avg_pool_3x3) |
| `cifar10_valid_acc` | yes | reward: validation accuracy in percent |
| `cifar10_test_acc` | yes | reported only: test accuracy in percent |
| `cifar10_epoch_time_s` | yes | seconds per training epoch; a query costs `cost_epochs` of them |
| `nb201_index` | no | the benchmark's own index, kept for cross-reference |

All 15,625 cells must be present exactly once (any row order); rows are
reordered into rlnas's dense index (`rlnas.spaces.nb201.tokens_to_index`).

Converting your own copy of the official benchmark: the official files are
Python pickles, and unpickling runs arbitrary code, so rlnas never opens them.
If you trust your copy, load it with the official API yourself and write the
columns above. A sketch with the NATS-Bench API (topology space, 200-epoch
schedule; check the key names against your API version):

    api = nats_bench.create(path, "tss", fast_mode=True)  # unpickles: your call
    for i in range(len(api)):
      valid = api.get_more_info(i, "cifar10-valid", hp="200")["valid-accuracy"]
      test = api.get_more_info(i, "cifar10", hp="200")["test-accuracy"]
      epoch = api.get_cost_info(i, "cifar10-valid", hp="200")["T-train@epoch"]
      write_row(api.arch(i), i, valid, test, epoch)

then `load_csv` the result. `from_columns` builds a table from arrays directly.

Importing this module registers `TabularEvaluator` as the search loop's
evaluator "tabular" (`config.search.evaluator = "tabular"`, table path in
`config.tabular.table_path`).
"""

import csv
import os
from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rlnas import evaluators
from rlnas.spaces import nb201

# NAS-Bench-201 paper, search experiments (and NATS-Bench's
# `simulate_train_eval(hp="12")`): a query is charged a 12-epoch training run.
DEFAULT_COST_EPOCHS = 12

REQUIRED_COLUMNS = ("cifar10_valid_acc", "cifar10_test_acc",
                    "cifar10_epoch_time_s")


@flax.struct.dataclass
class Table:
  """Per-cell benchmark data in dense index order; a pytree (pass it to jit).

  Attributes:
    valid_acc: float32 [15625], validation accuracy in percent (the reward).
    test_acc: float32 [15625], test accuracy in percent (reported only).
    cost_s: float32 [15625], simulated seconds one query of the cell costs.
    nb201_index: int32 [15625], the benchmark's own index, -1 where unknown.
    reward: float32 [15625], what a search is rewarded with: valid_acc / 100,
      computed once here so every loop sees bit-identical rewards.
  """
  valid_acc: jax.Array
  test_acc: jax.Array
  cost_s: jax.Array
  nb201_index: jax.Array
  reward: jax.Array

  def lookup(self, index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(valid_acc, test_acc, cost_s) of cells `index` (int, any shape)."""
    return self.valid_acc[index], self.test_acc[index], self.cost_s[index]

  def best(self) -> dict[str, float]:
    """Host summary: the validation-best cell and the test optimum."""
    valid = np.asarray(self.valid_acc)
    test = np.asarray(self.test_acc)
    i = int(np.argmax(valid))
    return {"best_valid_index": i, "best_valid_acc": float(valid[i]),
            "test_acc_of_best_valid": float(test[i]),
            "max_test_acc": float(test.max()),
            "arch_str": nb201.tokens_to_str(nb201.index_to_tokens(i))}


def from_columns(tokens: np.ndarray, valid_acc: Sequence[float],
                 test_acc: Sequence[float], epoch_time_s: Sequence[float],
                 nb201_index: Optional[Sequence[int]] = None,
                 cost_epochs: float = DEFAULT_COST_EPOCHS) -> Table:
  """Builds a Table from per-row columns given in any row order.

  Args:
    tokens: int [N, 6], op tokens of each row; N must be 15625 and every cell
      must appear exactly once.
    valid_acc, test_acc, epoch_time_s: [N] floats (percent, percent, seconds).
    nb201_index: optional [N] ints, the benchmark's own index.
    cost_epochs: epochs of training charged per query.
  """
  tokens = np.asarray(tokens, np.int64).reshape(-1, nb201.NUM_EDGES)
  if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= nb201.NUM_OPS:
    raise ValueError("table tokens must lie in [0, 5)")
  index = np.asarray(nb201.tokens_to_index(tokens))
  counts = np.bincount(index, minlength=nb201.NUM_ARCHS)
  if len(index) != nb201.NUM_ARCHS or counts.max() != 1:
    missing = int((counts == 0).sum())
    dup = int((counts > 1).sum())
    raise ValueError(f"table must list each of the {nb201.NUM_ARCHS} cells "
                     f"once; got {len(index)} rows, {missing} cells missing, "
                     f"{dup} repeated")
  columns = {"valid_acc": valid_acc, "test_acc": test_acc,
             "epoch_time_s": epoch_time_s}
  dense = {}
  for name, values in columns.items():
    values = np.asarray(values, np.float64).reshape(-1)
    if values.shape != index.shape:
      raise ValueError(f"{name}: {values.shape[0]} values for {len(index)} rows")
    if not np.all(np.isfinite(values)):
      raise ValueError(f"{name} has non-finite entries (row "
                       f"{int(np.argmin(np.isfinite(values)))})")
    out = np.empty(nb201.NUM_ARCHS, np.float32)
    out[index] = values
    dense[name] = out
  if np.any(dense["epoch_time_s"] <= 0):
    raise ValueError("epoch times must be positive (a free query would let a "
                     "search run forever)")
  official = np.full(nb201.NUM_ARCHS, -1, np.int32)
  if nb201_index is not None:
    official[index] = np.asarray(nb201_index, np.int32).reshape(-1)
  return Table(valid_acc=jnp.asarray(dense["valid_acc"]),
               test_acc=jnp.asarray(dense["test_acc"]),
               cost_s=jnp.asarray(dense["epoch_time_s"] * cost_epochs),
               nb201_index=jnp.asarray(official),
               reward=jnp.asarray(dense["valid_acc"] / np.float32(100)))


def load_csv(path: str, cost_epochs: float = DEFAULT_COST_EPOCHS) -> Table:
  """Reads a table in the format of this module's docstring."""
  path = os.path.expanduser(path)
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if not {"arch_str", "op_indices"} & set(header):
      missing.append("arch_str or op_indices")
    if missing:
      raise ValueError(f"{path}: missing columns {', '.join(missing)}; see "
                       "rlnas/tabular.py for the table format")
    rows = list(reader)
  tokens = []
  for line, row in enumerate(rows, start=2):
    from_str = (nb201.str_to_tokens(row["arch_str"])
                if row.get("arch_str") else None)
    from_digits = (tuple(int(c) for c in row["op_indices"].strip())
                   if row.get("op_indices") else None)
    if from_str and from_digits and from_str != from_digits:
      raise ValueError(f"{path}:{line}: arch_str and op_indices disagree")
    tokens.append(from_str or from_digits)
  official = ([int(r["nb201_index"]) for r in rows]
              if "nb201_index" in header else None)
  return from_columns(
      np.array(tokens),
      [float(r["cifar10_valid_acc"]) for r in rows],
      [float(r["cifar10_test_acc"]) for r in rows],
      [float(r["cifar10_epoch_time_s"]) for r in rows],
      nb201_index=official, cost_epochs=cost_epochs)


def write_csv(table: Table, path: str,
              cost_epochs: float = DEFAULT_COST_EPOCHS) -> None:
  """Writes `table` in the format `load_csv` reads (dense index order)."""
  valid, test, cost, official = (np.asarray(a) for a in (
      table.valid_acc, table.test_acc, table.cost_s, table.nb201_index))
  tokens = np.asarray(nb201.index_to_tokens(np.arange(nb201.NUM_ARCHS)))
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("arch_str", "nb201_index", "op_indices") + REQUIRED_COLUMNS)
    for i in range(nb201.NUM_ARCHS):
      writer.writerow((nb201.tokens_to_str(tokens[i]), int(official[i]),
                       "".join(str(t) for t in tokens[i]), repr(float(valid[i])),
                       repr(float(test[i])), repr(float(cost[i]) / cost_epochs)))


class TabularEvaluator:
  """Evaluator for the ordinary search loop: a table lookup per architecture.

  `evaluate(archs, child_ids)` returns, per cell, reward = valid_acc / 100 and
  metrics {valid_acc, test_acc, cost_s} (percent, percent, simulated seconds
  of the query). The test accuracy is recorded for reporting only; nothing
  feeds it back to the strategy. `cost(arch)` lets a loop check a simulated
  budget before it queries (see `rlnas.nb201_runner` for the protocol).
  """

  def __init__(self, table: Table):
    self.table = table
    self._host = {name: np.asarray(getattr(table, name))
                  for name in ("valid_acc", "test_acc", "cost_s", "reward")}

  @classmethod
  def from_config(cls, config, space) -> "TabularEvaluator":
    """Factory for `rlnas.evaluators.register`: reads `config.tabular`."""
    if getattr(space, "name", None) != nb201.SPACE_NAME:
      raise ValueError(f"the tabular evaluator needs config.space.name="
                       f"{nb201.SPACE_NAME!r}, got {getattr(space, 'name', None)!r}")
    cfg = config.tabular
    if not cfg.table_path or not os.path.exists(os.path.expanduser(cfg.table_path)):
      raise ValueError(f"config.tabular.table_path={cfg.table_path!r} does not "
                       "exist; point it at a table CSV (format: rlnas/tabular.py)")
    return cls(load_csv(cfg.table_path, cost_epochs=cfg.cost_epochs))

  def _index(self, arch) -> int:
    return int(nb201.tokens_to_index(np.asarray(arch.tokens)))

  def cost(self, arch) -> float:
    """Simulated seconds one query of `arch` costs."""
    return float(self._host["cost_s"][self._index(arch)])

  def evaluate(self, archs, child_ids):
    """One ChildResult per architecture; child_ids are unused (no training)."""
    del child_ids
    results = []
    for arch in archs:
      i = self._index(arch)
      results.append(evaluators.ChildResult(
          reward=float(self._host["reward"][i]),
          metrics={"valid_acc": float(self._host["valid_acc"][i]),
                   "test_acc": float(self._host["test_acc"][i]),
                   "cost_s": float(self._host["cost_s"][i]),
                   "table_index": i}))
    return results


EVALUATOR_NAME = "tabular"
evaluators.register(EVALUATOR_NAME, TabularEvaluator.from_config)
