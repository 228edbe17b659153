"""Entry point: `python -m rlnas.main --config=configs/default.py --workdir=DIR`.

Overrides come from the command line as `--config.controller.learning_rate=3e-4`.
This is the only module that reads flags.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rlnas import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for history, checkpoints, TensorBoard.")
config_flags.DEFINE_config_file("config", None, "Search config file (configs/*.py).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  cli.init_distributed(config.get("distributed"))
  logging.info("JAX backend %s, process %d of %d, %d local / %d global devices",
               jax.default_backend(), jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  sys.exit(cli.run_search(config, _WORKDIR.value))


def run():
  # Configs import each other (`from configs import default`); `python -m`
  # puts the working directory on sys.path, the console script does not.
  if "" not in sys.path and os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  app.run(main)


if __name__ == "__main__":
  run()
