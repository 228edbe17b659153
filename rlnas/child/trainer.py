"""The child trainer: trains one architecture, reports per-epoch validation accuracy.

Train and eval steps are jitted and compiled ahead of time (so compile time is
measured apart from training time). An epoch runs either as a Python loop over
a jitted step or as one jitted `lax.scan` over the epoch's steps:
- On XLA:CPU the scan is ~50x slower (measured on a 2-core CPU with jax 0.10.2:
  XLA picks a slow layout for the weight-gradient convolution inside loops), so
  `loop="auto"` uses the Python loop there.
- On GPU/TPU the scan avoids a host round trip per step and is the usual fast
  path, so `loop="auto"` picks it there.

The data stay on device for the whole child: images in their host dtype (uint8
for images), converted and normalised inside the step, and augmented there when
the data config asks for it (never at evaluation).

Optimizer defaults follow Zoph & Le 2017, sec. 4.1: momentum 0.9 with Nesterov,
learning rate 0.1, weight decay 1e-4.
"""

import dataclasses
import functools
import math
import time
from typing import Any, Callable

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from rlnas import data as data_lib


class ChildTrainingError(RuntimeError):
  """The child diverged (non-finite loss); the search records it as failed."""


class UnbuildableChildError(ValueError):
  """The architecture makes no usable network on this input; a failed child."""


class ChildInterrupted(BaseException):  # pylint: disable=g-bad-exception-name
  """`should_stop` asked training to stop (SIGTERM/SIGINT); nothing is reported.

  A BaseException, like KeyboardInterrupt, so that the `except Exception` that
  turns a crashing child into a failed one never swallows a stop request.
  """


class TrainState(train_state.TrainState):
  batch_stats: Any


@dataclasses.dataclass
class TrainResult:
  """What one child's training produced.

  val_accuracies: validation accuracy after every epoch, fractions in [0, 1].
  train_losses: mean training loss of every epoch.
  """
  val_accuracies: list[float]
  train_losses: list[float]
  num_params: int
  train_seconds: float
  compile_seconds: float
  state: Any = dataclasses.field(default=None, repr=False)


def make_optimizer(cfg: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """Child optimizer from `config.child`; weight decay on kernels only."""
  if cfg.lr_schedule == "constant":
    lr = cfg.learning_rate
  elif cfg.lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(cfg.learning_rate, max(total_steps, 1))
  else:
    raise ValueError(f"child.lr_schedule must be 'constant' or 'cosine', "
                     f"got {cfg.lr_schedule!r}")
  if cfg.optimizer == "momentum":
    opt = optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
  elif cfg.optimizer == "adam":
    opt = optax.adam(lr)
  elif cfg.optimizer == "sgd":
    opt = optax.sgd(lr)
  else:
    raise ValueError(f"child.optimizer must be 'momentum', 'adam' or 'sgd', "
                     f"got {cfg.optimizer!r}")
  if not cfg.weight_decay:
    return opt
  kernels_only = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay, kernels_only), opt)


def choose_loop(cfg_loop: str) -> str:
  """'python' on CPU, 'scan' on GPU/TPU, unless the config names one."""
  if cfg_loop == "auto":
    return "python" if jax.default_backend() == "cpu" else "scan"
  if cfg_loop not in ("python", "scan"):
    raise ValueError(f"child.loop must be 'auto', 'python' or 'scan', got {cfg_loop!r}")
  return cfg_loop


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def feature_map_sizes(model: nn.Module, input_shape: tuple[int, ...]
                      ) -> list[tuple[str, tuple[int, int]]]:
  """(module path, (H, W)) of every convolution output, for one input [1, *input_shape].

  Traced with `jax.eval_shape`: nothing is compiled or allocated.
  """
  is_conv = lambda module, method: isinstance(module, nn.Conv) and method == "__call__"
  init = functools.partial(model.init_with_output, capture_intermediates=is_conv)
  _, variables = jax.eval_shape(init, jax.random.PRNGKey(0),
                                jnp.zeros((1,) + tuple(input_shape), jnp.float32))
  flat = traverse_util.flatten_dict(variables.get("intermediates", {}), sep="/")
  return [(path.removesuffix("/__call__"), tuple(out.shape[1:3]))
          for path, outs in sorted(flat.items()) for out in outs if out.ndim == 4]


