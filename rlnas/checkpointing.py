"""Search checkpoints (Orbax) and the guard against reusing another run's workdir.

A checkpoint holds everything a resumed search needs to continue exactly: the
strategy state (controller parameters, optimizer state, baseline), the controller
step, the number of children done (hence the depth-schedule position), the best
reward and the elapsed time. RNG needs no saving: every key is `fold_in(seed,
step)` or `fold_in(seed, child_id)`.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a kill never leaves a half-written checkpoint that looks finished
(the temporary directory is removed by the next save); the last `keep`
checkpoints are kept. Each checkpoint also holds a SHA-256 digest of its
contents, so a truncated or bit-flipped checkpoint is detected even where the
storage format would read it back without error. A checkpoint that fails to
restore is reported, moved to WORKDIR/checkpoints_corrupt/ (so the step can be
written again) and the one before it is used; with none left the search starts
from step 0 and replays its children from history.jsonl.
"""

import hashlib
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
    "search.max_consecutive_failures",
    "search.allow_config_change", "search.checkpoints_to_keep",
    "search.tensorboard", "search.verbose",
)


# How a run is launched (coordinator address, process ids and counts,
# timeouts) changes between launches without changing the search.
LAUNCH_FIELDS = ("distributed.",)


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


def check_workdir_config(config: ml_collections.ConfigDict,
                         workdir: str) -> list[str] | None:
  """Refuses a workdir whose saved config differs.

  Differences in RESUMABLE_CHANGES are allowed; others raise naming the fields,
  unless config.search.allow_config_change is set.

  Returns:
    None if the workdir holds no run; else the fields outside
    RESUMABLE_CHANGES that differ (non-empty only with allow_config_change).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = _flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise WorkdirMismatchError(
        f"{path} cannot be read ({e}); this workdir does not hold a run "
        "rlnas can resume. Use a new --workdir.") from None
  current = _flatten(config_dict(config))
  differing = sorted(k for k in set(saved) | set(current)
                     if saved.get(k) != current.get(k)
                     and k not in RESUMABLE_CHANGES
                     and not k.startswith(LAUNCH_FIELDS))
  if differing and not config.search.get("allow_config_change", False):
    details = "; ".join(f"{k}: workdir has {saved.get(k)!r}, config has "
                        f"{current.get(k)!r}" for k in differing[:10])
    raise WorkdirMismatchError(
        f"workdir {workdir} holds a run with a different config ({details}). "
        "Use a new --workdir, or pass --config.search.allow_config_change=True "
        "to resume it with the new settings.")
  return differing


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  records.atomic_write_json(os.path.join(workdir, CONFIG_FILE), config_dict(config))


def tree_digest(tree: Any) -> np.ndarray:
  """SHA-256 of every leaf's path, dtype, shape and bytes: uint8 [32]."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    h.update(repr((jax.tree_util.keystr(path), leaf.dtype.str, leaf.shape)).encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return np.frombuffer(h.digest(), np.uint8).copy()


class CorruptCheckpointError(ValueError):
  """A checkpoint read back differs from what was written."""


class Checkpointer:
  """Orbax CheckpointManager over WORKDIR/checkpoints, synchronous writes."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.corrupt_directory = os.path.abspath(
        os.path.join(workdir, "checkpoints_corrupt"))
    self._keep = keep
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    # In a multi-process job only process 0 saves and restores (the others
    # get its state through rlnas.distributed); without `active_processes`
    # Orbax would wait at barriers for processes that never come. With it,
    # Orbax leaves creating the directory to us.
    me = jax.process_index()
    os.makedirs(self.directory, exist_ok=True)
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, create=False, enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me})))

  @staticmethod
  def _tree(state: Any, loop: dict[str, Any]) -> dict[str, Any]:
    return {"strategy": flax.serialization.to_state_dict(jax.device_get(state)),
            "loop": {k: np.asarray(v) for k, v in loop.items()}}

  def save(self, step: int, state: Any, loop: dict[str, Any]) -> None:
    """Writes checkpoint `step` and returns once it is complete on disk."""
    tree = self._tree(state, loop)
    tree["digest"] = tree_digest(tree)
    if not self._manager.save(step, args=ocp.args.StandardSave(tree)):
      # Orbax skips steps at or below its latest one without an error.
      raise RuntimeError(f"checkpoint {step} was not written: {self.directory} "
                         f"already holds steps {self._manager.all_steps()}")
    self._manager.wait_until_finished()

  def restore(self, state_template: Any, loop_template: dict[str, Any]):
    """Newest checkpoint that restores intact: (step, state, loop), or None.

    Checkpoints newer than it (unreadable, or not matching their digest) are
    reported and moved to `corrupt_directory`.
    """
    bad, found = [], None
    for step in sorted(self._manager.all_steps(), reverse=True):
      template = self._tree(state_template, loop_template)
      template["digest"] = np.zeros((32,), np.uint8)
      try:
        tree = self._manager.restore(step, args=ocp.args.StandardRestore(template))
        digest = tree.pop("digest")
        if not np.array_equal(np.asarray(digest), tree_digest(tree)):
          raise CorruptCheckpointError("contents do not match their SHA-256 digest")
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint %d in %s cannot be restored (%s: %s); "
                        "falling back to the one before it", step, self.directory,
                        type(e).__name__, str(e)[:300])
        bad.append(step)
        # A failed restore can leave the manager unusable for other steps.
        self._manager.close()
        self._manager = self._new_manager()
        continue
      state = flax.serialization.from_state_dict(state_template, tree["strategy"])
      loop = {k: np.asarray(v).item() for k, v in tree["loop"].items()}
      found = step, state, loop
      break
    if bad:
      self._set_aside(bad)
      if found is None:
        logging.warning("no checkpoint in %s can be restored: starting from "
                        "step 0 and replaying the children in history.jsonl",
                        self.directory)
    return found

  def _set_aside(self, steps: list[int]) -> None:
    """Moves checkpoints to `corrupt_directory`, so their steps can be rewritten."""
    self._manager.close()
    os.makedirs(self.corrupt_directory, exist_ok=True)
    for step in steps:
      source = os.path.join(self.directory, str(step))
      target = os.path.join(self.corrupt_directory, str(step))
      n = 0
      while os.path.exists(target):
        n += 1
        target = os.path.join(self.corrupt_directory, f"{step}.{n}")
      if os.path.exists(source):
        os.rename(source, target)
        logging.warning("moved unrestorable checkpoint %d to %s", step, target)
    self._manager = self._new_manager()

  def close(self) -> None:
    self._manager.close()
