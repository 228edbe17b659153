"""Layer-wise compiled child training: each layer shape compiles once per search.

Why: on XLA:CPU, jitting a whole child per architecture costs seconds of
compilation per child (plus more for a jitted threefry init), 10x more than
training a digits child (bench/child_study.md). But a search builds its
children from few distinct layers, and a layer's compiled code depends only on
its *signature*: its hyperparameters and its input shape. This engine splits
every NAS-RL layer into a convolution unit and a bias-BatchNorm-ReLU unit and
compiles, once per signature and for the whole search:

- `forward`: the unit's training-mode output (and new batch statistics); the
  BatchNorm unit also returns its VJP residuals (the closure `jax.vjp`
  returns is a pytree, so it leaves one executable and enters the next),
  while a convolution's residuals are just its inputs, which its backward
  takes again;
- `backward`: the VJP of the output gradient, the optimizer update of the
  unit's parameters, and the input gradient. Optax transforms
  that act leaf by leaf (SGD, momentum, Adam, masked weight decay, step-count
  schedules) give the same update applied unit by unit as applied to the whole
  tree; transforms that mix leaves (global-norm clipping) do not, and this
  engine does not support them;
- the classifier's fused forward + loss + backward + update, the evaluation
  forwards, the depth concatenation of several inputs and the input pipeline.

Convolution signatures are the numerous ones (kernel x input depth x filters);
keeping BatchNorm out of them halves their compile time, and evaluating in
training-sized batches lets evaluation reuse the training convolutions.

A training step chains these executables in Python: four dispatches per
layer (a few microseconds of Python each; almost all of a step is the
executables' own run time).
Parameters are initialised on the host with Flax's default initializers
(LeCun normal kernels, zero biases, unit BatchNorm scales), so initialisation
compiles nothing. Executables live in a `signature_cache.SignatureCache`;
`precompile` lowers a batch of children from shapes alone in a background
thread and compiles them in parallel threads while earlier children train.
Several children can train at once from several threads (the search does
one per CPU core). Measured on configs/default.py (96 uniformly sampled
children, 2-core CPU, bench/child_study.md): 7.4x the children per minute of
the jit-per-child trainer, 0.56x PyTorch eager's.

Bucketing (optional, off by default) makes signatures rarer: a kernel is
zero-padded to a larger odd size and multiplied by a 0/1 mask inside the
convolution, and input depth is zero-padded to a power of two. Both are exact:
masked weights get zero gradient, and weights that read zero channels get zero
gradient, so the child computes the same function and the same updates as
unpadded (tested), at the price of the padded arithmetic. With compilation in
the background it measured slower than exact shapes.

Children train with the same data order, augmentation keys, optimizer, NaN
check and `TrainResult` as `trainer.train_and_evaluate`. Parameters come from
the same distributions but not the same draws (numpy, seeded by the child key).

Typical use (drop-in for `trainer.train_and_evaluate` on NAS-RL CNN children):

  models = [child.build_model(a, dataset.num_classes, config.child) for a in archs]
  layerwise.precompile(models, dataset, config.child)  # Whole batch, background.
  for model, rng in zip(models, rngs):
    result = layerwise.train_and_evaluate(model, dataset, config.child,
                                          config.data.augment, rng)
"""

import concurrent.futures
import json
import math
import threading
import time
from typing import Callable, Hashable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlnas import data as data_lib
from rlnas.child import layer_units
from rlnas.child import signature_cache
from rlnas.child import trainer
# The units and layouts the engine runs, re-exported as part of its API.
from rlnas.child.layer_units import (  # pylint: disable=unused-import
    Bucketing, BiasNormReLU, Classifier, MaskedConv, Node, assemble, nodes_from_model)