def check_spatial_size(model: nn.Module, input_shape: tuple[int, ...],
                       min_size: int) -> None:
  """Raises UnbuildableChildError if a feature map shrinks below `min_size`.

  With SAME padding a strided convolution never reaches size 0 (it stops at
  ceil(size / stride) >= 1), so a child always builds; but a map squeezed to
  1x1 by early strides leaves later kernels nothing to see. `min_size` (from
  `config.child.min_spatial_size`, 1 = off) refuses such children. An input
  dimension already smaller than `min_size` (1D signals run as 1 x L images)
  is held to its own size.
  """
  if min_size <= 1:
    return
  spatial = (1,) * (3 - len(input_shape)) + tuple(input_shape[:-1])
  for path, hw in feature_map_sizes(model, input_shape):
    for size, full in zip(hw, spatial[-2:]):
      if size < min(min_size, full):
        raise UnbuildableChildError(
            f"{path} outputs a {hw[0]}x{hw[1]} feature map, smaller than "
            f"config.child.min_spatial_size={min_size} (strides too large for "
            f"a {spatial[-2]}x{spatial[-1]} input)")


def _loss_fn(params, state: TrainState, images, labels, rng, mean, std, augment):
  x = data_lib.preprocess(images, mean, std)
  if augment["random_crop_padding"] or augment["horizontal_flip"]:
    x = data_lib.augment(rng, x, random_crop_padding=augment["random_crop_padding"],
                         horizontal_flip=augment["horizontal_flip"])
  logits, updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats}, x, train=True,
      mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, updates["batch_stats"]


def _train_step(state: TrainState, images, labels, idx, rng, mean, std, augment):
  """One SGD step on images[idx] [B, ...]; returns (state, loss [])."""
  (loss, batch_stats), grads = jax.value_and_grad(_loss_fn, has_aux=True)(
      state.params, state, images[idx], labels[idx], rng, mean, std, augment)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, loss


def _train_epoch(state: TrainState, images, labels, perm, rng, mean, std, augment):
  """lax.scan of `_train_step` over perm [S, B]; returns (state, losses [S])."""
  def body(st, xs):
    i, idx = xs
    return _train_step(st, images, labels, idx, jax.random.fold_in(rng, i),
                       mean, std, augment)
  return jax.lax.scan(body, state, (jnp.arange(perm.shape[0]), perm))


def _eval_step(state: TrainState, images, labels, mask, mean, std):
  """Correct predictions among masked examples of one batch: int32 []."""
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          data_lib.preprocess(images, mean, std), train=False)
  return ((logits.argmax(-1) == labels) & mask).sum()


