"""Search checkpoints (Orbax) and the guard against reusing another run's workdir.

A checkpoint holds everything a resumed search needs to continue exactly: the
strategy state (controller parameters, optimizer state, baseline), the controller
step, the number of children done (hence the depth-schedule position), the best
reward and the elapsed time. RNG needs no saving: every key is `fold_in(seed,
step)` or `fold_in(seed, child_id)`.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a kill never leaves a half-written checkpoint that looks finished;
the last `keep` checkpoints are kept, and a latest checkpoint that still fails
to restore is reported and skipped in favour of the one before it.
"""

import json
import os
from typing import Any

from absl import logging
import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from rlnas import records

CONFIG_FILE = "config.json"

# Fields a resumed run may change without being "another run": budgets and
# reporting, not anything that shapes what is sampled or how it is scored.
RESUMABLE_CHANGES = (
    "search.max_children", "search.max_minutes", "search.patience_steps",
    "search.allow_config_change", "search.checkpoints_to_keep",
    "search.tensorboard", "search.verbose",
)


class WorkdirMismatchError(ValueError):
  """The workdir holds a run made with a different config."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  if isinstance(tree, list):
    tree = tuple(tree)
  return {prefix[:-1]: tree}


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Refuses a workdir whose saved config differs; returns True if it had one.

  Differences in RESUMABLE_CHANGES are allowed; others raise naming the fields,
  unless config.search.allow_config_change is set.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    saved = _flatten(json.load(f))
  current = _flatten(config_dict(config))
  differing = sorted(k for k in set(saved) | set(current)
                     if saved.get(k) != current.get(k)
                     and k not in RESUMABLE_CHANGES)
  if differing and not config.search.get("allow_config_change", False):
    details = "; ".join(f"{k}: workdir has {saved.get(k)!r}, config has "
                        f"{current.get(k)!r}" for k in differing[:10])
    raise WorkdirMismatchError(
        f"workdir {workdir} holds a run with a different config ({details}). "
        "Use a new --workdir, or pass --config.search.allow_config_change=True "
        "to resume it with the new settings.")
  return True


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  records.atomic_write_json(os.path.join(workdir, CONFIG_FILE), config_dict(config))


class Checkpointer:
  """Orbax CheckpointManager over WORKDIR/checkpoints, synchronous writes."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False))

  def save(self, step: int, state: Any, loop: dict[str, Any]) -> None:
    tree = {"strategy": flax.serialization.to_state_dict(jax.device_get(state)),
            "loop": {k: np.asarray(v) for k, v in loop.items()}}
    self._manager.save(step, args=ocp.args.StandardSave(tree))
    self._manager.wait_until_finished()

  def restore(self, state_template: Any, loop_template: dict[str, Any]):
    """Newest checkpoint that restores: (step, state, loop), or None if none."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      template = {"strategy": flax.serialization.to_state_dict(
                      jax.device_get(state_template)),
                  "loop": {k: np.asarray(v) for k, v in loop_template.items()}}
      try:
        tree = self._manager.restore(step, args=ocp.args.StandardRestore(template))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint %d in %s cannot be restored (%s: %s); "
                        "falling back to the one before it", step, self.directory,
                        type(e).__name__, str(e)[:200])
        continue
      state = flax.serialization.from_state_dict(state_template, tree["strategy"])
      loop = {k: np.asarray(v).item() for k, v in tree["loop"].items()}
      return step, state, loop
    return None

  def close(self) -> None:
    self._manager.close()
