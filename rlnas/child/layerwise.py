"""Layer-wise compiled child training: each distinct layer compiles once per search.

Why: on XLA:CPU, jitting a whole child per architecture costs 1.5-3 s of
compilation per child, more than training it (0.2 s for 30 steps on 8x8 digits;
see bench/child_study.md). But a search builds its children from few distinct
layers, and a layer's compiled code depends only on its *signature*: the layer
module's hyperparameters and its input shape. So this engine compiles, once per
signature and for the whole search:

- `forward`: the layer's training-mode output, its updated batch statistics and
  its VJP residuals (the closure `jax.vjp` returns is a pytree, so it leaves a
  compiled function and enters the next one);
- `backward`: applies that VJP to the output gradient, updates the layer's
  parameters with the optimizer and returns the input gradient. Optax
  transforms that act leaf by leaf (SGD, momentum, Adam, decoupled or masked
  weight decay, step-count schedules) give the same update applied layer by
  layer as applied to the whole tree; transforms that mix leaves (global-norm
  clipping) do not, and this engine does not support them;
- the classifier's fused forward + loss + backward + update, the evaluation
  forwards, the depth concatenation of several inputs and the input pipeline.

A training step chains these executables in Python: two asynchronous
dispatches per layer (about 4 us each on CPU), so once the search has met a
signature, a child using it compiles nothing. Children train with the same
data order, augmentation, optimizer and NaN check as `trainer.train_and_evaluate`
and report the same `TrainResult`; parameters start from the same initializers
but not the same random draws (one key per layer instead of Flax's per-path
keys).

Typical use (drop-in for `trainer.train_and_evaluate` on NAS-RL CNN children):

  model = child.build_model(arch, dataset.num_classes, config.child)
  result = layerwise.train_and_evaluate(model, dataset, config.child,
                                        config.data.augment, rng)
"""

import dataclasses
import json
import math
import time
from typing import Any, Callable, Hashable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlnas import data as data_lib
from rlnas.child import cnn
from rlnas.child import trainer


@dataclasses.dataclass(frozen=True)
class Node:
  """One layer of a child network.

  Attributes:
    module: a Flax module called as `module(x, train=bool) -> y`. It is the
      compile cache key together with x's shape, so it must hold only the
      layer's hyperparameters (equal modules compute the same function), never
      its wiring.
    inputs: indices of earlier nodes whose outputs, zero-padded at the
      bottom/right and concatenated in depth (`cnn.pad_and_concat`), form x;
      () means the child's input.
    name: key of this node's variables in the assembled model variables; None
      merges them into the top level (the classifier's `{"classifier": ...}`).
  """
  module: nn.Module
  inputs: tuple[int, ...] = ()
  name: Optional[str] = None


