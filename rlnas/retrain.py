"""Final retraining: train a found architecture from scratch and report test accuracy.

    python -m rlnas.retrain --config=configs/retrain_digits.py \
        --arch=SEARCH_WORKDIR/best.json --workdir=/tmp/rlnas_retrain

A search ranks children by their accuracy on the *validation* split after a
short training run; that number is a reward, not a result. The result is what
this module reports: the architecture trained from scratch, with its own
(longer) schedule, on train + validation, and evaluated once per epoch on the
*test* split, which no search ever loads. Zoph & Le 2017, sec. 4.1: "After the
controller trains 12,800 architectures, we find the architecture that achieves
the best validation accuracy. [...] The best model [...] is then run until
convergence and we then compute the test accuracy of such model."

The two numbers carry different names everywhere (`retrain.json`, logs,
TensorBoard): `search_val_accuracy` is the search child's validation accuracy,
`test_accuracy` the retrained model's test accuracy after its last epoch. The
reported test accuracy is the last epoch's, never the best epoch's: picking an
epoch by test accuracy would be model selection on the test set.

To tune the retraining schedule itself (the paper's small grid search over
learning rate and weight decay), set `config.retrain.evaluate_on="validation"`:
the model then trains on train only and reports `retrain_val_accuracy`, and the
test split stays unread.

Outputs in WORKDIR: `retrain.json` (written atomically at the end),
`retrain_config.json`, `checkpoint/` (Orbax: the trained `params` and
`batch_stats`; read them back with `restore_variables`) and `tb/` scalars.
Single process; an existing `retrain.json` is never overwritten.
"""

import copy
import json
import os
import sys
import time
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import orbax.checkpoint as ocp

from rlnas import child as child_lib
from rlnas import cli
from rlnas import data as data_lib
from rlnas import records
from rlnas import search
from rlnas import spaces
from rlnas.child import trainer
from rlnas.spaces import base

RETRAIN = "retrain.json"
CONFIG_FILE = "retrain_config.json"
CHECKPOINT = "checkpoint"
EVALUATE_ON = ("test", "validation")
# RNG stream of the retrained model: fold_in(PRNGKey(seed), 3), apart from the
# streams a search folds in (2 = children), so a retrained model never shares
# its initialisation with the search child it came from by accident.
_RNG_STREAM = 3


