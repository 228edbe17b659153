"""Bad input fails early and clearly, and leaves the workdir as it was.

Tier 3: each mistake a user can make in a config (unknown names, empty choice
lists, non-positive sizes, contradictory settings) or with a workdir (a file,
a run with another config) ends the search before any work with one message
naming the field, exit status 2 (`cli.EXIT_USER_ERROR`), and no change on disk:
a missing workdir is not created, an existing one keeps every byte.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

import helpers_tiny
from rlnas import cli
from rlnas import search


def _set(path, value):
  """A config edit: sets the dotted field `path` to `value`."""
  def edit(config):
    *parents, name = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[name] = value
  return edit


# (id, config kind, edits, text the message must contain)
CASES = [
    ("unknown_space", "toy", [_set("space.name", "nasnet")],
     "unknown search space 'nasnet'"),
    ("unknown_dataset", "real", [_set("data.name", "no_such_dataset")],
     "Unknown dataset 'no_such_dataset'"),
    ("unprepared_tfds_dataset", "real",
     [_set("data.name", "cifar10"), _set("data.data_dir", "/nonexistent/tfds")],
     "data.data_dir='/nonexistent/tfds' does not exist"),
    ("unknown_evaluator", "toy", [_set("search.evaluator", "nb301")],
     "config.search.evaluator='nb301' is unknown"),
    ("unknown_strategy", "toy", [_set("search.strategy", "ppo")],
     "config.search.strategy='ppo' is unknown"),
    ("empty_choice_list", "toy", [_set("space.num_filters", ())],
     "space.num_filters is empty"),
    ("non_positive_choice", "toy", [_set("space.filter_heights", (0, 3))],
     "space.filter_heights must hold positive ints"),
    ("zero_layers", "toy", [_set("space.num_layers", 0)],
     "space.num_layers must be >= 1"),
    ("zero_children_per_step", "toy", [_set("search.children_per_step", 0)],
     "config.search.children_per_step must be >= 1"),
    ("zero_max_children", "toy", [_set("search.max_children", 0)],
     "config.search.max_children must be >= 1"),
    ("zero_checkpoints_kept", "toy", [_set("search.checkpoints_to_keep", 0)],
     "config.search.checkpoints_to_keep must be >= 1"),
    ("zero_failure_limit", "toy", [_set("search.max_consecutive_failures", 0)],
     "config.search.max_consecutive_failures must be >= 1"),
    ("nan_failure_reward", "toy", [_set("search.failure_reward", math.nan)],
     "config.search.failure_reward must be a finite number"),
    ("zero_controller_size", "toy", [_set("controller.hidden_size", 0)],
     "config.controller.hidden_size and num_layers must be >= 1"),
    ("non_positive_controller_lr", "toy", [_set("controller.learning_rate", 0.0)],
     "config.controller.learning_rate must be > 0"),
    ("zero_epochs", "real", [_set("child.epochs", 0)],
     "config.child.epochs must be >= 1"),
    ("zero_batch", "real", [_set("child.batch_size", 0)],
     "config.child.batch_size and eval_batch_size must be >= 1"),
    ("negative_child_lr", "real", [_set("child.learning_rate", -0.1)],
     "config.child.learning_rate must be > 0"),
    ("negative_validation_size", "real", [_set("data.validation_size", -1)],
     "must be >= 0"),
    ("zero_min_spatial_size", "real", [_set("child.min_spatial_size", 0)],
     "config.child.min_spatial_size must be >= 1"),
    ("unknown_optimizer", "real", [_set("child.optimizer", "rmsprop")],
     "config.child.optimizer='rmsprop'"),
    ("unknown_engine", "real", [_set("child.engine", "eager")],
     "config.child.engine='eager'"),
    ("unknown_head", "real", [_set("child.head", "attention")],
     "config.child.head='attention'"),
    ("unknown_reward_aggregate", "real", [_set("reward.aggregate", "mean")],
     "config.reward.aggregate must be 'max' or 'last'"),
    # Contradictions: each value fine alone, not together.
    ("reward_epochs_beyond_training", "real",
     [_set("reward.last_k", 3), _set("child.epochs", 2)],
     "config.reward.last_k=3 exceeds config.child.epochs=2"),
    ("validation_larger_than_dataset", "real", [_set("data.validation_size", 5000)],
     "must be smaller than the 1797 training examples of 'digits'"),
    ("depth_schedule_with_evolution", "toy",
     [_set("search.strategy", "evolution"),
      _set("search.depth_schedule.every_children", 6)],
     "evolution mutates fixed-length token vectors"),
    ("tournament_larger_than_population", "toy",
     [_set("search.strategy", "evolution"), _set("evolution.sample_size", 20)],
     "config.evolution.sample_size=20 exceeds population_size=10"),
    ("depth_schedule_max_below_start", "toy",
     [_set("search.depth_schedule.every_children", 6),
      _set("search.depth_schedule.max_layers", 2)],
     "max_layers must be >= start_layers"),
]


def _snapshot(workdir):
  """{relative path: bytes} of every file under workdir (None if it is absent)."""
  if not os.path.exists(workdir):
    return None
  files = {}
  for directory, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
  """A finished toy search of one step (3 children)."""
  workdir = str(tmp_path_factory.mktemp("existing") / "w")
  config = helpers_tiny.get_config("toy")
  config.search.max_children = 3
  config.toy.delay = 0.0
  search.run(config, workdir)
  return workdir


@pytest.mark.parametrize("kind,edits,message", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_config_fails_before_any_work(tmp_path, capsys, existing_run, kind,
                                          edits, message):
  config = helpers_tiny.get_config(kind)
  for edit in edits:
    edit(config)
  missing = str(tmp_path / "new_workdir")
  assert cli.run_search(config, missing) == cli.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert "error: " in err and message in err, err
  assert not os.path.exists(missing)
  # The same mistake aimed at a workdir holding a run touches none of it.
  before = _snapshot(existing_run)
  assert cli.run_search(config, existing_run) == cli.EXIT_USER_ERROR
  assert message in capsys.readouterr().err
  assert _snapshot(existing_run) == before


def test_workdir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "w"
  path.write_text("notes")
  assert cli.run_search(helpers_tiny.get_config("toy"), str(path)) == 2
  assert "exists and is not a directory" in capsys.readouterr().err
  assert path.read_text() == "notes"


def test_workdir_of_another_config_is_refused_then_overridable(tmp_path, capsys,
                                                               existing_run):
  workdir = str(tmp_path / "w")
  shutil.copytree(existing_run, workdir)
  config = helpers_tiny.get_config("toy")
  config.toy.delay = 0.0
  config.controller.learning_rate = 0.1
  config.search.children_per_step = 2
  config.search.max_children = 5     # a budget: allowed to change
  before = _snapshot(workdir)
  assert cli.run_search(config, workdir) == cli.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert ("controller.learning_rate: workdir has 0.05, config has 0.1" in err
          and "search.children_per_step: workdir has 3, config has 2" in err
          and "search.max_children" not in err
          and "--config.search.allow_config_change=True" in err), err
  assert _snapshot(workdir) == before

  config.search.allow_config_change = True
  summary = search.run(config, workdir)
  assert summary["children_done"] == 5   # 3 before + 2 in one new step
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["controller"]["learning_rate"] == 0.1   # the run's config now


def test_command_line_exit_status_and_message(tmp_path):
  """The real entry point: exit status 2, one 'error:' line, no workdir."""
  workdir = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "rlnas.main", "--config=configs/default.py",
       f"--workdir={workdir}", "--config.search.children_per_step=0"],
      cwd=helpers_tiny.REPO, env=helpers_tiny.subprocess_env(),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-2000:]
  assert "error: config.search.children_per_step must be >= 1" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()
