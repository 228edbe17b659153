r"""Child throughput of a search config: architectures per minute, rlnas vs PyTorch.

One invocation trains the same list of architectures with each method below,
each in its own subprocess (cold caches; XLA options are process-wide), and
prints every method's speed as a ratio to the PyTorch eager reference run in
the same invocation (a torch run before and one after the JAX methods; their
mean is the reference, their spread shows the drift of a shared machine).

Methods (`--compare`):
  torch       PyTorch eager, one nn.Module per child (bench/child_exec_study.py's
              mirror of the child: same layers, init distributions, Adam with L2),
              default intra-op threads: the loop a user would write.
  torch_1     the same on one thread.
  keras       Keras 3 (TensorFlow backend) `model.fit`, one keras.Model per
              child: same layers, LeCun-normal kernels, BatchNorm momentum and
              epsilon, Adam with L2 on kernels, batch and epochs; Keras's own
              default compilation (`jit_compile="auto"`). Needs tensorflow-cpu
              in the Python given by --keras_python (default: this one).
  rlnas       the search's own evaluator path: ChildTrainerEvaluator wrapped by
              rlnas.workers.wrap as `search.prepare` does (config defaults:
              the layer-wise engine on CPU and one child per core at once),
              `prepare` then `evaluate` per controller step of
              config.search.children_per_step children.
  rlnas_1     the same with one child at a time (children_per_device=1).
  jit         one whole-child program per child (config.child.engine="jit"),
              one at a time: the baseline the layer-wise engine replaces.
              Capped at --jit_children children (it is ~10x slower).

Architectures (`--archs`): "uniform" samples them uniformly from the config's
space (what a fresh controller proposes); "history:PATH" takes the distinct
architectures of the second half of a finished search's history.jsonl, in
order of frequency (what a converged controller proposes: larger children).

Usage:
  .venv/bin/python bench/child_throughput.py --num_children=96
  .venv/bin/python bench/child_throughput.py --archs=history:/tmp/run/history.jsonl \
      --num_children=16 --compare=torch,rlnas,rlnas_1
Prints a table and one JSON line per method. Results: bench/child_study.md.
About 4 minutes on a 2-core CPU for 96 digits children with the default methods.
"""

import collections
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# The PyTorch mirror of the child (and the --single_thread and --worker flags).
import child_exec_study  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("config", os.path.join(_ROOT, "configs", "default.py"),
                    "config file with get_config()")
flags.DEFINE_list("compare", ["torch", "rlnas", "rlnas_1", "jit", "torch"],
                  "methods, in order (torch twice brackets the JAX runs)")
flags.DEFINE_integer("num_children", 96, "children to train")
flags.DEFINE_integer("jit_children", 24, "children for the slow jit method")
flags.DEFINE_string("archs", "uniform", "'uniform' or 'history:PATH'")
flags.DEFINE_integer("seed", 0, "architecture sampling seed")
flags.DEFINE_string("compilation_cache_dir", "",
                    "JAX persistent compilation cache for the JAX methods (empty: off)")
flags.DEFINE_string("tokens_file", "", "internal: the architectures' tokens")
flags.DEFINE_string("keras_python", "",
                    "Python with tensorflow-cpu for the keras method (default: this one)")


