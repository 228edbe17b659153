"""REINFORCE with the NAS-RL LSTM controller on the NAS-Bench-201 table.

    python -m rlnas.main --config=configs/nb201_reinforce.py \
        --workdir=/tmp/rlnas_nb201

Expected run time: about a minute on a 2-core CPU (no training: every child
is a table lookup; the time is controller compilation and checkpoints).

The table is the shared CIFAR-10 table (format in rlnas/tabular.py);
point `--config.tabular.table_path` at your own copy. Variants:
`--config.search.strategy=random` or `=evolution` run the other strategies
through the same loop. For statistics over hundreds of seeds use the jitted
runner instead (`python bench/nb201.py`, rlnas/nb201_runner.py), which
reproduces this loop's proposals seed for seed (tests/test_nb201.py).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()

  config.space = ml_collections.ConfigDict()
  # NAS-Bench-201 cell: 6 edges, 5 ops each (Dong & Yang 2020, sec. 2.1).
  config.space.name = "nb201"
  # One controller softmax head per edge. A single head "op" shared by all
  # edges collapses onto repeating one op (bench/nb201_results.md).
  config.space.shared_head = False

  config.tabular = ml_collections.ConfigDict()
  # Benchmark table CSV, relative to the working directory (repository root).
  config.tabular.table_path = "../shared/nasbench/nb201_cifar10.csv"
  # Epochs of training charged per query (NAS-Bench-201 protocol: 12-epoch runs).
  config.tabular.cost_epochs = 12
  # Simulated search budget in seconds (NAS-Bench-201 protocol: 12,000 s on
  # CIFAR-10); the jitted runner enforces it, see rlnas/nb201_runner.py.
  config.tabular.budget_seconds = 12000.0

  # Controller: the NAS-RL LSTM (Zoph & Le 2017, sec. 4.1: 2 x 35, U[-0.08,
  # 0.08]) with NATS-Bench REINFORCE's Adam 0.01 and EMA 0.9. The better recipe
  # found in bench/nb201_results.md (SGD, normalised advantage, no repeated
  # queries) uses options only the jitted runner has so far.
  config.controller.learning_rate = 0.01
  config.controller.baseline_decay = 0.9
  config.controller.entropy_weight = 0.0

  # One architecture per controller update, as the benchmark papers' REINFORCE
  # (NATS-Bench exps/NATS-algos/reinforce.py).
  config.search.children_per_step = 1
  config.search.strategy = "reinforce"
  config.search.evaluator = "tabular"
  # About 50 queries fit the 12,000 s budget; 100 is an upper bound.
  config.search.max_children = 100
  # A lookup cannot fail; a failed child would be a bug.
  config.search.max_consecutive_failures = 1
  return config
