r"""Child throughput of a search config: architectures per minute, by engine.

Samples children from a config's search space (uniformly, as a fresh
controller does), in batches of `config.search.children_per_step`, and trains
each batch the way the evaluator does, with the chosen child engine:
  jit        rlnas.child.trainer.train_and_evaluate (one compile per child);
  layerwise  rlnas.child.layerwise.train_and_evaluate, after
             `layerwise.precompile` of the whole batch (layer signatures
             compile once per search, in background threads).
With --torch, the same architectures also train in PyTorch eager (one
nn.Module per child, bench/child_exec_study.py's mirror of the child), one
torch child after each JAX child, so that both see the same machine load.

Usage:
  .venv/bin/python bench/child_throughput.py --config=configs/default.py \
      --engine=layerwise --num_children=96 --torch
  .venv/bin/python bench/child_throughput.py --engine=layerwise \
      --bucket_kernels=5 --pow2_channels
Prints one JSON line: archs/min of the engine (and torch), per-child compile
wait and training seconds, mean final validation accuracy. Results:
bench/child_study.md. Takes ~2-4 minutes for 96 digits children with
--engine=layerwise on a 2-core CPU; --engine=jit ~10x longer.
"""

import importlib.util
import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# The PyTorch mirror of the child, and the --single_thread flag.
import child_exec_study  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("config", os.path.join(_ROOT, "configs", "default.py"),
                    "config file with get_config()")
flags.DEFINE_enum("engine", "layerwise", ["layerwise", "jit"], "child engine")
flags.DEFINE_integer("num_children", 96, "children to train")
flags.DEFINE_integer("seed", 0, "architecture sampling seed")
flags.DEFINE_list("bucket_kernels", [], "layerwise: odd kernel sizes to pad up to")
flags.DEFINE_bool("pow2_channels", False, "layerwise: pad input depths to 2^k")
flags.DEFINE_bool("torch", False, "interleave the PyTorch eager reference")
flags.DEFINE_string("compilation_cache_dir", "",
                    "JAX persistent compilation cache (empty: off)")


def _load_config(path):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv):
  del argv
  if FLAGS.single_thread:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false"
                               + " intra_op_parallelism_threads=1")
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  from rlnas import child as child_lib  # pylint: disable=import-outside-toplevel
  from rlnas import data as data_lib  # pylint: disable=import-outside-toplevel
  from rlnas import evaluators  # pylint: disable=import-outside-toplevel
  from rlnas.child import layerwise  # pylint: disable=import-outside-toplevel
  from rlnas.child import trainer  # pylint: disable=import-outside-toplevel
  from rlnas.spaces import nasrl_cnn  # pylint: disable=import-outside-toplevel

  config = _load_config(FLAGS.config)
  dataset = data_lib.load(config.data)
  space = nasrl_cnn.NASRLCNNSpace.from_config(config.space)
  cfg, augment = config.child, config.data.augment
  bucketing = layerwise.Bucketing(tuple(int(k) for k in FLAGS.bucket_kernels),
                                  FLAGS.pow2_channels)
  tokens = np.asarray(space.random_tokens(jax.random.PRNGKey(FLAGS.seed),
                                          FLAGS.num_children))
  archs = [space.from_tokens(t) for t in tokens]
  reference = None
  if FLAGS.torch and child_exec_study.torch_available():
    reference = child_exec_study.TorchRunner(dataset, cfg)
    reference.train_and_evaluate(archs[0], 0)  # Warm-up, untimed.

  per_step = int(config.search.children_per_step)
  jax_wall, torch_wall = 0.0, 0.0
  compile_s, train_s, accs, torch_accs, failed = [], [], [], [], 0
  for first in range(0, len(archs), per_step):
    batch = archs[first:first + per_step]
    models = [child_lib.build_model(a, dataset.num_classes, cfg) for a in batch]
    start = time.perf_counter()
    if FLAGS.engine == "layerwise":
      layerwise.precompile(models, dataset, cfg, bucketing=bucketing)
    jax_wall += time.perf_counter() - start
    for k, (arch, model) in enumerate(zip(batch, models)):
      child_id = first + k
      start = time.perf_counter()
      try:
        if FLAGS.engine == "layerwise":
          result = layerwise.train_and_evaluate(
              model, dataset, cfg, augment,
              evaluators.child_rng(config.seed, child_id), bucketing=bucketing)
        else:
          result = trainer.train_and_evaluate(
              model, dataset, cfg, augment, evaluators.child_rng(config.seed, child_id))
        compile_s.append(result.compile_seconds)
        train_s.append(result.train_seconds)
        accs.append(result.val_accuracies[-1])
      except trainer.ChildTrainingError:
        failed += 1
      jax_wall += time.perf_counter() - start
      if reference is not None:
        r = reference.train_and_evaluate(arch, child_id)
        torch_wall += r["wall"]
        torch_accs.append(r["acc"])
    print(f"{first + len(batch)} children: {60 * (first + len(batch)) / jax_wall:.1f} "
          f"archs/min", file=sys.stderr, flush=True)

  n = len(archs)
  out = {
      "config": os.path.basename(FLAGS.config), "engine": FLAGS.engine,
      "bucketing": [list(bucketing.kernel_sizes), bucketing.pow2_channels],
      "num_children": n, "failed": failed,
      "archs_per_min": round(60 * n / jax_wall, 2),
      "compile_wait_s_per_child": round(float(np.mean(compile_s)), 4),
      "train_s_per_child": round(float(np.mean(train_s)), 4),
      "overhead_fraction": round(float(np.sum(compile_s) / jax_wall), 4),
      "mean_final_val_acc": round(float(np.mean(accs)), 4),
  }
  if FLAGS.engine == "layerwise":
    engine = next(iter(layerwise._ENGINES.values()))  # pylint: disable=protected-access
    out["executables"] = sum(engine.num_compiled.values())
    out["compile_thread_seconds"] = round(engine.compile_seconds, 2)
  if reference is not None:
    out["torch_archs_per_min"] = round(60 * n / torch_wall, 2)
    out["speed_vs_torch"] = round(torch_wall / jax_wall, 3)
    out["torch_mean_final_val_acc"] = round(float(np.mean(torch_accs)), 4)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