def _load_config(path):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _tokens(config) -> list[list[int]]:
  if FLAGS.archs.startswith("history:"):
    with open(FLAGS.archs.split(":", 1)[1]) as f:
      history = [json.loads(line) for line in f]
    late = history[len(history) // 2:]
    counts = collections.Counter(tuple(r["tokens"]) for r in late)
    distinct = [list(t) for t, _ in counts.most_common()]
    return (distinct * FLAGS.num_children)[:FLAGS.num_children]
  if FLAGS.archs != "uniform":
    raise app.UsageError(f"--archs={FLAGS.archs}: use 'uniform' or 'history:PATH'")
  import jax  # pylint: disable=import-outside-toplevel
  from rlnas.spaces import nasrl_cnn  # pylint: disable=import-outside-toplevel
  space = nasrl_cnn.NASRLCNNSpace.from_config(config.space)
  return np.asarray(space.random_tokens(jax.random.PRNGKey(FLAGS.seed),
                                        FLAGS.num_children)).tolist()


def _warmup_tokens(config) -> list[int]:
  """An architecture outside the measured list: every method trains it first,
  untimed, so that one-off costs of a process (thread pools, allocators, and
  for JAX the executables every child shares: input pipeline, BatchNorm,
  classifier) stay out of the per-child numbers."""
  import jax  # pylint: disable=import-outside-toplevel
  from rlnas.spaces import nasrl_cnn  # pylint: disable=import-outside-toplevel
  space = nasrl_cnn.NASRLCNNSpace.from_config(config.space)
  return np.asarray(space.random_tokens(jax.random.PRNGKey(FLAGS.seed + 10**6), 1))[0].tolist()


def _run_torch(config, warmup, archs, threads: int):
  FLAGS.single_thread = threads == 1
  from rlnas import data as data_lib  # pylint: disable=import-outside-toplevel
  dataset = data_lib.load(config.data)
  runner = child_exec_study.TorchRunner(dataset, config.child)
  runner.train_and_evaluate(warmup, 10**6)
  start = time.perf_counter()
  accs = [runner.train_and_evaluate(a, i)["acc"] for i, a in enumerate(archs)]
  wall = time.perf_counter() - start
  return {"wall": wall, "accs": accs, "threads": runner.torch.get_num_threads(),
          "compile_wait": 0.0, "busy": wall}


class KerasRunner:
  """NASRLConvNet mirrored in Keras 3: the reference a Keras user would write."""

  def __init__(self, dataset, cfg):
    import keras  # pylint: disable=import-outside-toplevel
    self.keras = keras
    self.cfg = cfg
    norm = lambda im: ((im.astype(np.float32) - dataset.mean) / dataset.std)
    self.x, self.y = norm(dataset.train.images), dataset.train.labels.astype(np.int32)
    self.vx, self.vy = norm(dataset.validation.images), dataset.validation.labels
    self.num_classes = dataset.num_classes
    self.jit_compile = None

  def build(self, arch, seed):
    from rlnas.child import cnn  # pylint: disable=import-outside-toplevel
    keras, cfg, layers = self.keras, self.cfg, arch.details
    keras.utils.set_random_seed(seed)
    # optax.add_decayed_weights(wd) before Adam adds wd * w to the gradient:
    # the gradient of an L2 loss term wd / 2 * |w|^2.
    reg = keras.regularizers.L2(cfg.weight_decay / 2)
    inputs = keras.Input(self.x.shape[1:])
    outs = []
    for layer in layers:
      assert layer.stride_height == layer.stride_width == 1
      srcs = [outs[j] for j in layer.inputs]
      x = (srcs[0] if len(srcs) == 1 else keras.layers.Concatenate()(srcs)) if srcs else inputs
      x = keras.layers.Conv2D(layer.num_filters, (layer.filter_height, layer.filter_width),
                              padding="same", use_bias=cfg.use_bias,
                              kernel_initializer="lecun_normal", kernel_regularizer=reg)(x)
      x = keras.layers.BatchNormalization(momentum=cfg.bn_momentum, epsilon=1e-5)(x)
      outs.append(keras.layers.ReLU()(x))
    head = [outs[j] for j in cnn.unconsumed(layers)]
    x = head[0] if len(head) == 1 else keras.layers.Concatenate()(head)
    x = (keras.layers.GlobalAveragePooling2D()(x) if cfg.head == "gap"
         else keras.layers.Flatten()(x))
    logits = keras.layers.Dense(self.num_classes, kernel_initializer="lecun_normal",
                                kernel_regularizer=reg)(x)
    return keras.Model(inputs, logits)

  def train_and_evaluate(self, arch, seed):
    keras, cfg = self.keras, self.cfg
    assert cfg.optimizer == "adam" and cfg.lr_schedule == "constant"
    model = self.build(arch, seed)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate, epsilon=1e-8),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    n = len(self.y)
    batch = min(cfg.batch_size, n)
    keep = np.random.default_rng(seed).permutation(n)[:(n // batch) * batch]
    fit = model.fit(self.x[keep], self.y[keep], batch_size=batch, epochs=cfg.epochs,
                    validation_data=(self.vx, self.vy), shuffle=True, verbose=0)
    self.jit_compile = model.jit_compile
    return {"acc": float(fit.history["val_accuracy"][-1])}


def _run_keras(config, warmup, archs):
  from rlnas import data as data_lib  # pylint: disable=import-outside-toplevel
  runner = KerasRunner(data_lib.load(config.data), config.child)
  runner.train_and_evaluate(warmup, 10**6)
  start = time.perf_counter()
  accs = [runner.train_and_evaluate(a, i)["acc"] for i, a in enumerate(archs)]
  wall = time.perf_counter() - start
  return {"wall": wall, "accs": accs, "jit_compile": runner.jit_compile,
          "compile_wait": 0.0, "busy": wall}


def _run_rlnas(config, warmup, archs, per_device: int):
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from rlnas import data as data_lib  # pylint: disable=import-outside-toplevel
  from rlnas import workers  # pylint: disable=import-outside-toplevel
  from rlnas import evaluators  # pylint: disable=import-outside-toplevel
  config.distributed.children_per_device = per_device
  base = evaluators.ChildTrainerEvaluator(data_lib.load(config.data), config)
  evaluator = workers.wrap(base, config)
  workers = len(getattr(evaluator, "workers", [None]))
  per_step = int(config.search.children_per_step)
  base.evaluate([warmup], [10**6])
  results = []
  start = time.perf_counter()
  for first in range(0, len(archs), per_step):
    batch = archs[first:first + per_step]
    if hasattr(evaluator, "prepare"):
      evaluator.prepare(batch)
    results += evaluator.evaluate(batch, list(range(first, first + len(batch))))
  wall = time.perf_counter() - start
  failed = [r.error for r in results if r.status != evaluators.OK]
  if failed:
    raise RuntimeError(f"{len(failed)} children failed, e.g. {failed[0]}")
  m = [r.metrics for r in results]
  return {"wall": wall, "accs": [r.val_accuracies[-1] for r in results],
          "workers": workers, "engine": base.engine,
          "compile_wait": sum(x["compile_seconds"] for x in m),
          "busy": sum(x["compile_seconds"] + x["train_seconds"] for x in m)}


def _worker(method: str) -> None:
  config = _load_config(FLAGS.config)
  with open(FLAGS.tokens_file) as f:
    tokens = json.load(f)
  from rlnas.spaces import nasrl_cnn  # pylint: disable=import-outside-toplevel
  space = nasrl_cnn.NASRLCNNSpace.from_config(config.space)
  warmup, *archs = [space.from_tokens(t) for t in tokens]
  if method in ("torch", "torch_1"):
    out = _run_torch(config, warmup, archs, 1 if method == "torch_1" else 0)
  elif method in ("rlnas", "rlnas_1"):
    out = _run_rlnas(config, warmup, archs, 0 if method == "rlnas" else 1)
  elif method == "jit":
    config.child.engine = "jit"
    out = _run_rlnas(config, warmup, archs, 1)
  elif method == "keras":
    out = _run_keras(config, warmup, archs)
  else:
    raise app.UsageError(f"unknown method {method!r}")
  n = len(archs)
  from rlnas import data as data_lib  # pylint: disable=import-outside-toplevel
  train = len(data_lib.load(config.data).train.labels)
  batch = min(config.child.batch_size, train)
  examples = n * (train // batch) * batch * config.child.epochs
  out.update(method=method, num_children=n,
             archs_per_min=60 * n / out["wall"],
             train_examples_per_s=examples / out["wall"],
             overhead_fraction=out["compile_wait"] / max(out["busy"], 1e-9),
             mean_final_val_acc=float(np.mean(out.pop("accs"))))
  print("RESULT " + json.dumps(out))


def main(argv):
  del argv
  if FLAGS.worker:
    _worker(FLAGS.worker)
    return
  config = _load_config(FLAGS.config)
  tokens = _tokens(config)
  warmup = _warmup_tokens(config)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for method in FLAGS.compare:
      n = FLAGS.jit_children if method == "jit" else FLAGS.num_children
      path = os.path.join(tmp, f"tokens_{n}.json")
      with open(path, "w") as f:
        json.dump([warmup] + tokens[:n], f)
      python = (FLAGS.keras_python or sys.executable) if method == "keras" else sys.executable
      cmd = [python, os.path.abspath(__file__), f"--worker={method}",
             f"--config={FLAGS.config}", f"--tokens_file={path}",
             f"--compilation_cache_dir={FLAGS.compilation_cache_dir}"]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if proc.returncode != 0 or "RESULT " not in proc.stdout:
        sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
      rows.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
      print(f"{method}: {rows[-1]['archs_per_min']:.1f} archs/min", file=sys.stderr,
            flush=True)
  torch_rates = [r["archs_per_min"] for r in rows if r["method"] == "torch"]
  reference = float(np.mean(torch_rates)) if torch_rates else float("nan")
  print(f"archs: {FLAGS.archs}, {FLAGS.num_children} children; torch reference "
        f"{reference:.1f} archs/min (runs: {', '.join(f'{t:.1f}' for t in torch_rates)})")
  print("| method | children | archs/min | vs torch | train examples/s | "
        "compile wait / child s | overhead fraction | workers | final val acc |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    r["speed_vs_torch"] = r["archs_per_min"] / reference
    print(f"| {r['method']} | {r['num_children']} | {r['archs_per_min']:.1f} | "
          f"{r['speed_vs_torch']:.2f} | {r['train_examples_per_s']:.0f} | "
          f"{r['compile_wait'] / r['num_children']:.3f} | {r['overhead_fraction']:.3f} | "
          f"{r.get('workers', r.get('threads', ''))} | {r['mean_final_val_acc']:.3f} |")
  for r in rows:
    print(json.dumps(r))


if __name__ == "__main__":
  app.run(main)