class Classifier(nn.Module):
  """The NAS-RL child's head: pooled (or flattened) features -> logits."""
  num_classes: int
  head: str = "gap"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [N, H, W, C] -> logits [N, num_classes]."""
    del train  # No batch statistics in the head.
    if self.head == "gap":
      x = x.mean(axis=(1, 2))
    elif self.head == "flatten":
      x = x.reshape(x.shape[0], -1)
    else:
      raise ValueError(f"unknown child head {self.head!r}; use 'gap' or 'flatten'")
    return nn.Dense(self.num_classes, name="classifier")(x)


def nodes_from_model(model: nn.Module) -> tuple[Node, ...]:
  """Splits a `cnn.NASRLConvNet` into layer nodes plus the classifier node.

  The nodes compute exactly `model`'s function, and their assembled variables
  (`assemble`) have `model`'s variable layout.

  Raises:
    TypeError: `model` is not a network this engine knows how to split.
  """
  if not isinstance(model, cnn.NASRLConvNet):
    raise TypeError(f"the layer-wise engine splits cnn.NASRLConvNet children, "
                    f"not {type(model).__name__}; use trainer.train_and_evaluate")
  nodes = []
  for i, layer in enumerate(model.layers):
    # The wiring lives in Node.inputs; the module keeps only what it computes,
    # so layers that differ only in their inputs share compiled code.
    module = cnn.ConvBNReLU(dataclasses.replace(layer, inputs=()),
                            model.use_bias, model.bn_momentum)
    nodes.append(Node(module, tuple(layer.inputs), name=f"layer_{i}"))
  nodes.append(Node(Classifier(model.num_classes, model.head),
                    cnn.unconsumed(model.layers)))
  return tuple(nodes)


def _apply(module: nn.Module, params, state, x, train: bool):
  """module(x) with its non-parameter collections; returns (y, new state)."""
  variables = {"params": params, **state}
  if train and state:
    return module.apply(variables, x, train=True, mutable=list(state))
  return module.apply(variables, x, train=train), state


def _split_variables(variables):
  variables = dict(variables)
  params = variables.pop("params", {})
  return params, variables


class LayerwiseEngine:
  """Trains children node by node with executables cached by layer signature.

  One engine holds one optimizer (it is compiled into the backward functions);
  keep the engine for the whole search so that its cache fills once.

  Attributes:
    compile_seconds: total time spent compiling, over the engine's life.
    num_compiled: number of executables compiled so far.
  """

  def __init__(self, optimizer: optax.GradientTransformation):
    self._tx = optimizer
    self._executables: dict[Hashable, Any] = {}
    self.compile_seconds = 0.0
    self.num_compiled = 0

  # -- The compile cache. ----------------------------------------------------

  def _compiled(self, key: Hashable, make_fn: Callable[[], Callable], *args):
    """The executable for `key`, compiling make_fn() for args' shapes on a miss."""
    executable = self._executables.get(key)
    if executable is None:
      start = time.perf_counter()
      executable = jax.jit(make_fn()).lower(*args).compile()
      self.compile_seconds += time.perf_counter() - start
      self.num_compiled += 1
      self._executables[key] = executable
    return executable

  def _init(self, module, key, shape, dtype):
    def make():
      def init(rng):
        variables = module.init(rng, jnp.zeros((1,) + shape, dtype), train=False)
        params, state = _split_variables(variables)
        return params, state, self._tx.init(params)
      return init
    return self._compiled(("init", module, shape, dtype), make, key)(key)

  def _forward(self, module, params, state, x, input_grad: bool):
    """Training forward: (y, new state, vjp of (params[, x]))."""
    def make():
      def forward(params, state, x):
        if input_grad:
          f = lambda p, x: _apply(module, p, state, x, True)
          return _reorder(jax.vjp(f, params, x, has_aux=True))
        f = lambda p: _apply(module, p, state, x, True)
        return _reorder(jax.vjp(f, params, has_aux=True))
      return forward
    key = ("forward", module, x.shape, x.dtype, input_grad)
    return self._compiled(key, make, params, state, x)(params, state, x)

  def _backward(self, module, x_aval, vjp, gy, params, opt_state,
                input_grad: bool):
    """Applies the VJP and the optimizer: (input gradient or None, params, opt state).

    x_aval (the forward's input) keys the cache: the VJP's structure depends
    on it, and two input shapes can give the same output shape.
    """
    def make():
      def backward(vjp, gy, params, opt_state):
        grads = vjp(gy)
        updates, opt_state = self._tx.update(grads[0], opt_state, params)
        params = optax.apply_updates(params, updates)
        return (grads[1] if input_grad else None), params, opt_state
      return backward
    key = ("backward", module, x_aval, input_grad)
    args = (vjp, gy, params, opt_state)
    return self._compiled(key, make, *args)(*args)

  def _classifier_step(self, module, params, state, opt_state, x, labels,
                       input_grad: bool):
    """Fused forward, loss, backward and update of the last node."""
    def make():
      def step(params, state, opt_state, x, labels):
        def loss_fn(p, x):
          logits, new_state = _apply(module, p, state, x, True)
          loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
          return loss.mean(), new_state
        argnums = (0, 1) if input_grad else 0
        (loss, new_state), grads = jax.value_and_grad(
            loss_fn, argnums=argnums, has_aux=True)(params, x)
        g_params, gx = grads if input_grad else (grads, None)
        updates, opt_state = self._tx.update(g_params, opt_state, params)
        params = optax.apply_updates(params, updates)
        return loss, gx, params, new_state, opt_state
      return step
    key = ("classifier_step", module, x.shape, x.dtype, labels.shape, input_grad)
    args = (params, state, opt_state, x, labels)
    return self._compiled(key, make, *args)(*args)

  def _eval_forward(self, module, params, state, x):
    make = lambda: lambda p, s, x: _apply(module, p, s, x, False)[0]
    key = ("eval_forward", module, x.shape, x.dtype)
    return self._compiled(key, make, params, state, x)(params, state, x)

  def _eval_correct(self, module, params, state, x, labels, mask):
    def make():
      def correct(params, state, x, labels, mask):
        logits = _apply(module, params, state, x, False)[0]
        return ((logits.argmax(-1) == labels) & mask).sum()
      return correct
    key = ("eval_correct", module, x.shape, x.dtype, labels.shape)
    args = (params, state, x, labels, mask)
    return self._compiled(key, make, *args)(*args)

  def _merge(self, xs, with_vjp: bool):
    """cnn.pad_and_concat(xs), with its VJP when training."""
    def make():
      if with_vjp:
        return lambda xs: jax.vjp(cnn.pad_and_concat, xs)
      return cnn.pad_and_concat
    key = ("merge", tuple((x.shape, x.dtype) for x in xs), with_vjp)
    return self._compiled(key, make, xs)(xs)

  def _merge_backward(self, vjp, g):
    key = ("merge_backward", jax.tree_util.tree_structure(vjp), g.shape)
    return self._compiled(key, lambda: lambda vjp, g: vjp(g)[0], vjp, g)(vjp, g)

  def _prepare(self, images, labels, perm, epoch, step, rng, mean, std,
               augment: tuple[int, bool]):
    """The step's batch images[perm[step]] -> preprocessed, augmented [B, ...]."""
    crop, flip = augment
    def make():
      def prepare(images, labels, perm, epoch, step, rng, mean, std):
        idx = perm[step]
        x = data_lib.preprocess(images[idx], mean, std)
        # Same key schedule as trainer.train_and_evaluate.
        rng = jax.random.fold_in(jax.random.fold_in(rng, epoch), step)
        x = data_lib.augment(rng, x, random_crop_padding=crop, horizontal_flip=flip)
        return _as_image(x), labels[idx]
      return prepare
    args = (images, labels, perm, epoch, step, rng, mean, std)
    key = ("prepare",) + tuple((a.shape, a.dtype) for a in args) + (augment,)
    return self._compiled(key, make, *args)(*args)

  def _prepare_eval(self, images, mean, std):
    make = lambda: lambda x, m, s: _as_image(data_lib.preprocess(x, m, s))
    key = ("prepare_eval", images.shape, images.dtype)
    return self._compiled(key, make, images, mean, std)(images, mean, std)

  # -- One child. -----------------------------------------------------------

  def init(self, nodes: Sequence[Node], input_shape: tuple[int, ...],
           rng: jax.Array, dtype=jnp.float32):
    """Per-node (params, state, opt_state) for inputs [B, *input_shape].

    Node i draws its parameters from fold_in(rng, i).
    """
    shapes = _feature_shapes(nodes, input_shape)
    out = []
    for i, node in enumerate(nodes):
      out.append(self._init(node.module, jax.random.fold_in(rng, i),
                            shapes[i], dtype))
    return out

  def train_step(self, nodes: Sequence[Node], variables: list, x: jax.Array,
                 labels: jax.Array) -> jax.Array:
    """One optimizer step on a batch; updates `variables` in place.

    Args:
      nodes: the child; the last node returns logits.
      variables: per-node [params, state, opt_state] lists from `init`.
      x: [B, H, W, C] preprocessed inputs.
      labels: [B] int32 class ids.

    Returns:
      The batch's mean loss, a device scalar (not synchronised).
    """
    num = len(nodes)
    outputs, merge_vjps, vjps = [], [None] * num, [None] * num
    in_avals = [None] * num
    head_x = None
    for i, node in enumerate(nodes):
      params, state, _ = variables[i]
      if len(node.inputs) > 1:
        inp, merge_vjps[i] = self._merge(tuple(outputs[j] for j in node.inputs), True)
      else:
        inp = outputs[node.inputs[0]] if node.inputs else x
      if i == num - 1:
        head_x = inp
        break
      in_avals[i] = (inp.shape, inp.dtype)
      y, variables[i][1], vjps[i] = self._forward(node.module, params, state,
                                                  inp, bool(node.inputs))
      outputs.append(y)
    head = nodes[-1]
    params, state, opt_state = variables[-1]
    loss, g_in, *variables[-1] = self._classifier_step(
        head.module, params, state, opt_state, head_x, labels, bool(head.inputs))
    grads = [None] * num
    grads[-1] = g_in
    for i in range(num - 1, -1, -1):
      node = nodes[i]
      if i < num - 1:
        g_out = grads[i]
        if g_out is None:  # Feeds nothing that reaches the loss.
          g_out = jnp.zeros_like(outputs[i])
        params, _, opt_state = variables[i]
        grads[i], variables[i][0], variables[i][2] = self._backward(
            node.module, in_avals[i], vjps[i], g_out, params, opt_state,
            bool(node.inputs))
      if not node.inputs:
        continue
      g_inputs = (self._merge_backward(merge_vjps[i], grads[i])
                  if merge_vjps[i] is not None else (grads[i],))
      for j, g in zip(node.inputs, g_inputs):
        grads[j] = g if grads[j] is None else grads[j] + g
    return loss

  def eval_correct(self, nodes: Sequence[Node], variables: list, x: jax.Array,
                   labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Correct predictions among the masked examples of x [B, ...]: int32 []."""
    outputs = []
    for i, node in enumerate(nodes):
      params, state, _ = variables[i]
      if len(node.inputs) > 1:
        inp = self._merge(tuple(outputs[j] for j in node.inputs), False)
      else:
        inp = outputs[node.inputs[0]] if node.inputs else x
      if i == len(nodes) - 1:
        return self._eval_correct(node.module, params, state, inp, labels, mask)
      outputs.append(self._eval_forward(node.module, params, state, inp))

  def fit(self, nodes: Sequence[Node], dataset: data_lib.Dataset, *,
          epochs: int, batch_size: int, eval_batch_size: int,
          augment: tuple[int, bool], rng: jax.Array):
    """Trains from scratch, validating after every epoch.

    Same data order and augmentation keys as `trainer.train_and_evaluate`.

    Returns:
      (val_accuracies, train_losses, per-node variables).

    Raises:
      trainer.ChildTrainingError: the training loss became NaN or infinite.
    """
    train, val = dataset.train, dataset.validation
    n = len(train.labels)
    batch = min(batch_size, n)
    steps = n // batch
    mean, std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)
    images, labels = jax.device_put(train.images), jax.device_put(train.labels)
    v_images, v_labels, v_mask = jax.device_put(
        trainer._padded_batches(val.images, val.labels, eval_batch_size))  # pylint: disable=protected-access
    init_rng, data_rng, aug_rng = jax.random.split(rng, 3)
    input_shape = tuple(_as_image(np.zeros((1,) + images.shape[1:])).shape[1:])
    variables = [list(v) for v in self.init(nodes, input_shape, init_rng)]

    val_accs, losses = [], []
    for epoch in range(epochs):
      perm = jax.random.permutation(jax.random.fold_in(data_rng, epoch), n)
      perm = perm[:steps * batch].reshape(steps, batch).astype(jnp.int32)
      epoch_losses = []
      for s in range(steps):
        x, y = self._prepare(images, labels, perm, np.int32(epoch), np.int32(s),
                             aug_rng, mean, std, augment)
        epoch_losses.append(self.train_step(nodes, variables, x, y))
      epoch_loss = float(jnp.stack(epoch_losses).mean())
      if not math.isfinite(epoch_loss):
        raise trainer.ChildTrainingError(
            f"training loss became {epoch_loss} in epoch {epoch}")
      correct = [self.eval_correct(nodes, variables,
                                   self._prepare_eval(v_images[b], mean, std),
                                   v_labels[b], v_mask[b])
                 for b in range(v_images.shape[0])]
      val_accs.append(int(sum(jax.device_get(correct))) / len(val.labels))
      losses.append(epoch_loss)
    return val_accs, losses, variables


def _reorder(vjp_out):
  """jax.vjp(..., has_aux=True) gives (y, vjp, aux); forward returns (y, aux, vjp)."""
  y, vjp, aux = vjp_out
  return y, aux, vjp


def _as_image(x):
  """1D signals [N, L, C] run as [N, 1, L, C] images, as in cnn.NASRLConvNet."""
  return x[:, None] if x.ndim == 3 else x


def _feature_shapes(nodes: Sequence[Node], input_shape: tuple[int, ...]):
  """Per-node input shapes without the batch dimension, by shape inference."""
  outputs, shapes = [], []
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  for node in nodes:
    if node.inputs:
      inp = jax.eval_shape(cnn.pad_and_concat, [outputs[j] for j in node.inputs])
    else:
      inp = x
    shapes.append(tuple(inp.shape[1:]))
    outputs.append(_output_shape(node.module, inp))
  return shapes


_OUTPUT_SHAPES: dict[Hashable, jax.ShapeDtypeStruct] = {}


def _output_shape(module: nn.Module, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  key = (module, x.shape, x.dtype)
  if key not in _OUTPUT_SHAPES:
    def f(x):
      variables = module.init(jax.random.PRNGKey(0), x, train=False)
      return module.apply(variables, x, train=False)
    _OUTPUT_SHAPES[key] = jax.eval_shape(f, x)
  return _OUTPUT_SHAPES[key]


def assemble(nodes: Sequence[Node], per_node: Sequence[Any]) -> Any:
  """Joins per-node trees into the whole model's layout.

  Works on params, on state collections and on optax states (whose parameter-
  shaped subtrees are joined; step counts, equal in every node, are taken from
  the first): node i's dicts go under `nodes[i].name`, or at the top level when
  the name is None.
  """
  def join(*trees):
    if not isinstance(trees[0], dict):
      return trees[0]
    out = {}
    for node, tree in zip(nodes, trees):
      if node.name is None:
        out.update(tree)
      else:
        out[node.name] = tree
    return out
  return jax.tree_util.tree_map(join, *per_node,
                                is_leaf=lambda t: isinstance(t, dict))


_ENGINES: dict[Hashable, LayerwiseEngine] = {}


def engine_for(cfg: ml_collections.ConfigDict, total_steps: int) -> LayerwiseEngine:
  """The process-wide engine of a child config (its optimizer is compiled in)."""
  key = (json.dumps(cfg.to_dict(), sort_keys=True, default=str), total_steps)
  if key not in _ENGINES:
    _ENGINES[key] = LayerwiseEngine(trainer.make_optimizer(cfg, total_steps))
  return _ENGINES[key]


def clear_cache() -> None:
  """Drops every engine and its compiled executables."""
  _ENGINES.clear()
  _OUTPUT_SHAPES.clear()


def train_and_evaluate(model: nn.Module, dataset: data_lib.Dataset,
                       cfg: ml_collections.ConfigDict, augment_cfg,
                       rng: jax.Array, *, keep_state: bool = False
                       ) -> trainer.TrainResult:
  """Drop-in for `trainer.train_and_evaluate` that compiles per layer signature.

  Args:
    model: a `cnn.NASRLConvNet`.
    dataset: train and validation splits (see rlnas.data).
    cfg: `config.child` (epochs, batch_size, eval_batch_size, optimizer, ...).
    augment_cfg: `config.data.augment` (random_crop_padding, horizontal_flip).
    rng: the child's key.
    keep_state: return the trained `trainer.TrainState` in the model's layout.

  Returns:
    A `trainer.TrainResult`; `compile_seconds` is the time this child spent
    compiling signatures no earlier child had, `train_seconds` the rest.

  Raises:
    trainer.ChildTrainingError: the training loss became NaN or infinite.
    TypeError: `model` is not a network this engine can split.
  """
  start = time.perf_counter()
  nodes = nodes_from_model(model)
  n = len(dataset.train.labels)
  batch = min(cfg.batch_size, n)
  engine = engine_for(cfg, (n // batch) * cfg.epochs)
  compile_before = engine.compile_seconds
  augment = (int(augment_cfg.random_crop_padding), bool(augment_cfg.horizontal_flip))
  val_accs, losses, variables = engine.fit(
      nodes, dataset, epochs=cfg.epochs, batch_size=cfg.batch_size,
      eval_batch_size=cfg.eval_batch_size, augment=augment, rng=rng)
  compile_seconds = engine.compile_seconds - compile_before
  params = assemble(nodes, [v[0] for v in variables])
  state = None
  if keep_state:
    state = trainer.TrainState(
        step=(n // batch) * cfg.epochs, apply_fn=model.apply, params=params,
        tx=engine._tx,  # pylint: disable=protected-access
        opt_state=assemble(nodes, [v[2] for v in variables]),
        batch_stats=assemble(nodes, [v[1].get("batch_stats", {})
                                     for v in variables]))
  return trainer.TrainResult(
      val_accuracies=val_accs, train_losses=losses,
      num_params=trainer.count_params(params),
      train_seconds=time.perf_counter() - start - compile_seconds,
      compile_seconds=compile_seconds, state=state)
