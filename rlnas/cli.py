"""What the command-line entry points share: distributed start-up and clean errors.

Errors a user can make (a bad config value, an unknown or unprepared dataset, a
malformed architecture file, a workdir from another run) end in one message that
names the problem and the fix, and a non-zero exit status; bugs keep their
traceback.
"""

import os
import sys
from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from rlnas import checkpointing
from rlnas import data
from rlnas import distributed
from rlnas import search
from rlnas.spaces import base

USER_ERRORS = (search.ConfigError, data.DataError, base.ArchitectureError,
               checkpointing.WorkdirMismatchError, search.SearchAborted,
               distributed.DistributedError)
EXIT_USER_ERROR = 2


class _QuietLibraries:
  """Drops INFO records of chatty libraries (Orbax logs ~15 lines per save)."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  for handler in logging.get_absl_logger().handlers + [logging.get_absl_handler()]:
    handler.addFilter(_QuietLibraries())


def init_distributed(cfg: ml_collections.ConfigDict | None) -> None:
  """Starts JAX's multi-process runtime when the config asks for it."""
  distributed.initialize(cfg)  # TPU VMs, SLURM, ... detect their peers.


def report_user_errors(fn: Callable[[], Any]) -> int:
  """Runs fn; a user error becomes one logged line and exit status 2."""
  try:
    fn()
  except USER_ERRORS as e:
    print(f"error: {e} ({type(e).__name__})", file=sys.stderr)
    return EXIT_USER_ERROR
  return 0


def enable_compilation_cache(child_cfg: ml_collections.ConfigDict | None) -> None:
  """Turns on JAX's persistent compilation cache at config.child.compilation_cache_dir."""
  path = child_cfg.get("compilation_cache_dir", "") if child_cfg is not None else ""
  if not path:
    return
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # The default 1 s threshold would skip every per-layer executable.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def run_search(config: ml_collections.ConfigDict, workdir: str) -> int:
  quiet_library_logs()
  enable_compilation_cache(config.get("child"))
  return report_user_errors(lambda: search.run(config, workdir))