def config_from_search(search: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A retrain config that inherits what must match the search it belongs to.

  seed (initialisation, data order, augmentation), data (the same dataset and
  split permutation; retraining adds the validation examples to training),
  space (tokens index its choice lists, so it must not change) and child (the
  network and optimizer, which retrain configs lengthen), plus `retrain`.
  """
  config = ml_collections.ConfigDict()
  config.seed = search.seed
  config.data = search.data
  config.space = search.space
  config.child = search.child
  config.retrain = get_retrain_config()
  # Flax/Keras default; a long run has time to average BatchNorm statistics.
  config.child.bn_momentum = 0.99
  return config


def get_retrain_config() -> ml_collections.ConfigDict:
  """`config.retrain`: what retraining adds to the search config's fields."""
  cfg = ml_collections.ConfigDict()
  # "test": train on train + validation, report test_accuracy (the final
  # result). "validation": train on train only, report retrain_val_accuracy
  # (to tune this config without looking at the test set).
  cfg.evaluate_on = "test"
  # Write TensorBoard scalars (per-epoch loss and accuracy) to WORKDIR/tb.
  cfg.tensorboard = True
  return cfg


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise search.ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fields retraining reads, before any work or any write."""
  for field in ("seed", "data", "space", "child", "retrain"):
    _check(field in config, f"the retrain config has no `{field}` field; build "
           "it like configs/retrain_digits.py (search config fields + retrain)")
  _check(config.retrain.evaluate_on in EVALUATE_ON,
         f"config.retrain.evaluate_on={config.retrain.evaluate_on!r}; use "
         f"{' or '.join(map(repr, EVALUATE_ON))}")
  search.validate_child(config.child)


# ----------------------------------------------------------------------------
# Reading the architecture.


def read_architecture_file(path: str) -> dict[str, Any]:
  """The JSON object in `path` (a best.json, history line or Architecture.to_json).

  Raises:
    ArchitectureError: the file is missing, unreadable or not a JSON object.
  """
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise base.ArchitectureError(
        f"cannot read architecture file {path}: {e.strerror or e}") from None
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise base.ArchitectureError(
        f"architecture file {path} is not valid JSON ({e}); pass the best.json "
        "a search wrote, or a JSON object with 'space' and 'tokens'") from None
  if not isinstance(record, dict):
    raise base.ArchitectureError(
        f"architecture file {path} holds a JSON {type(record).__name__}, not "
        "an object with 'space' and 'tokens'")
  return record


def _normalised(value: Any) -> Any:
  """JSON round trip, so tuples and lists compare equal."""
  return json.loads(json.dumps(value, sort_keys=True))


def decode_architecture(space, record: Mapping[str, Any] | str) -> base.Architecture:
  """Decodes an architecture record against the retrain config's space.

  Args:
    space: the search space built from `config.space` (must be the search's).
    record: a best.json / history record (with "architecture", optionally
      "depth"), an `Architecture.to_json()` dict, or either as a JSON string.

  Returns:
    The architecture, decoded by `space`.

  Raises:
    ArchitectureError: bad JSON, another search space, a wrong token count,
      tokens out of range, or tokens that mean a different network in this
      space than in the search that wrote the file (different choice lists).
  """
  if isinstance(record, (str, bytes)):
    try:
      record = json.loads(record)
    except json.JSONDecodeError as e:
      raise base.ArchitectureError(f"architecture is not valid JSON: {e}") from None
  if not isinstance(record, Mapping):
    raise base.ArchitectureError(
        "architecture JSON must be an object with 'space' and 'tokens'")
  # A depth-scheduled search (Zoph & Le 2017, sec. 4.1) records each child's
  # depth; the architecture has that many layers whatever space.num_layers says.
  depth = record.get("depth")
  if isinstance(depth, int) and hasattr(space, "with_num_layers"):
    if depth != getattr(space, "num_layers", depth):
      logging.info("architecture file records depth %d; decoding with %d layers "
                   "(config.space.num_layers=%d)", depth, depth, space.num_layers)
    space = space.with_num_layers(depth)
  tokens = base.tokens_from_json(record, space.name)
  try:
    arch = space.from_tokens(tokens)
  except base.ArchitectureError as e:
    raise base.ArchitectureError(
        f"{e}. The retrain config's space must be the one the search used "
        "(import its config.space)") from None
  # Same tokens, different choice lists = a different network: refuse.
  written = record.get("architecture", record)
  decoded = arch.to_json()
  for field in ("details", "text"):
    if written.get(field) is None:
      continue
    if _normalised(written[field]) != _normalised(decoded[field]):
      raise base.ArchitectureError(
          "the architecture file was written by a search space with other "
          f"choices: its tokens decode here to\n{arch.text}\nbut the file "
          f"says\n{written.get('text') or written[field]}\nUse the space of the "
          "search config that found it (the retrain config should import it)")
    break
  return arch


def _search_metrics(record: Mapping[str, Any]) -> dict[str, Any]:
  """What the search measured for this architecture, if the record says."""
  out = {}
  accs = record.get("val_accuracies")
  if isinstance(accs, list) and accs:
    out["search_val_accuracy"] = accs[-1]
    out["search_val_accuracy_per_epoch"] = accs
  for key in ("reward", "child_id", "step"):
    if key in record:
      out[f"search_{key}"] = record[key]
  return out


# ----------------------------------------------------------------------------
# Retraining.


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """The retraining data: train + validation and test, or train and validation.

  With evaluate_on="test" the search's validation examples join the training
  set (validation_size=0 on the same permutation leaves the test examples the
  same), and mean/std are computed on that union, the data actually trained on.
  """
  data_cfg = copy.deepcopy(config.data)
  if config.retrain.evaluate_on == "test":
    with data_cfg.unlocked():
      data_cfg.validation_size = 0
    return data_lib.load(data_cfg, with_test=True)
  return data_lib.load(data_cfg)


def retrain(config: ml_collections.ConfigDict, arch_record: Mapping[str, Any] | str,
            workdir: str, *, source: str | None = None) -> dict[str, Any]:
  """Trains `arch_record` from scratch and writes WORKDIR/retrain.json.

  Everything that can be wrong with the config, the architecture or the data
  is checked before anything is written to `workdir`.

  Args:
    config: a retrain config (configs/retrain_*.py): seed, data, space, child,
      retrain.
    arch_record: see `decode_architecture`.
    workdir: output directory; must not hold a retrain.json already.
    source: where the architecture came from (a path), recorded as is.

  Returns:
    The record written to retrain.json.

  Raises:
    ConfigError, ArchitectureError, DataError: user errors (see rlnas.cli).
  """
  validate(config)
  try:
    space = spaces.make(config.space)
  except ValueError as e:
    raise search.ConfigError(str(e)) from None
  arch = decode_architecture(space, arch_record)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise search.ConfigError(f"--workdir {workdir} exists and is not a directory")
  if os.path.exists(os.path.join(workdir, RETRAIN)):
    raise search.ConfigError(
        f"{workdir} already holds a {RETRAIN}; use a new --workdir (results "
        "are never overwritten)")
  evaluate_on = config.retrain.evaluate_on
  dataset = load_data(config)
  try:
    model = child_lib.build_model(arch, dataset.num_classes, config.child)
  except ValueError as e:
    raise search.ConfigError(str(e)) from None
  try:  # What a search would record as a failed child: refuse it here.
    trainer.check_spatial_size(model, dataset.input_shape,
                               int(config.child.get("min_spatial_size", 1)))
  except trainer.UnbuildableChildError as e:
    raise base.ArchitectureError(str(e)) from None

  os.makedirs(workdir, exist_ok=True)
  records.atomic_write_json(os.path.join(workdir, CONFIG_FILE),
                            json.loads(config.to_json_best_effort()))
  acc_name = "test_accuracy" if evaluate_on == "test" else "retrain_val_accuracy"
  train_name = "train+validation" if evaluate_on == "test" else "train"
  logging.info("retraining %s for %d epochs on %s (%d examples), evaluating on "
               "%s (%d examples):\n%s", arch.key, config.child.epochs,
               train_name, len(dataset.train), evaluate_on,
               len(getattr(dataset, evaluate_on)), arch.text)

  scalars = records.ScalarWriter(workdir, enabled=config.retrain.tensorboard)
  started = time.perf_counter()

  def progress(epoch: int, loss: float, accuracy: float) -> None:
    logging.info("epoch %d/%d  train loss %.4f  %s %.4f  (%.0fs elapsed)",
                 epoch + 1, config.child.epochs, loss, acc_name, accuracy,
                 time.perf_counter() - started)
    scalars.scalars(epoch + 1, {"retrain/train_loss": loss,
                                f"retrain/{acc_name}": accuracy})

  rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _RNG_STREAM)
  try:
    result = trainer.train_and_evaluate(
        model, dataset, config.child, config.data.augment, rng, keep_state=True,
        eval_split=evaluate_on, epoch_callback=progress)
  except trainer.ChildTrainingError as e:
    raise search.ConfigError(
        f"retraining diverged ({e}); lower config.child.learning_rate or "
        "raise config.child.weight_decay") from None
  finally:
    scalars.close()

  checkpoint_dir = save_variables(workdir, result.state)
  out = {
      "architecture": arch.to_json(),
      "architecture_source": source,
      # The final number: last epoch, not best epoch (no selection on test).
      acc_name: round(result.val_accuracies[-1], 6),
      f"{acc_name}_per_epoch": [round(a, 6) for a in result.val_accuracies],
      "train_loss_per_epoch": [round(v, 6) for v in result.train_losses],
      **_search_metrics(arch_record if isinstance(arch_record, Mapping) else
                        json.loads(arch_record)),
      "trained_on": train_name,
      "evaluated_on": evaluate_on,
      "train_examples": len(dataset.train),
      f"{evaluate_on}_examples": len(getattr(dataset, evaluate_on)),
      "dataset": dataset.name,
      "epochs": int(config.child.epochs),
      "seed": int(config.seed),
      "num_params": result.num_params,
      "train_seconds": round(result.train_seconds, 3),
      "compile_seconds": round(result.compile_seconds, 3),
      "checkpoint": os.path.relpath(checkpoint_dir, workdir),
  }
  records.atomic_write_json(os.path.join(workdir, RETRAIN), out)
  search_acc = out.get("search_val_accuracy")
  logging.info(
      "%s %.4f after %d epochs on %s (search_val_accuracy %s: the search "
      "child's validation accuracy after its short training, not a result)",
      acc_name, out[acc_name], out["epochs"], train_name,
      "n/a" if search_acc is None else f"{search_acc:.4f}")
  return out


def save_variables(workdir: str, state: trainer.TrainState) -> str:
  """Saves {"params", "batch_stats"} to WORKDIR/checkpoint with Orbax."""
  path = os.path.abspath(os.path.join(workdir, CHECKPOINT))
  variables = jax.device_get({"params": state.params,
                              "batch_stats": state.batch_stats})
  with ocp.StandardCheckpointer() as ckptr:
    # force: replace a checkpoint left by an earlier run that died before
    # writing retrain.json (the only way one can exist here).
    ckptr.save(path, variables, force=True)
    ckptr.wait_until_finished()
  return path


def restore_variables(workdir: str) -> dict[str, Any]:
  """The retrained model's variables, for model.apply(variables, x, train=False)."""
  path = os.path.abspath(os.path.join(workdir, CHECKPOINT))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


# ----------------------------------------------------------------------------
# Command line.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  path = flags.FLAGS.arch
  logging.info("JAX backend %s, %d local devices", jax.default_backend(),
               jax.local_device_count())
  sys.exit(cli.report_user_errors(lambda: retrain(
      flags.FLAGS.config, read_architecture_file(path), flags.FLAGS.workdir,
      source=path)))


def define_flags() -> None:
  """--config, --arch, --workdir. Defined on start-up, not on import, so tests
  and notebooks can import this module next to rlnas.main (same flag names)."""
  config_flags.DEFINE_config_file(
      "config", None, "Retrain config file (configs/retrain_*.py).",
      lock_config=True)
  flags.DEFINE_string("arch", None, "Architecture JSON: a search's best.json, "
                      "a history.jsonl line, or {'space': ..., 'tokens': [...]}.")
  flags.DEFINE_string("workdir", None, "Output directory for retrain.json and "
                      "the checkpoint.")
  flags.mark_flags_as_required(["config", "arch", "workdir"])


def run():
  """`python -m rlnas.retrain` and the console script `rlnas-retrain`."""
  # Config files import the search config they retrain (`from configs import
  # default`, the Flax examples' convention), which needs the directory holding
  # configs/ importable. `python -m` from the repository root puts the working
  # directory on sys.path; the console script does not, so do it here.
  if os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.insert(0, os.getcwd())
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