class LayerwiseEngine:
  """Trains children unit by unit with executables cached by signature.

  One engine holds one optimizer (it is compiled into the backward functions);
  keep it for the whole search so that its cache fills once.

  Executables live in a `SignatureCache`: `precompile` lowers every one some
  children need (from shapes alone) and compiles the missing ones in parallel
  threads while the caller goes on; a training step blocks only on the
  executables it uses.

  Per-node variables are dicts of lists: a layer has "conv": [params,
  opt_state] and "norm": [params, state, opt_state]; the classifier has
  "head": [params, opt_state].

  Attributes:
    tx: the optimizer.
    cache: the compiled executables.
  """

  def __init__(self, optimizer: optax.GradientTransformation,
               bucketing: Bucketing = Bucketing(),
               compile_threads: Optional[int] = None):
    self.tx = optimizer
    self.bucketing = bucketing
    self.cache = signature_cache.SignatureCache(compile_threads)
    self.variables = layer_units.HostVariables(optimizer)
    self._masks: dict[Hashable, jax.Array] = {}
    # Optimizer states are built on the host as zeros of tx.init's shapes;
    # that is what every optax transform above returns, but check.
    probe = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    if any(np.any(np.asarray(leaf) != 0)
           for leaf in jax.tree_util.tree_leaves(self.tx.init(probe))):
      raise ValueError("the layer-wise engine needs an optimizer whose initial "
                       "state is all zeros (sgd, momentum, adam, weight decay)")

  @property
  def compile_seconds(self) -> float:
    return self.cache.compile_seconds

  @property
  def num_compiled(self) -> dict[str, int]:
    return self.cache.num_compiled

  @property
  def wait_seconds(self) -> float:
    """Seconds the calling thread spent lowering or blocked on compiles."""
    return self.cache.wait_seconds

  def _call(self, key: tuple, make_fn: Callable[[], Callable], *args):
    return self.cache.call(key, make_fn, *args)

  def _add(self, a, b):
    return a if self.cache.is_abstract else a + b

  def _zeros_like(self, a):
    return a if self.cache.is_abstract else jnp.zeros_like(a)

  def precompile(self, children: Sequence[Sequence[Node]],
                 input_shape: tuple[int, ...], batch_size: int, *,
                 background: bool = False, wait: bool = False
                 ) -> Optional[concurrent.futures.Future]:
    """Starts compiling every executable these children need that is missing.

    Runs the training step and the evaluation on ShapeDtypeStructs inside
    `cache.abstract()`: lowering (tracing) runs in the calling thread, or with
    `background` in the cache's lowering thread (this then returns its future
    at once); XLA compilation runs in the cache's compile threads.

    Args:
      children: node lists from `nodes_from_model`.
      input_shape: per-example image shape [H, W, C] (1D: [1, L, C]).
      batch_size: training (and evaluation) batch size.
      background: lower in the background thread; returns its future.
      wait: block until everything is compiled (ignored with `background`).
    """
    if background:
      return self.cache.in_background(self.precompile, children, input_shape,
                                      batch_size)
    sds = jax.ShapeDtypeStruct
    x = sds((batch_size,) + tuple(input_shape), jnp.float32)
    labels = sds((batch_size,), jnp.int32)
    valid = sds((batch_size,), jnp.bool_)
    with self.cache.abstract():
      for nodes in children:
        try:
          variables = self.variables.variable_shapes(nodes, input_shape)
          self.train_step(nodes, variables, x, labels)
          self.eval_correct(nodes, variables, x, labels, valid)
        except Exception:  # pylint: disable=broad-except
          # An unbuildable child fails when it is trained (the evaluator
          # records it); the other children still compile ahead.
          continue
    if wait:
      self.cache.wait_all()
    return None

  def init(self, nodes: Sequence[Node], input_shape: tuple[int, ...],
           seed: Sequence[int]) -> list[dict]:
    """A child's per-node variables, drawn on the host (`HostVariables.init`)."""
    return self.variables.init(nodes, input_shape, seed)

  def _mask(self, node: Node) -> Optional[jax.Array]:
    """[kh, kw, 1, 1] ones over the real kernel, centred in the padded one;
    None for an unpadded kernel."""
    padded = node.conv.kernel_size
    if padded == node.kernel:
      return None
    key = (node.kernel, padded)
    if key not in self._masks:
      mask = np.zeros(padded + (1, 1), np.float32)
      top, left = (padded[0] - node.kernel[0]) // 2, (padded[1] - node.kernel[1]) // 2
      mask[top:top + node.kernel[0], left:left + node.kernel[1]] = 1.0
      self._masks[key] = jax.device_put(mask)
    return self._masks[key]


  # -- Compiled units. ----------------------------------------------------------

  def _update(self, grads, opt_state, params):
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def _conv_forward(self, node: Node, params, x):
    """The convolution's output z. No VJP residuals: a convolution's are its
    inputs, which the backward takes again (bench/conv_kernels.py: the same
    speed as passing `jax.vjp`'s closure, and the forward's signature no
    longer depends on whether the input needs a gradient)."""
    conv = node.conv
    make = lambda: lambda params, mask, x: conv.apply({"params": params}, x, mask)
    mask = self._mask(node)
    return self._call(("conv_forward", conv, mask is None, x.shape), make,
                      params, mask, x)

  def _conv_backward(self, node: Node, x, gz, params, opt_state, input_grad: bool):
    """(input gradient or None, params, opt_state)."""
    conv = node.conv

    def make():
      def backward(params, mask, x, gz, opt_state):
        f = lambda p, x: conv.apply({"params": p}, x, mask)
        if input_grad:
          g_params, gx = jax.vjp(f, params, x)[1](gz)
        else:
          (g_params,), gx = jax.vjp(lambda p: f(p, x), params)[1](gz), None
        params, opt_state = self._update(g_params, opt_state, params)
        return gx, params, opt_state
      return backward
    mask = self._mask(node)
    return self._call(("conv_backward", conv, mask is None, x.shape, input_grad),
                      make, params, mask, x, gz, opt_state)

  def _norm_forward(self, node: Node, params, state, z):
    """(y, new state, vjp of (params, z))."""
    module = node.module

    def make():
      def forward(params, state, z):
        f = lambda p, z: module.apply({"params": p, **state}, z, train=True,
                                      mutable=list(state))
        y, vjp, new_state = jax.vjp(f, params, z, has_aux=True)
        return y, new_state, vjp
      return forward
    return self._call(("norm_forward", module, z.shape), make, params, state, z)

  def _norm_backward(self, node: Node, vjp, gy, params, opt_state):
    def make():
      def backward(vjp, gy, params, opt_state):
        g_params, gz = vjp(gy)
        params, opt_state = self._update(g_params, opt_state, params)
        return gz, params, opt_state
      return backward
    return self._call(("norm_backward", node.module, gy.shape), make,
                      vjp, gy, params, opt_state)

  def _norm_eval(self, node: Node, params, state, z):
    module = node.module
    make = lambda: lambda p, s, z: module.apply({"params": p, **s}, z, train=False)
    return self._call(("norm_eval", module, z.shape), make, params, state, z)

  def _classifier_step(self, node: Node, params, opt_state, x, labels,
                       input_grad: bool):
    """Fused head forward, mean cross-entropy, backward and update."""
    module = node.module

    def make():
      def step(params, opt_state, x, labels):
        def loss_fn(p, x):
          logits = module.apply({"params": p}, x)
          return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        if input_grad:
          loss, (g_params, gx) = jax.value_and_grad(loss_fn, (0, 1))(params, x)
        else:
          (loss, g_params), gx = jax.value_and_grad(loss_fn)(params, x), None
        params, opt_state = self._update(g_params, opt_state, params)
        return loss, gx, params, opt_state
      return step
    return self._call(("classifier_step", module, x.shape, input_grad), make,
                      params, opt_state, x, labels)

  def _classifier_correct(self, node: Node, params, x, labels, valid):
    module = node.module

    def make():
      def correct(params, x, labels, valid):
        logits = module.apply({"params": params}, x)
        return ((logits.argmax(-1) == labels) & valid).sum()
      return correct
    return self._call(("classifier_correct", module, x.shape), make,
                      params, x, labels, valid)

  def _merge(self, xs, in_depth: int):
    """Depth concatenation (padded to in_depth) and its VJP."""
    merge = layer_units.merge_fn(in_depth)
    key = ("merge", tuple(x.shape for x in xs), in_depth)
    return self._call(key, lambda: lambda xs: jax.vjp(merge, xs), xs)

  def _merge_backward(self, shapes, in_depth, vjp, g):
    key = ("merge_backward", shapes, in_depth)
    return self._call(key, lambda: lambda vjp, g: vjp(g)[0], vjp, g)

  def _node_input(self, node: Node, outputs, x):
    """(node input, merge VJP or None); merges only when needed."""
    if not node.inputs:
      return x, None
    xs = tuple(outputs[j] for j in node.inputs)
    if len(xs) == 1 and xs[0].shape[-1] == node.in_depth:
      return xs[0], None
    return self._merge(xs, node.in_depth)

  def _prepare(self, images, labels, perm, epoch, step, rng, mean, std,
               augment: tuple[int, bool]):
    """The step's batch images[perm[step]]: preprocessed, augmented [B, ...]."""
    crop, flip = augment

    def make():
      def prepare(images, labels, perm, epoch, step, rng, mean, std):
        idx = perm[step]
        x = data_lib.preprocess(images[idx], mean, std)
        # Same key schedule as trainer.train_and_evaluate.
        rng = jax.random.fold_in(jax.random.fold_in(rng, epoch), step)
        x = data_lib.augment(rng, x, random_crop_padding=crop, horizontal_flip=flip)
        return layer_units.as_image(x), labels[idx]
      return prepare
    args = (images, labels, perm, epoch, step, rng, mean, std)
    key = ("prepare",) + tuple((a.shape, a.dtype) for a in args) + (augment,)
    return self._call(key, make, *args)

  def _prepare_eval(self, images, mean, std):
    make = lambda: lambda x, m, s: layer_units.as_image(data_lib.preprocess(x, m, s))
    return self._call(("prepare_eval", images.shape, images.dtype), make,
                      images, mean, std)

  # -- One child. -------------------------------------------------------------

  def train_step(self, nodes: Sequence[Node], variables: list[dict],
                 x: jax.Array, labels: jax.Array) -> jax.Array:
    """One optimizer step on a batch; updates `variables` in place.

    Args:
      nodes: the child (`nodes_from_model`); the last node gives logits.
      variables: per-node variables from `init`.
      x: [B, H, W, C] preprocessed inputs.
      labels: [B] int32 class ids.

    Returns:
      The batch's mean loss, a device scalar (not synchronised).
    """
    num = len(nodes)
    outputs = []
    inputs, norm_vjps, merge_vjps = ([None] * num for _ in range(3))
    for i, node in enumerate(nodes[:-1]):
      inp, merge_vjps[i] = self._node_input(node, outputs, x)
      inputs[i] = inp
      conv, norm = variables[i]["conv"], variables[i]["norm"]
      z = self._conv_forward(node, conv[0], inp)
      y, norm[1], norm_vjps[i] = self._norm_forward(node, norm[0], norm[1], z)
      outputs.append(y)
    head = nodes[-1]
    inp, merge_vjps[-1] = self._node_input(head, outputs, x)
    params, opt_state = variables[-1]["head"]
    loss, g_in, *variables[-1]["head"] = self._classifier_step(
        head, params, opt_state, inp, labels, bool(head.inputs))

    grads = [None] * num
    grads[-1] = g_in
    for i in range(num - 1, -1, -1):
      node = nodes[i]
      if i < num - 1:
        gy = grads[i]
        if gy is None:  # Feeds nothing that reaches the loss.
          gy = self._zeros_like(outputs[i])
        conv, norm = variables[i]["conv"], variables[i]["norm"]
        gz, norm[0], norm[2] = self._norm_backward(node, norm_vjps[i], gy,
                                                   norm[0], norm[2])
        grads[i], conv[0], conv[1] = self._conv_backward(
            node, inputs[i], gz, conv[0], conv[1],
            bool(node.inputs))
      if not node.inputs:
        continue
      if merge_vjps[i] is not None:
        g_inputs = self._merge_backward(tuple(outputs[j].shape for j in node.inputs),
                                        node.in_depth, merge_vjps[i], grads[i])
      else:
        g_inputs = (grads[i],)
      for j, g in zip(node.inputs, g_inputs):
        grads[j] = g if grads[j] is None else self._add(grads[j], g)
    return loss

  def eval_correct(self, nodes: Sequence[Node], variables: list[dict],
                   x: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Correct predictions among the valid examples of x [B, ...]: int32 [].

    Runs the training convolutions and merges (their VJPs unused): with
    evaluation batches of the training batch size it compiles nothing new
    for them.
    """
    outputs = []
    for i, node in enumerate(nodes[:-1]):
      inp, _ = self._node_input(node, outputs, x)
      z = self._conv_forward(node, variables[i]["conv"][0], inp)
      norm = variables[i]["norm"]
      outputs.append(self._norm_eval(node, norm[0], norm[1], z))
    inp, _ = self._node_input(nodes[-1], outputs, x)
    return self._classifier_correct(nodes[-1], variables[-1]["head"][0], inp,
                                    labels, valid)

  def fit(self, nodes: Sequence[Node], dataset: data_lib.Dataset, *,
          epochs: int, batch_size: int, augment: tuple[int, bool],
          rng: jax.Array, eval_split: str = "validation",
          epoch_callback=None, should_stop=None):
    """Trains from scratch, evaluating on `eval_split` after every epoch.

    Same data order and augmentation keys as `trainer.train_and_evaluate`;
    evaluation runs in batches of the training batch size. `epoch_callback`
    and `should_stop` behave as in `trainer.train_and_evaluate`.

    Returns:
      (accuracies, train_losses, per-node variables).

    Raises:
      trainer.ChildTrainingError: the training loss became NaN or infinite.
      trainer.ChildInterrupted: `should_stop()` returned True.
    """
    def check_stop():
      if should_stop is not None and should_stop():
        raise trainer.ChildInterrupted("stop requested")

    train, val = dataset.train, getattr(dataset, eval_split)
    n = len(train.labels)
    batch = min(batch_size, n)
    steps = n // batch
    mean, std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)
    images, labels = jax.device_put(train.images), jax.device_put(train.labels)
    v_images, v_labels, v_valid = jax.device_put(_eval_batches(val, batch))
    init_rng, data_rng, aug_rng = jax.random.split(rng, 3)
    input_shape = tuple(layer_units.as_image(np.zeros((1,) + images.shape[1:])).shape[1:])
    seed = np.asarray(jax.random.key_data(init_rng)).ravel().tolist()
    variables = self.init(nodes, input_shape, seed)

    val_accs, losses = [], []
    for epoch in range(epochs):
      perm = jax.random.permutation(jax.random.fold_in(data_rng, epoch), n)
      perm = perm[:steps * batch].reshape(steps, batch).astype(jnp.int32)
      epoch_losses = []
      for s in range(steps):
        check_stop()
        x, y = self._prepare(images, labels, perm, np.int32(epoch), np.int32(s),
                             aug_rng, mean, std, augment)
        epoch_losses.append(self.train_step(nodes, variables, x, y))
      epoch_loss = float(np.mean(jax.device_get(epoch_losses)))
      if not math.isfinite(epoch_loss):
        raise trainer.ChildTrainingError(
            f"training loss became {epoch_loss} in epoch {epoch}")
      correct = [self.eval_correct(nodes, variables,
                                   self._prepare_eval(v_images[b], mean, std),
                                   v_labels[b], v_valid[b])
                 for b in range(v_images.shape[0])]
      val_accs.append(int(sum(jax.device_get(correct))) / len(val.labels))
      losses.append(epoch_loss)
      if epoch_callback is not None:
        epoch_callback(epoch, epoch_loss, val_accs[-1])
    return val_accs, losses, variables


def _eval_batches(split: data_lib.Split, batch: int):
  """[num_batches, batch, ...] images, labels and validity, zero-padded."""
  return trainer._padded_batches(split.images, split.labels, batch)  # pylint: disable=protected-access


_ENGINES: dict[Hashable, LayerwiseEngine] = {}
_ENGINES_LOCK = threading.Lock()  # Children may train in several threads.


def engine_for(cfg: ml_collections.ConfigDict, total_steps: int,
               bucketing: Bucketing = Bucketing()) -> LayerwiseEngine:
  """The process-wide engine of a child config (its optimizer is compiled in)."""
  key = (json.dumps(cfg.to_dict(), sort_keys=True, default=str), total_steps,
         bucketing)
  with _ENGINES_LOCK:
    if key not in _ENGINES:
      _ENGINES[key] = LayerwiseEngine(trainer.make_optimizer(cfg, total_steps),
                                      bucketing)
    return _ENGINES[key]


def clear_cache() -> None:
  """Drops every engine and its compiled executables."""
  with _ENGINES_LOCK:
    _ENGINES.clear()


def _engine_and_nodes(models, dataset, cfg, bucketing):
  n = len(dataset.train.labels)
  batch = min(cfg.batch_size, n)
  engine = engine_for(cfg, (n // batch) * cfg.epochs, bucketing)
  children = [nodes_from_model(m, dataset.input_shape, bucketing) for m in models]
  image_shape = tuple(layer_units.as_image(np.zeros((1,) + tuple(dataset.input_shape))).shape[1:])
  return engine, children, image_shape, batch


def precompile(models: Sequence[nn.Module], dataset: data_lib.Dataset,
               cfg: ml_collections.ConfigDict, *,
               bucketing: Bucketing = Bucketing(), background: bool = True
               ) -> Optional[concurrent.futures.Future]:
  """Starts compiling, in background threads, what these children will need.

  Call it with a whole batch of sampled children before training the first:
  their new signatures then lower and compile in parallel while earlier
  children train (a child blocks only on executables it uses that are not
  ready yet). Returns the background lowering's future.
  """
  engine, children, image_shape, batch = _engine_and_nodes(
      models, dataset, cfg, bucketing)
  return engine.precompile(children, image_shape, batch, background=background)


def train_and_evaluate(model: nn.Module, dataset: data_lib.Dataset,
                       cfg: ml_collections.ConfigDict, augment_cfg,
                       rng: jax.Array, *, keep_state: bool = False,
                       eval_split: str = "validation", epoch_callback=None,
                       should_stop: Optional[Callable[[], bool]] = None,
                       bucketing: Bucketing = Bucketing()) -> trainer.TrainResult:
  """Drop-in for `trainer.train_and_evaluate` that compiles per layer signature.

  Args:
    model: a cnn.NASRLConvNet.
    dataset: train and validation splits (see rlnas.data).
    cfg: `config.child` (epochs, batch_size, optimizer, min_spatial_size, ...);
      evaluation runs in batches of `batch_size`, not `eval_batch_size`.
    augment_cfg: `config.data.augment` (random_crop_padding, horizontal_flip).
    rng: the child's key.
    keep_state: return the trained `trainer.TrainState` in the model's layout.
    eval_split: "validation" (search) or "test" (final retraining).
    epoch_callback: called as epoch_callback(epoch, train_loss, accuracy).
    should_stop: polled before every training step; True raises
      trainer.ChildInterrupted.
    bucketing: padding policy that trades arithmetic for fewer compilations.

  Returns:
    A `trainer.TrainResult`; `compile_seconds` is the time this child spent
    lowering or waiting for compilations (zero when earlier children, or a
    `precompile` that finished in time, covered its signatures),
    `train_seconds` the rest.

  Raises:
    trainer.ChildTrainingError: the training loss became NaN or infinite.
    trainer.UnbuildableChildError: a feature map shrinks below
      cfg.min_spatial_size.
    trainer.ChildInterrupted: `should_stop()` returned True.
    TypeError: `model` is not a network this engine can split.
  """
  start = time.perf_counter()
  if eval_split not in ("validation", "test") or getattr(dataset, eval_split) is None:
    raise ValueError(f"eval_split={eval_split!r}: dataset has no such split "
                     "(load the test split with data.load(..., with_test=True))")
  trainer.check_spatial_size(model, dataset.input_shape,
                             int(cfg.get("min_spatial_size", 1)))
  engine, (nodes,), image_shape, batch = _engine_and_nodes(
      [model], dataset, cfg, bucketing)
  wait_before = engine.wait_seconds
  if should_stop is not None and should_stop():
    raise trainer.ChildInterrupted("stop requested")
  engine.precompile([nodes], image_shape, batch)
  augment = (int(augment_cfg.random_crop_padding), bool(augment_cfg.horizontal_flip))
  val_accs, losses, variables = engine.fit(
      nodes, dataset, epochs=cfg.epochs, batch_size=batch, augment=augment, rng=rng,
      eval_split=eval_split, epoch_callback=epoch_callback, should_stop=should_stop)
  compile_seconds = engine.wait_seconds - wait_before
  image_depth = image_shape[-1]
  params = assemble(nodes, variables, image_depth, 0)
  state = None
  if keep_state:
    state = trainer.TrainState(
        step=(len(dataset.train.labels) // batch) * cfg.epochs,
        apply_fn=model.apply, params=params, tx=engine.tx,
        opt_state=assemble(nodes, variables, image_depth, 2),
        batch_stats=assemble(nodes, variables, image_depth, 1))
  return trainer.TrainResult(
      val_accuracies=val_accs, train_losses=losses,
      num_params=trainer.count_params(params),
      train_seconds=time.perf_counter() - start - compile_seconds,
      compile_seconds=compile_seconds, state=state)
