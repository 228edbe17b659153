r"""How should rlnas train many small child CNNs fast on CPU? A measured study.

Trains the same sampled NAS-RL architectures, on the same data, with the same
batch size, epochs and optimizer, with each execution strategy below, and with
a PyTorch eager reference interleaved architecture by architecture in the same
process (the machine is shared and noisy: compare each method with the
reference measured next to it, not with another run's numbers).

Methods (`--methods`, comma-separated; each runs in its own subprocess
because several set process-wide JAX/XLA options):
  torch            PyTorch eager, one nn.Module per architecture (reference).
  rlnas_jit        rlnas.child.trainer.train_and_evaluate as is: jitted
                   threefry init, AOT-compiled jitted step, Python loop.
  jit_rbg          the same under jax_default_prng_impl=unsafe_rbg.
  jit_host         the same step, parameters initialised on the host (numpy),
                   so initialisation compiles nothing.
  jit_pcache       jit_host with the persistent compilation cache: a cold pass
                   (fresh cache dir) then, after jax.clear_caches(), a warm pass
                   over the same architectures (what a re-run would see).
  jit_O0           jit_host with XLA_FLAGS=--xla_backend_optimization_level=0.
  jit_noopt        jit_host with jax_disable_most_optimizations.
  jit_bg           jit_host, compiling the next child's step in a background
                   thread while the current child trains.
  eager            op-by-op: jax.value_and_grad and the optax update run
                   without jit (each primitive compiles once per shape).
  layerwise        rlnas.child.layerwise: executables cached per layer signature.
  layerwise_b5     the same with kernels padded to 5x5 and input depths to
                   powers of two (exact; fewer signatures, more arithmetic).
  layerwise_b35    kernels padded to 3 or 5 per dimension, depths to powers of 2.
  layerwise_pcache layerwise with the persistent cache, cold pass then warm.

Settings (`--setting`):
  issue       the issue's space: 4 layers, no skips, kernels {1,3,5}^2, filters
              {8,16,32}; digits; batch 128, 3 epochs (27 steps); Adam 0.01.
  default     configs/default.py's space and child config (3 layers with skip
              connections, batch 64, 4 epochs = 72 steps, Adam 0.01).
  cifar_like  32x32x3 synthetic learnable images, kernels {1,3,5,7}^2, filters
              {24,36,48,64}, 3 layers with skips, batch 16, 100 steps (one
              epoch of 1600 images), 320 validation images.

Usage (results and their discussion: bench/child_study.md):
  .venv/bin/python bench/child_exec_study.py --setting=issue --num_archs=24 \
      --out=/tmp/study_issue.json
Each method takes ~1-3 minutes on a shared 2-core CPU for 24 digits children.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import concurrent.futures

from absl import app
from absl import flags
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("setting", "issue", "issue | default | cifar_like")
flags.DEFINE_string("methods", "rlnas_jit,jit_rbg,jit_host,jit_pcache,jit_O0,"
                    "jit_noopt,jit_bg,eager,layerwise,layerwise_b5,layerwise_b35,"
                    "layerwise_pcache", "methods to run, comma-separated")
flags.DEFINE_integer("num_archs", 24, "architectures per method")
flags.DEFINE_integer("arch_seed", 0, "seed of the sampled architectures")
flags.DEFINE_string("out", "", "write all records as JSON here")
flags.DEFINE_string("worker", "", "internal: run one method in this process")
flags.DEFINE_integer("timeout", 1800, "seconds per method subprocess")
flags.DEFINE_bool("single_thread", True,
                  "run PyTorch and XLA:CPU on one thread each (see module doc)")

ALL_METHODS = ("rlnas_jit", "jit_rbg", "jit_host", "jit_pcache", "jit_O0",
               "jit_noopt", "jit_bg", "eager", "layerwise", "layerwise_b5",
               "layerwise_b35", "layerwise_pcache")


# ----------------------------------------------------------------------------
# Settings: space, data, child config. Imports of jax happen in workers only,
# after the process-wide options are set.


def _default_config():
  spec = importlib.util.spec_from_file_location(
      "default_config", os.path.join(_ROOT, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def make_setting(name):
  """(space, dataset, child cfg, augment cfg) of a setting."""
  from rlnas import data as data_lib
  from rlnas.spaces import nasrl_cnn
  config = _default_config()
  cfg = config.child
  augment = config.data.augment
  if name == "issue":
    space = nasrl_cnn.NASRLCNNSpace(4, (1, 3, 5), (1, 3, 5), (1,), (1,),
                                    (8, 16, 32), skip_connections=False)
    cfg.batch_size, cfg.epochs = 128, 3
    dataset = data_lib.load(config.data)
  elif name == "default":
    space = nasrl_cnn.NASRLCNNSpace.from_config(config.space)
    dataset = data_lib.load(config.data)
  elif name == "cifar_like":
    space = nasrl_cnn.NASRLCNNSpace(3, (1, 3, 5, 7), (1, 3, 5, 7), (1,), (1,),
                                    (24, 36, 48, 64), skip_connections=True)
    cfg.batch_size, cfg.epochs = 16, 1
    dataset = synthetic_images(num_train=1600, num_val=320)
  else:
    raise ValueError(f"unknown setting {name!r}")
  return space, dataset, cfg, augment


def synthetic_images(num_train, num_val, size=32, channels=3, classes=10, seed=0):
  """Learnable 32x32x3 uint8 images: a smooth class template, shifted, plus noise."""
  from rlnas import data as data_lib
  rng = np.random.default_rng(seed)
  freq = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None] ** 2
  low = np.exp(-freq * 200.0)[..., None]
  templates = np.real(np.fft.ifft2(
      np.fft.fft2(rng.standard_normal((classes, size, size, channels)), axes=(1, 2))
      * low, axes=(1, 2)))
  templates /= templates.std()

  def split(n):
    labels = rng.integers(0, classes, n).astype(np.int32)
    shifts = rng.integers(-3, 4, (n, 2))
    x = np.stack([np.roll(templates[c], tuple(s), axis=(0, 1))
                  for c, s in zip(labels, shifts)])
    x = x + 6.0 * rng.standard_normal(x.shape)
    return np.clip(x * 40 + 128, 0, 255).astype(np.uint8), labels

  (xt, yt), (xv, yv) = split(num_train), split(num_val)
  mean = xt.reshape(-1, channels).mean(0).astype(np.float32)
  std = xt.reshape(-1, channels).std(0).astype(np.float32)
  return data_lib.Dataset(
      train=data_lib.Split(xt, yt), validation=data_lib.Split(xv, yv), test=None,
      num_classes=classes, input_shape=(size, size, channels), mean=mean,
      std=std, name="synthetic_cifar_like")


def sample_archs(space, num, seed):
  import jax
  tokens = np.asarray(space.random_tokens(jax.random.PRNGKey(seed), num))
  return [space.from_tokens(t) for t in tokens]


# ----------------------------------------------------------------------------
# PyTorch eager reference.


def torch_available():
  try:
    import torch  # pylint: disable=unused-import,import-outside-toplevel
    return True
  except ImportError:
    return False


class TorchRunner:
  """NASRLConvNet mirrored in PyTorch: same layers, init distributions, Adam."""

  def __init__(self, dataset, cfg):
    import torch
    if FLAGS.single_thread:
      torch.set_num_threads(1)
    self.torch = torch
    self.cfg = cfg
    self.dataset = dataset
    to_x = lambda im: torch.from_numpy(np.ascontiguousarray(
        ((im.astype(np.float32) - dataset.mean) / dataset.std).transpose(0, 3, 1, 2)))
    self.x = to_x(dataset.train.images)
    self.y = torch.from_numpy(dataset.train.labels.astype(np.int64))
    self.vx = to_x(dataset.validation.images)
    self.vy = torch.from_numpy(dataset.validation.labels.astype(np.int64))

  def build(self, arch, seed):
    torch, nn = self.torch, self.torch.nn
    from rlnas.child import cnn
    layers = arch.details
    in_ch = self.dataset.input_shape[-1]
    cfg = self.cfg
    gen = np.random.default_rng(seed)

    def lecun(shape, fan_in):  # Flax's truncated LeCun normal.
      z = gen.standard_normal(shape)
      while (np.abs(z) > 2).any():
        bad = np.abs(z) > 2
        z[bad] = gen.standard_normal(int(bad.sum()))
      return torch.from_numpy((z * math.sqrt(1 / fan_in) / 0.8796256610342398)
                              .astype(np.float32))

    depth = []
    convs, bns = nn.ModuleList(), nn.ModuleList()
    for layer in layers:
      assert layer.stride_height == layer.stride_width == 1
      cin = sum(depth[j] for j in layer.inputs) if layer.inputs else in_ch
      conv = nn.Conv2d(cin, layer.num_filters,
                       (layer.filter_height, layer.filter_width),
                       padding="same", bias=cfg.use_bias)
      with torch.no_grad():
        kh, kw = layer.filter_height, layer.filter_width
        conv.weight.copy_(lecun((layer.num_filters, cin, kh, kw), kh * kw * cin))
        if cfg.use_bias:
          conv.bias.zero_()
      convs.append(conv)
      bns.append(nn.BatchNorm2d(layer.num_filters, eps=1e-5,
                                momentum=1 - cfg.bn_momentum))
      depth.append(layer.num_filters)
    head_inputs = cnn.unconsumed(layers)
    dense = nn.Linear(sum(depth[j] for j in head_inputs), self.dataset.num_classes)
    with torch.no_grad():
      dense.weight.copy_(lecun(tuple(dense.weight.shape), dense.weight.shape[1]))
      dense.bias.zero_()

    def pad_cat(ts):
      if len(ts) == 1:
        return ts[0]
      h = max(t.shape[2] for t in ts)
      w = max(t.shape[3] for t in ts)
      return torch.cat([nn.functional.pad(t, (0, w - t.shape[3], 0, h - t.shape[2]))
                        for t in ts], 1)

    class Net(nn.Module):

      def __init__(self):
        super().__init__()
        self.convs, self.bns, self.dense = convs, bns, dense

      def forward(self, x):
        outs = []
        for i, layer in enumerate(layers):
          inp = pad_cat([outs[j] for j in layer.inputs]) if layer.inputs else x
          outs.append(torch.relu(self.bns[i](self.convs[i](inp))))
        feats = pad_cat([outs[j] for j in head_inputs])
        return self.dense(feats.mean((2, 3)) if cfg.head == "gap" else feats.flatten(1))

    return Net()

  def train_and_evaluate(self, arch, seed):
    torch = self.torch
    cfg = self.cfg
    start = time.perf_counter()
    net = self.build(arch, seed)
    kernels = [p for n, p in net.named_parameters() if p.dim() > 1]
    others = [p for n, p in net.named_parameters() if p.dim() <= 1]
    assert cfg.optimizer == "adam" and cfg.lr_schedule == "constant"
    # optax.chain(add_decayed_weights(wd, kernels), adam): L2 added to the
    # gradient before Adam, which is what torch's Adam weight_decay does.
    opt = torch.optim.Adam([{"params": kernels, "weight_decay": cfg.weight_decay},
                            {"params": others, "weight_decay": 0.0}],
                           lr=cfg.learning_rate, eps=1e-8)
    n = len(self.y)
    batch = min(cfg.batch_size, n)
    steps = n // batch
    gen = np.random.default_rng(seed)
    accs = []
    for _ in range(cfg.epochs):
      net.train()
      perm = torch.from_numpy(gen.permutation(n)[:steps * batch].reshape(steps, batch))
      for s in range(steps):
        idx = perm[s]
        loss = torch.nn.functional.cross_entropy(net(self.x[idx]), self.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
      net.eval()
      with torch.no_grad():
        accs.append(float((net(self.vx).argmax(1) == self.vy).float().mean()))
    return {"wall": time.perf_counter() - start, "compile": 0.0,
            "acc": accs[-1], "accs": accs}


# ----------------------------------------------------------------------------
# JAX methods.


def host_init(model, input_shape, seed):
  """Flax default initializers drawn with numpy: no compilation."""
  import jax
  from rlnas.child import layer_units
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), np.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  gen = np.random.default_rng(seed)

  def init(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (layer_units.truncated_normal(gen, leaf.shape) * math.sqrt(1 / fan_in)
              / layer_units.TRUNCATED_NORMAL_STD).astype(np.float32)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)
  return jax.tree_util.tree_map_with_path(init, shapes)


class JitRunner:
  """rlnas's jitted step per architecture, with its compile phase split off.

  Uses the lead's step functions (trainer._train_step / _eval_step) so that the
  only differences from `rlnas_jit` are initialisation and compile policy.
  """

  def __init__(self, dataset, cfg, augment_cfg):
    import jax
    import jax.numpy as jnp
    from rlnas.child import trainer
    self.jax, self.jnp, self.trainer = jax, jnp, trainer
    self.dataset, self.cfg = dataset, cfg
    self.augment = trainer._Static(  # pylint: disable=protected-access
        {"random_crop_padding": int(augment_cfg.random_crop_padding),
         "horizontal_flip": bool(augment_cfg.horizontal_flip)})
    train, val = dataset.train, dataset.validation
    self.n = len(train.labels)
    self.batch = min(cfg.batch_size, self.n)
    self.steps = self.n // self.batch
    self.mean, self.std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)
    self.images, self.labels = jax.device_put(train.images), jax.device_put(train.labels)
    self.v = jax.device_put(trainer._padded_batches(  # pylint: disable=protected-access
        val.images, val.labels, cfg.eval_batch_size))
    self.tx = trainer.make_optimizer(cfg, self.steps * cfg.epochs)

  def compile(self, model, seed):
    """(state, step executable, eval executable, compile seconds)."""
    jax, trainer = self.jax, self.trainer
    start = time.perf_counter()
    variables = host_init(model, self.dataset.input_shape, seed)
    state = trainer.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                      batch_stats=variables.get("batch_stats", {}),
                                      tx=self.tx)
    idx = jax.ShapeDtypeStruct((self.batch,), np.int32)
    key = jax.random.PRNGKey(0)
    step_c = jax.jit(trainer._train_step, static_argnums=7, donate_argnums=0).lower(  # pylint: disable=protected-access
        state, self.images, self.labels, idx, key, self.mean, self.std,
        self.augment).compile()
    v_images, v_labels, v_mask = self.v
    eval_c = jax.jit(trainer._eval_step).lower(  # pylint: disable=protected-access
        state, v_images[0], v_labels[0], v_mask[0], self.mean, self.std).compile()
    return state, step_c, eval_c, time.perf_counter() - start

  def run(self, compiled, seed):
    jax, jnp = self.jax, self.jnp
    state, step_c, eval_c, _ = compiled
    start = time.perf_counter()
    rng = jax.random.PRNGKey(seed)
    accs = []
    v_images, v_labels, v_mask = self.v
    for epoch in range(self.cfg.epochs):
      perm = jax.random.permutation(jax.random.fold_in(rng, epoch), self.n)
      perm = perm[:self.steps * self.batch].reshape(self.steps, self.batch).astype(jnp.int32)
      losses = []
      for s in range(self.steps):
        state, loss = step_c(state, self.images, self.labels, perm[s],
                             jax.random.fold_in(rng, s), self.mean, self.std)
        losses.append(loss)
      float(jnp.stack(losses).mean())
      correct = sum(int(eval_c(state, v_images[b], v_labels[b], v_mask[b],
                               self.mean, self.std)) for b in range(v_images.shape[0]))
      accs.append(correct / len(self.dataset.validation.labels))
    return accs, time.perf_counter() - start

  def train_and_evaluate(self, model, seed):
    start = time.perf_counter()
    compiled = self.compile(model, seed)
    accs, train = self.run(compiled, seed)
    return {"wall": time.perf_counter() - start, "compile": compiled[3],
            "train": train, "acc": accs[-1], "accs": accs}


class EagerRunner:
  """Op-by-op JAX: no outer jit; each primitive is compiled once per shape."""

  def __init__(self, dataset, cfg, augment_cfg):
    import jax
    import jax.numpy as jnp
    import optax
    from rlnas import data as data_lib
    from rlnas.child import trainer
    del augment_cfg  # The settings here do not augment.
    self.jax, self.jnp, self.optax, self.data_lib = jax, jnp, optax, data_lib
    self.dataset, self.cfg = dataset, cfg
    self.n = len(dataset.train.labels)
    self.batch = min(cfg.batch_size, self.n)
    self.steps = self.n // self.batch
    self.tx = trainer.make_optimizer(cfg, self.steps * cfg.epochs)
    self.x = data_lib.preprocess(dataset.train.images, dataset.mean, dataset.std)
    self.y = jnp.asarray(dataset.train.labels)
    self.vx = data_lib.preprocess(dataset.validation.images, dataset.mean, dataset.std)
    self.vy = jnp.asarray(dataset.validation.labels)

  def train_and_evaluate(self, model, seed):
    jax, jnp, optax = self.jax, self.jnp, self.optax
    start = time.perf_counter()
    variables = host_init(model, self.dataset.input_shape, seed)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = self.tx.init(params)
    gen = np.random.default_rng(seed)

    def loss_fn(p, stats, x, y):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accs = []
    for _ in range(self.cfg.epochs):
      perm = gen.permutation(self.n)[:self.steps * self.batch].reshape(self.steps, self.batch)
      for s in range(self.steps):
        idx = perm[s]
        (loss, upd), grads = grad_fn(params, stats, self.x[idx], self.y[idx])
        stats = upd["batch_stats"]
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
      float(loss)
      logits = model.apply({"params": params, "batch_stats": stats}, self.vx, train=False)
      accs.append(float((logits.argmax(-1) == self.vy).mean()))
    return {"wall": time.perf_counter() - start, "compile": float("nan"),
            "acc": accs[-1], "accs": accs}


def run_worker(method):
  """Runs one method (+ interleaved torch reference); prints JSON records."""
  if method in ("jit_rbg",):
    os.environ["JAX_DEFAULT_PRNG_IMPL"] = "unsafe_rbg"
  if FLAGS.single_thread:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false"
                               + " intra_op_parallelism_threads=1")
  if method == "jit_O0":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0")
  import jax
  if method == "jit_noopt":
    jax.config.update("jax_disable_most_optimizations", True)
  cache_dir = None
  if method in ("jit_pcache", "layerwise_pcache"):
    cache_dir = tempfile.mkdtemp(prefix="rlnas_pcache_")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  from rlnas.child import cnn
  from rlnas.child import layerwise
  from rlnas.child import trainer

  space, dataset, cfg, augment_cfg = make_setting(FLAGS.setting)
  archs = sample_archs(space, FLAGS.num_archs, FLAGS.arch_seed)
  warmup = sample_archs(space, 1, FLAGS.arch_seed + 1000)[0]
  model_of = lambda arch: cnn.NASRLConvNet(arch.details, dataset.num_classes,
                                           cfg.head, cfg.use_bias, cfg.bn_momentum)
  ref = TorchRunner(dataset, cfg) if torch_available() else None

  def timed(train_and_evaluate, **kwargs):
    """train(arch, seed) of an rlnas engine, as a record."""
    def train(arch, seed):
      start = time.perf_counter()
      r = train_and_evaluate(model_of(arch), dataset, cfg, augment_cfg,
                             jax.random.PRNGKey(seed), **kwargs)
      return {"wall": time.perf_counter() - start, "compile": r.compile_seconds,
              "train": r.train_seconds, "acc": r.val_accuracies[-1],
              "accs": r.val_accuracies}
    return train

  if method in ("rlnas_jit", "jit_rbg"):  # jit_rbg: the PRNG is set by the env above.
    train = timed(trainer.train_and_evaluate)
  elif method in ("jit_host", "jit_pcache", "jit_O0", "jit_noopt"):
    runner = JitRunner(dataset, cfg, augment_cfg)
    train = lambda arch, seed: runner.train_and_evaluate(model_of(arch), seed)
  elif method == "eager":
    runner = EagerRunner(dataset, cfg, augment_cfg)
    train = lambda arch, seed: runner.train_and_evaluate(model_of(arch), seed)
  elif method.startswith("layerwise"):
    bucketing = {"layerwise_b5": layerwise.Bucketing((5,), True),
                 "layerwise_b35": layerwise.Bucketing((3, 5), True)}.get(
                     method, layerwise.Bucketing())
    train = timed(layerwise.train_and_evaluate, bucketing=bucketing)
  elif method == "jit_bg":
    train = None
  else:
    raise ValueError(f"unknown method {method!r}")

  def emit(record):
    print("RECORD " + json.dumps(record), flush=True)

  def reference(arch, seed, pass_name, i):
    if ref is None:
      return
    r = ref.train_and_evaluate(arch, seed)
    emit({"method": "torch", "pass": pass_name, "arch": i, "with": method, **r})

  # Warm-up on an architecture outside the list: process-level one-off costs
  # (backend start, data transfer, shared small executables) are excluded.
  if ref is not None:
    ref.train_and_evaluate(warmup, 999)
  if method == "jit_bg":
    runner = JitRunner(dataset, cfg, augment_cfg)
    runner.train_and_evaluate(model_of(warmup), 999)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(runner.compile, model_of(archs[0]), 0)

    def settle():
      # The reference must not overlap a background compile: finish it first
      # and charge the wait to the method.
      start = time.perf_counter()
      future.result()
      return time.perf_counter() - start

    for i, arch in enumerate(archs):
      settled = 0.0
      if i % 2:
        settled += settle()
        reference(arch, i, "main", i)
      start = time.perf_counter()
      compiled = future.result()
      waited = time.perf_counter() - start
      if i + 1 < len(archs):
        future = pool.submit(runner.compile, model_of(archs[i + 1]), i + 1)
      accs, train_s = runner.run(compiled, i)
      wall = time.perf_counter() - start
      if not i % 2:
        settled += settle()
        reference(arch, i, "main", i)
      emit({"method": method, "pass": "main", "arch": i, "wall": wall + settled,
            "compile": waited + settled, "train": train_s,
            "compile_in_background": compiled[3], "acc": accs[-1], "accs": accs})
    return

  train(warmup, 999)
  passes = ["main"]
  if method in ("jit_pcache", "layerwise_pcache"):
    passes = ["cold", "warm"]
  for pass_name in passes:
    if pass_name == "warm":
      jax.clear_caches()
      layerwise.clear_cache()
    for i, arch in enumerate(archs):
      # Alternate the order so that neither side always follows the other.
      if i % 2:
        reference(arch, i, pass_name, i)
      r = train(arch, i)
      emit({"method": method, "pass": pass_name, "arch": i, **r})
      if not i % 2:
        reference(arch, i, pass_name, i)
  if method.startswith("layerwise"):
    engines = list(layerwise._ENGINES.values())  # pylint: disable=protected-access
    emit({"method": method, "pass": passes[-1], "num_compiled":
          engines[0].num_compiled if engines else {}})
  if cache_dir:
    emit({"method": method, "pass": "cache", "cache_files": len(os.listdir(cache_dir))})


# ----------------------------------------------------------------------------
# Driver.


def summarize(records):
  """Rows: method/pass -> archs/min, overhead, train, acc, torch ratio."""
  rows = []
  groups = {}
  for r in records:
    if "arch" not in r:
      continue
    key = (r["with"], r["pass"], "torch") if r["method"] == "torch" else (
        r["method"], r["pass"], "method")
    groups.setdefault(key, []).append(r)
  for (method, pass_name, side), rs in sorted(groups.items()):
    if side != "method":
      continue
    ref = groups.get((method, pass_name, "torch"), [])
    wall = sum(r["wall"] for r in rs)
    train = [r["train"] for r in rs if "train" in r]
    train_per = np.mean(train) if train else float("nan")
    row = {
        "method": method if pass_name == "main" else f"{method} ({pass_name})",
        "archs_per_min": 60 * len(rs) / wall,
        "overhead_s": (wall / len(rs) - train_per) if train else float("nan"),
        "train_s": train_per,
        "acc": float(np.mean([r["acc"] for r in rs])),
        "n": len(rs),
    }
    if ref:
      by_arch = {r["arch"]: r for r in ref}
      pairs = [(r, by_arch[r["arch"]]) for r in rs if r["arch"] in by_arch]
      # Per-architecture ratios against the reference trained right next to
      # it: robust to the load drifting over a run.
      row["median_wall_over_torch"] = float(np.median(
          [r["wall"] / t["wall"] for r, t in pairs]))
      if train:
        row["median_train_over_torch"] = float(np.median(
            [r["train"] / t["wall"] for r, t in pairs]))
      ref_wall = sum(r["wall"] for r in ref)
      row["torch_archs_per_min"] = 60 * len(ref) / ref_wall
      row["torch_acc"] = float(np.mean([r["acc"] for r in ref]))
      row["speed_vs_torch"] = (60 * len(rs) / wall) / row["torch_archs_per_min"]
    rows.append(row)
  return rows


def print_table(rows):
  nan = float("nan")
  print("| method | archs/min | torch archs/min (same process) | speed vs torch "
        "| median wall / torch wall | median train / torch wall "
        "| overhead/arch s | train/arch s | val acc | torch val acc |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['archs_per_min']:.1f} | "
          f"{r.get('torch_archs_per_min', nan):.1f} | "
          f"{r.get('speed_vs_torch', nan):.2f} | "
          f"{r.get('median_wall_over_torch', nan):.2f} | "
          f"{r.get('median_train_over_torch', nan):.2f} | {r['overhead_s']:.3f} | "
          f"{r['train_s']:.3f} | {r['acc']:.3f} | {r.get('torch_acc', nan):.3f} |")


def main(argv):
  del argv
  if FLAGS.worker:
    run_worker(FLAGS.worker)
    return
  records = []
  for method in FLAGS.methods.split(","):
    if method not in ALL_METHODS:
      raise app.UsageError(f"unknown method {method!r}; known: {ALL_METHODS}")
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={method}",
           f"--setting={FLAGS.setting}", f"--num_archs={FLAGS.num_archs}",
           f"--arch_seed={FLAGS.arch_seed}"]
    start = time.perf_counter()
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT,
                            timeout=FLAGS.timeout, check=False)
      out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
      out, err, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout", -1
    got = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RECORD ")]
    records.extend(got)
    print(f"[{method}] exit {code}, {len(got)} records, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    if code != 0:
      print(err[-3000:], flush=True)
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump({"setting": FLAGS.setting, "num_archs": FLAGS.num_archs,
                   "records": records}, f)
  rows = summarize(records)
  print_table(rows)
  for r in records:
    if "num_compiled" in r or "cache_files" in r or "total_wall" in r:
      print(r)


if __name__ == "__main__":
  app.run(main)
