"""Tests for rlnas.retrain: final retraining on digits, and what it refuses.

Tier 3 (smoke): the retraining entry point end to end on digits in a temp
workdir, from a hand-written architecture and from a search's best.json, with a
one-layer space and one or two epochs so each run compiles in seconds. Bad
architecture files are rejected before anything is written.

Run from the repository root (`python -m pytest`), so `configs` imports.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as search_config
from configs import mnist1d as mnist1d_config
from configs import retrain_digits
from configs import retrain_mnist1d
from rlnas import child as child_lib
from rlnas import data as data_lib
from rlnas import retrain
from rlnas import search
from rlnas import spaces
from rlnas.spaces import base
from rlnas.spaces import nasrl_cnn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fast_compile():
  """Tiny children compile in a fraction of the time without XLA passes."""
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def _config(epochs=2, **retrain_overrides):
  """retrain_digits with a one-layer space: tokens [filter_h, filter_w, filters]."""
  config = retrain_digits.get_config()
  config.space.num_layers = 1
  config.child.epochs = epochs
  config.retrain.tensorboard = False
  config.retrain.update(retrain_overrides)
  return config


# One layer, 3x3 conv, 8 filters: indices into (1, 3, 5), (1, 3, 5), (8, 16, 32).
TOKENS = [1, 1, 0]


def _accuracy(config, arch, variables, split):
  """Accuracy of the restored variables on a split [N, 8, 8, 1], recomputed."""
  ds = retrain.load_data(config)
  model = child_lib.build_model(arch, ds.num_classes, config.child)
  x = data_lib.preprocess(getattr(ds, split).images, ds.mean, ds.std)
  logits = model.apply(variables, x, train=False)
  return float(jnp.mean(logits.argmax(-1) == getattr(ds, split).labels))


def test_retrain_digits_from_hand_written_json(tmp_path):
  config = _config(epochs=2)
  workdir = str(tmp_path / "retrain")
  record = {"space": "nasrl_cnn", "tokens": TOKENS}
  out = retrain.retrain(config, json.dumps(record), workdir, source="by hand")

  with open(os.path.join(workdir, retrain.RETRAIN)) as f:
    written = json.load(f)
  assert written == out
  assert written["architecture"]["tokens"] == TOKENS
  assert written["architecture_source"] == "by hand"
  assert written["trained_on"] == "train+validation"
  assert written["evaluated_on"] == "test"
  # digits: 1797 = 300 test + 1497 train+validation (data.get_data_config).
  assert (written["train_examples"], written["test_examples"]) == (1497, 300)
  assert len(written["test_accuracy_per_epoch"]) == 2
  assert len(written["train_loss_per_epoch"]) == 2
  # The reported number is the last epoch's, not the best epoch's.
  assert written["test_accuracy"] == written["test_accuracy_per_epoch"][-1]
  assert 0.0 <= written["test_accuracy"] <= 1.0
  # Nothing named like a validation accuracy without a search to take it from.
  assert not [k for k in written if "val_acc" in k]
  # conv 3x3x1x8 + bias 8, BatchNorm scale/bias 16, dense 8x10 + 10 = 186.
  assert written["num_params"] == 72 + 8 + 16 + 90
  assert os.path.isfile(os.path.join(workdir, retrain.CONFIG_FILE))

  # The checkpoint holds the trained model: it reproduces the test accuracy.
  arch = spaces.make(config.space).from_tokens(TOKENS)
  variables = retrain.restore_variables(workdir)
  assert set(variables) == {"params", "batch_stats"}
  assert _accuracy(config, arch, variables, "test") == pytest.approx(
      written["test_accuracy"], abs=1e-6)

  # A second run never overwrites the result.
  with pytest.raises(search.ConfigError, match="already holds a retrain.json"):
    retrain.retrain(config, record, workdir)


def test_retrain_from_search_best_json_keeps_both_accuracies_apart(tmp_path):
  config = _config(epochs=1)
  space = spaces.make(config.space)
  # What rlnas.search writes to best.json: a history record around to_json().
  best = {"step": 3, "index": 1, "child_id": 25, "depth": 1, "key": "k",
          "tokens": TOKENS, "architecture": space.from_tokens(TOKENS).to_json(),
          "reward": 0.7, "status": "ok", "val_accuracies": [0.8, 0.9],
          "metrics": {}, "error": None}
  path = tmp_path / "best.json"
  path.write_text(json.dumps(best))
  out = retrain.retrain(config, retrain.read_architecture_file(str(path)),
                        str(tmp_path / "retrain"), source=str(path))
  assert out["search_val_accuracy"] == 0.9       # the search child, validation
  assert out["search_reward"] == 0.7
  assert out["search_child_id"] == 25
  assert "test_accuracy" in out                  # the retrained model, test
  assert out["architecture"]["key"] == space.from_tokens(TOKENS).key


def test_depth_scheduled_record_decodes_at_its_recorded_depth():
  space = spaces.make(_config().space)              # num_layers = 1
  deeper = space.with_num_layers(2)
  # Layer 1: anchor bit (reads layer 0) + 3 choices.
  tokens = TOKENS + [1, 2, 2, 2]
  record = {"depth": 2, "architecture": deeper.from_tokens(tokens).to_json()}
  arch = retrain.decode_architecture(space, record)
  assert len(arch.details) == 2 and arch.details[1].inputs == (0,)
  with pytest.raises(base.ArchitectureError, match="expected 3 tokens"):
    retrain.decode_architecture(space, record["architecture"])


def test_evaluate_on_validation_never_loads_test(tmp_path, monkeypatch):
  load = data_lib.load

  def load_without_test(cfg, *, with_test=False):
    assert not with_test, "tuning the retrain config must not read the test set"
    return load(cfg, with_test=with_test)
  monkeypatch.setattr(data_lib, "load", load_without_test)
  out = retrain.retrain(_config(epochs=1, evaluate_on="validation"),
                        {"space": "nasrl_cnn", "tokens": TOKENS},
                        str(tmp_path / "w"))
  assert "test_accuracy" not in out
  assert len(out["retrain_val_accuracy_per_epoch"]) == 1
  assert (out["trained_on"], out["train_examples"], out["validation_examples"]) == (
      "train", 1197, 300)


def test_retraining_data_is_search_train_plus_validation_and_test_is_apart():
  config = retrain_digits.get_config()
  searched = data_lib.load(search_config.get_config().data)
  final = retrain.load_data(config)
  rows = lambda split: {x.tobytes() + bytes([y]) for x, y in
                        zip(split.images, split.labels)}
  assert rows(final.train) == rows(searched.train) | rows(searched.validation)
  assert not rows(final.test) & rows(final.train)
  # Normalisation statistics of the data actually trained on.
  np.testing.assert_allclose(final.mean, final.train.images.mean(), rtol=1e-5)


# ----------------------------------------------------------------------------
# Rejected architectures: a clear ArchitectureError, nothing written.


def _other_space_record():
  """Valid tokens of a space with other filter counts: a different network."""
  other = nasrl_cnn.NASRLCNNSpace(1, (1, 3, 5), (1, 3, 5), (1,), (1,), (24, 36, 48))
  return other.from_tokens(TOKENS).to_json()


BAD_RECORDS = {
    "bad_json": ('{"space": "nasrl_cnn", "tokens": [1, 1', "not valid JSON"),
    "not_an_object": ("[1, 1, 0]", "must be an object"),
    "no_tokens": ({"space": "nasrl_cnn"}, "needs a 'tokens' list"),
    "wrong_space": ({"space": "nb201", "tokens": [0] * 6},
                    "belongs to search space 'nb201'"),
    "wrong_token_count": ({"space": "nasrl_cnn", "tokens": [1, 1, 0, 2]},
                          "expected 3 tokens for this search space, got 4"),
    "token_out_of_range": ({"space": "nasrl_cnn", "tokens": [1, 1, 7]},
                           r"token 7 for decision layer_0/num_filters is outside"),
    "tokens_not_ints": ({"space": "nasrl_cnn", "tokens": [1, "a", 0]},
                        "must be a list of ints"),
    "other_choice_lists": (_other_space_record(), "search space with other choices"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_bad_architecture_rejected_before_any_write(tmp_path, name):
  record, message = BAD_RECORDS[name]
  workdir = tmp_path / "retrain"
  with pytest.raises(base.ArchitectureError, match=message):
    retrain.retrain(_config(), record, str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize("content,message", [
    (None, "cannot read architecture file"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
])
def test_read_architecture_file_errors(tmp_path, content, message):
  path = tmp_path / "arch.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(base.ArchitectureError, match=message):
    retrain.read_architecture_file(str(path))


def _command_line(*args):
  return subprocess.run(
      [sys.executable, "-m", "rlnas.retrain",
       f"--config={REPO}/configs/retrain_digits.py", *args],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"})


def test_command_line_end_to_end(tmp_path):
  arch = tmp_path / "arch.json"
  arch.write_text(json.dumps({"space": "nasrl_cnn", "tokens": TOKENS}))
  workdir = tmp_path / "retrain"
  proc = _command_line("--config.space.num_layers=1", "--config.child.epochs=1",
                       f"--arch={arch}", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads((workdir / retrain.RETRAIN).read_text())
  assert out["architecture_source"] == str(arch)
  assert len(out["test_accuracy_per_epoch"]) == 1
  assert (workdir / retrain.CHECKPOINT).is_dir()


def test_command_line_rejects_bad_file_with_exit_2(tmp_path):
  arch = tmp_path / "arch.json"
  arch.write_text(json.dumps({"space": "nasrl_cnn", "tokens": [0, 1]}))
  workdir = tmp_path / "retrain"
  proc = _command_line(f"--arch={arch}", f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: expected 12 tokens for this search space, got 2" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


# ----------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("retrain_module,search_module", [
    (retrain_digits, search_config), (retrain_mnist1d, mnist1d_config)])
def test_retrain_configs_use_the_search_space_and_split(retrain_module, search_module):
  config, searched = retrain_module.get_config(), search_module.get_config()
  assert config.space.to_dict() == searched.space.to_dict()
  assert config.data.to_dict() == searched.data.to_dict()
  assert config.child.epochs > searched.child.epochs
  retrain.validate(config)


def test_retrain_cifar10_config():
  cifar_search = pytest.importorskip("configs.nasrl_cifar10")
  from configs import retrain_cifar10  # pylint: disable=g-import-not-at-top
  config = retrain_cifar10.get_config()
  assert config.space.to_dict() == cifar_search.get_config().space.to_dict()
  assert config.data.name == "cifar10"
  # Zoph & Le 2017, sec. 4.1.
  assert (config.child.optimizer, config.child.learning_rate,
          config.child.momentum, config.child.nesterov,
          config.child.weight_decay) == ("momentum", 0.1, 0.9, True, 1e-4)
  retrain.validate(config)


def test_mnist1d_search_config_is_1d():
  config = mnist1d_config.get_config()
  search.validate(config)
  space = spaces.make(config.space)
  names = [d.name for d in space.decisions]
  # Heights are fixed at 1: no height decisions, only width, stride, filters.
  assert not [n for n in names if "height" in n]
  # 4 layers x (width, stride width, filters) + anchors 0+1+2+3 = 12 + 6.
  assert space.num_tokens == 18
  assert config.data.name == "mnist1d"
  assert (config.data.augment.random_crop_padding,
          config.data.augment.horizontal_flip) == (0, False)