def _padded_batches(images: np.ndarray, labels: np.ndarray, batch: int):
  """Pads to a multiple of `batch` so one compiled eval step fits every batch."""
  n = len(labels)
  batch = min(batch, n)
  total = math.ceil(n / batch) * batch
  pad = total - n
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
  mask = np.arange(total) < n
  shape = lambda a: a.reshape((total // batch, batch) + a.shape[1:])
  return shape(images), shape(labels), shape(mask)


def train_and_evaluate(model: nn.Module, dataset: data_lib.Dataset,
                       cfg: ml_collections.ConfigDict, augment_cfg,
                       rng: jax.Array, *, keep_state: bool = False,
                       eval_split: str = "validation",
                       epoch_callback=None,
                       should_stop: Callable[[], bool] | None = None) -> TrainResult:
  """Trains `model` on dataset.train, evaluating on `eval_split` after every epoch.

  Args:
    model: a Flax module called as model(x [B, ...], train=bool) -> logits.
    dataset: train and validation splits (see rlnas.data).
    cfg: `config.child` (epochs, batch_size, optimizer, loop, ...).
    augment_cfg: `config.data.augment` (random_crop_padding, horizontal_flip).
    rng: the child's key; derived from its identity so results do not depend
      on which process or device trains it.
    keep_state: return the trained TrainState (for retraining/checkpoints).
    eval_split: the split of `dataset` evaluated after every epoch and
      reported as `val_accuracies`: "validation" in a search; "test" only in
      the final retraining (rlnas.retrain), which renames it test accuracy.
    epoch_callback: called as epoch_callback(epoch, train_loss, accuracy)
      after every epoch (progress logging of long retraining runs).
    should_stop: polled before compiling and before every training step
      (every epoch with loop="scan"); when it returns True training stops by
      raising ChildInterrupted. This bounds how long a preempted search waits.

  Raises:
    ChildTrainingError: the training loss became NaN or infinite.
    UnbuildableChildError: a feature map shrinks below cfg.min_spatial_size.
    ChildInterrupted: `should_stop()` returned True.
  """
  def check_stop():
    if should_stop is not None and should_stop():
      raise ChildInterrupted("stop requested")

  t_start = time.perf_counter()
  if eval_split not in ("validation", "test") or getattr(dataset, eval_split) is None:
    raise ValueError(f"eval_split={eval_split!r}: dataset has no such split "
                     "(load the test split with data.load(..., with_test=True))")
  train, val = dataset.train, getattr(dataset, eval_split)
  n = len(train.labels)
  batch = min(cfg.batch_size, n)
  steps_per_epoch = n // batch
  loop = choose_loop(cfg.loop)
  augment = {"random_crop_padding": int(augment_cfg.random_crop_padding),
             "horizontal_flip": bool(augment_cfg.horizontal_flip)}
  mean, std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)
  images, labels = jax.device_put(train.images), jax.device_put(train.labels)
  v_images, v_labels, v_mask = jax.device_put(
      _padded_batches(val.images, val.labels, cfg.eval_batch_size))
  tx = make_optimizer(cfg, steps_per_epoch * cfg.epochs)
  init_rng, data_rng, aug_rng = jax.random.split(rng, 3)

  def init(key):
    variables = model.init(key, jnp.zeros((1,) + images.shape[1:], jnp.float32))
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}), tx=tx)

  check_spatial_size(model, images.shape[1:], int(cfg.get("min_spatial_size", 1)))
  check_stop()
  # Compile everything up front: the split between compile and train seconds
  # is what the child-throughput benchmark and the history report.
  state_shape = jax.eval_shape(init, init_rng)
  init_c = jax.jit(init).lower(init_rng).compile()
  idx_shape = jax.ShapeDtypeStruct((batch,), jnp.int32)
  if loop == "python":
    step_c = jax.jit(_train_step, static_argnums=7, donate_argnums=0).lower(
        state_shape, images, labels, idx_shape, aug_rng, mean, std,
        _Static(augment)).compile()
  else:
    perm_shape = jax.ShapeDtypeStruct((steps_per_epoch, batch), jnp.int32)
    step_c = jax.jit(_train_epoch, static_argnums=7, donate_argnums=0).lower(
        state_shape, images, labels, perm_shape, aug_rng, mean, std,
        _Static(augment)).compile()
  eval_c = jax.jit(_eval_step).lower(state_shape, v_images[0], v_labels[0],
                                     v_mask[0], mean, std).compile()
  state = init_c(init_rng)
  compile_seconds = time.perf_counter() - t_start

  val_accs, losses = [], []
  for epoch in range(cfg.epochs):
    perm = jax.random.permutation(jax.random.fold_in(data_rng, epoch), n)
    perm = perm[:steps_per_epoch * batch].reshape(steps_per_epoch, batch)
    perm = perm.astype(jnp.int32)
    epoch_rng = jax.random.fold_in(aug_rng, epoch)
    check_stop()
    if loop == "python":
      epoch_losses = []
      for s in range(steps_per_epoch):
        check_stop()
        state, loss = step_c(state, images, labels, perm[s],
                             jax.random.fold_in(epoch_rng, s), mean, std)
        epoch_losses.append(loss)
      epoch_loss = float(jnp.stack(epoch_losses).mean())
    else:
      state, epoch_losses = step_c(state, images, labels, perm, epoch_rng, mean, std)
      epoch_loss = float(epoch_losses.mean())
    if not math.isfinite(epoch_loss):
      raise ChildTrainingError(f"training loss became {epoch_loss} in epoch {epoch}")
    correct = sum(int(eval_c(state, v_images[b], v_labels[b], v_mask[b], mean, std))
                  for b in range(v_images.shape[0]))
    val_accs.append(correct / len(val.labels))
    losses.append(epoch_loss)
    if epoch_callback is not None:
      epoch_callback(epoch, epoch_loss, val_accs[-1])
  train_seconds = time.perf_counter() - t_start - compile_seconds
  return TrainResult(val_accuracies=val_accs, train_losses=losses,
                     num_params=count_params(state.params),
                     train_seconds=train_seconds, compile_seconds=compile_seconds,
                     state=state if keep_state else None)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable wrapper so the augmentation settings are a static jit argument."""
  value: dict

  def __hash__(self):
    return hash(tuple(sorted(self.value.items())))

  def __getitem__(self, key):
    return self.value[key]
