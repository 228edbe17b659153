"""Tests of the layer-wise child engine (rlnas/child/layerwise.py).

The engine must compute exactly what cnn.NASRLConvNet + optax compute (with
and without padding buckets) and compile each layer signature once.
"""

import concurrent.futures

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rlnas import data as data_lib
from rlnas.child import cnn
from rlnas.child import layer_units
from rlnas.child import layerwise
from rlnas.child import trainer
from rlnas.spaces.nasrl_cnn import Layer


def _child_cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      epochs=2, batch_size=16, eval_batch_size=32, optimizer="momentum",
      learning_rate=0.05, lr_schedule="constant", momentum=0.9, nesterov=True,
      weight_decay=1e-4, head="gap", use_bias=True, bn_momentum=0.9, loop="auto"))
  cfg.update(overrides)
  return cfg


def _tiny_dataset(shape=(8, 8, 1), train=48, val=20, std=None):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, train + val).astype(np.int32)
  images = (rng.integers(0, 100, (train + val,) + shape)
            + 50 * labels.reshape((-1,) + (1,) * len(shape))).astype(np.uint8)
  flat = images[:train].reshape(-1, shape[-1]).astype(np.float32)
  return data_lib.Dataset(
      train=data_lib.Split(images[:train], labels[:train]),
      validation=data_lib.Split(images[train:], labels[train:]), test=None,
      num_classes=3, input_shape=shape, mean=flat.mean(0),
      std=flat.std(0) if std is None else std, name="tiny")


# Skip connections, a layer reading the image again, kernels of every size.
_SKIP_LAYERS = (Layer(3, 1, 1, 1, 4, ()), Layer(5, 3, 1, 1, 8, (0,)),
                Layer(1, 5, 1, 1, 4, ()), Layer(3, 3, 1, 1, 8, (0, 1, 2)))
# A 1D child (MNIST-1D style): [N, 40, 1] signals, height-1 kernels, strides.
_1D_LAYERS = (Layer(1, 3, 1, 2, 4, ()), Layer(1, 5, 1, 1, 8, (0,)),
              Layer(1, 1, 1, 2, 4, (0, 1)))


def test_bucketing_sizes():
  b = layerwise.Bucketing(kernel_sizes=(3, 5), pow2_channels=True)
  assert [b.kernel(k, 1, 8) for k in (1, 3, 5, 7)] == [3, 3, 5, 7]
  assert b.kernel(1, 2, 8) == 1  # Strided dimensions stay exact.
  assert b.kernel(1, 1, 1) == 1  # Never wider than the input (1D height).
  assert [b.channels(c) for c in (1, 3, 8, 24, 40, 64)] == [1, 4, 8, 32, 64, 64]
  assert layerwise.Bucketing().channels(24) == 24


@pytest.mark.parametrize("layers,shape,bucketing", [
    (_SKIP_LAYERS, (8, 8, 1), layerwise.Bucketing()),
    (_SKIP_LAYERS, (8, 8, 1), layerwise.Bucketing((5,), True)),
    (_1D_LAYERS, (40, 1), layerwise.Bucketing((5,), True)),
])
def test_step_matches_flax_model(layers, shape, bucketing):
  model = cnn.NASRLConvNet(layers, num_classes=3, head="gap", bn_momentum=0.9)
  tx = trainer.make_optimizer(_child_cfg(), 100)
  engine = layerwise.LayerwiseEngine(tx, bucketing)
  nodes = layerwise.nodes_from_model(model, shape, bucketing)
  image_shape = shape if len(shape) == 3 else (1,) + shape
  variables = engine.init(nodes, image_shape, [1, 2])
  params = layerwise.assemble(nodes, variables, shape[-1], 0)
  stats = layerwise.assemble(nodes, variables, shape[-1], 1)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((8,) + shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
  # Same tree and shapes as the Flax model's own init.
  ref_shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert (jax.tree_util.tree_map(jnp.shape, params)
          == jax.tree_util.tree_map(jnp.shape, ref_shapes["params"]))

  def loss_fn(p):
    logits, updates = model.apply({"params": p, "batch_stats": stats}, x,
                                  train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates["batch_stats"]
  (ref_loss, ref_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  ref_opt = tx.init(params)
  updates, ref_opt = tx.update(grads, ref_opt, params)
  ref_params = optax.apply_updates(params, updates)

  loss = engine.train_step(nodes, variables, layer_units.as_image(x), y)
  new_params = layerwise.assemble(nodes, variables, shape[-1], 0)
  new_stats = layerwise.assemble(nodes, variables, shape[-1], 1)
  new_opt = layerwise.assemble(nodes, variables, shape[-1], 2)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert jax.tree_util.tree_structure(new_opt) == jax.tree_util.tree_structure(ref_opt)
  for got, want in [(new_params, ref_params), (new_stats, ref_stats), (new_opt, ref_opt)]:
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_compiles_each_signature_once():
  tx = optax.adam(1e-2)
  bucketing = layerwise.Bucketing((5,), True)
  engine = layerwise.LayerwiseEngine(tx, bucketing)
  x = jnp.ones((8, 8, 8, 1))
  y = jnp.zeros((8,), jnp.int32)

  def step(layers):
    model = cnn.NASRLConvNet(layers, num_classes=3)
    nodes = layerwise.nodes_from_model(model, (8, 8, 1), bucketing)
    variables = engine.init(nodes, (8, 8, 1), [0])
    engine.train_step(nodes, variables, x, y)
    return dict(engine.num_compiled)

  first = step((Layer(3, 3, 1, 1, 4, ()), Layer(1, 5, 1, 1, 8, (0,))))
  # Other kernels, same buckets (all 5x5) and depths: nothing new to compile.
  assert step((Layer(5, 1, 1, 1, 4, ()), Layer(3, 3, 1, 1, 8, (0,)))) == first
  # New filters in layer 1 compile one new convolution (forward, backward)
  # and, for the new width, one BatchNorm unit and one classifier.
  third = step((Layer(5, 1, 1, 1, 4, ()), Layer(3, 3, 1, 1, 16, (0,))))
  assert third["conv_forward"] == first["conv_forward"] + 1
  assert third["conv_backward"] == first["conv_backward"] + 1
  assert third["norm_forward"] == first["norm_forward"] + 1


def test_train_and_evaluate_drop_in():
  layers = (Layer(3, 3, 1, 1, 4, ()), Layer(1, 3, 1, 1, 4, (0,)))
  model = cnn.NASRLConvNet(layers, num_classes=3, bn_momentum=0.9)
  dataset = _tiny_dataset()
  cfg = _child_cfg(optimizer="adam", learning_rate=0.01)
  augment = ml_collections.ConfigDict(dict(random_crop_padding=0, horizontal_flip=False))
  result = layerwise.train_and_evaluate(model, dataset, cfg, augment,
                                        jax.random.PRNGKey(0), keep_state=True)
  assert len(result.val_accuracies) == cfg.epochs
  assert all(0.0 <= a <= 1.0 for a in result.val_accuracies)
  assert all(np.isfinite(result.train_losses))
  # conv 3x3x1x4 + 4 bias + BN 2*4 = 48; conv 1x3x4x4 + 4 + 8 = 60; dense 4*3+3 = 15.
  assert result.num_params == 48 + 60 + 15
  assert result.compile_seconds > 0
  logits = model.apply({"params": result.state.params,
                        "batch_stats": result.state.batch_stats},
                       jnp.zeros((2, 8, 8, 1)))
  assert logits.shape == (2, 3)
  # The same child again compiles nothing.
  again = layerwise.train_and_evaluate(model, dataset, cfg, augment,
                                       jax.random.PRNGKey(0))
  assert again.compile_seconds == 0.0
  assert again.val_accuracies == result.val_accuracies


def test_diverged_child_raises():
  model = cnn.NASRLConvNet((Layer(1, 1, 1, 1, 4, ()),), num_classes=3)
  dataset = _tiny_dataset(std=np.zeros((1,), np.float32))  # x / 0: inf, NaN loss.
  augment = ml_collections.ConfigDict(dict(random_crop_padding=0, horizontal_flip=False))
  with pytest.raises(trainer.ChildTrainingError):
    layerwise.train_and_evaluate(model, dataset, _child_cfg(), augment,
                                 jax.random.PRNGKey(0))


def test_rejects_unknown_models():
  with pytest.raises(TypeError, match="NASRLConvNet"):
    layerwise.nodes_from_model(layerwise.Classifier(3), (8, 8, 1))


def test_background_precompile_covers_the_child():
  layers = (Layer(3, 1, 1, 1, 4, ()), Layer(1, 3, 1, 1, 4, (0,)),
            Layer(3, 3, 1, 1, 4, (0, 1)))
  model = cnn.NASRLConvNet(layers, num_classes=3, bn_momentum=0.9)
  dataset = _tiny_dataset()
  cfg = _child_cfg(epochs=1, learning_rate=0.011)  # An engine of its own.
  augment = ml_collections.ConfigDict(dict(random_crop_padding=0, horizontal_flip=False))
  layerwise.precompile([model], dataset, cfg).result()  # Lowered; compiling.
  engine = layerwise.engine_for(cfg, len(dataset.train.labels) // cfg.batch_size)
  engine.precompile([], (8, 8, 1), cfg.batch_size, wait=True)  # Compiled.
  compiled = dict(engine.num_compiled)
  result = layerwise.train_and_evaluate(model, dataset, cfg, augment,
                                        jax.random.PRNGKey(0))
  # Only the input pipeline was not known before the data was.
  new = {k: v - compiled.get(k, 0) for k, v in engine.num_compiled.items()
         if v != compiled.get(k, 0)}
  assert set(new) <= {"prepare", "prepare_eval"}, new
  assert np.isfinite(result.train_losses).all()


def test_trainer_hooks_stop_callback_and_test_split():
  model = cnn.NASRLConvNet((Layer(3, 3, 1, 1, 4, ()),), num_classes=3)
  base = _tiny_dataset()
  dataset = data_lib.Dataset(base.train, base.validation, base.validation,
                             base.num_classes, base.input_shape, base.mean,
                             base.std, base.name)
  cfg, rng = _child_cfg(), jax.random.PRNGKey(0)
  augment = ml_collections.ConfigDict(dict(random_crop_padding=0, horizontal_flip=False))
  seen = []
  result = layerwise.train_and_evaluate(
      model, dataset, cfg, augment, rng, eval_split="test",
      epoch_callback=lambda *a: seen.append(a))
  assert [s[0] for s in seen] == list(range(cfg.epochs))
  assert [s[2] for s in seen] == result.val_accuracies
  with pytest.raises(trainer.ChildInterrupted):
    layerwise.train_and_evaluate(model, dataset, cfg, augment, rng,
                                 should_stop=lambda: True)


def test_children_in_threads_match_one_at_a_time():
  """The search trains one child per core at once (evaluators.children_at_once):
  children sharing a fresh engine from several threads compile each signature
  once and get exactly the results of training them one after another."""
  children = [(Layer(3, 3, 1, 1, 4, ()), Layer(1, 3, 1, 1, 4, (0,))),
              (Layer(3, 3, 1, 1, 4, ()), Layer(5, 3, 1, 1, 8, (0,))),
              (Layer(1, 5, 1, 1, 8, ()),)] * 2
  models = [cnn.NASRLConvNet(layers, num_classes=3, bn_momentum=0.9)
            for layers in children]
  dataset = _tiny_dataset()
  cfg = _child_cfg(optimizer="adam", learning_rate=0.01)
  augment = ml_collections.ConfigDict(dict(random_crop_padding=0, horizontal_flip=False))

  def train(i):
    r = layerwise.train_and_evaluate(models[i], dataset, cfg, augment,
                                     jax.random.PRNGKey(i))
    return r.val_accuracies, r.train_losses

  layerwise.clear_cache()
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    together = list(pool.map(train, range(len(models))))
  engine = next(iter(layerwise._ENGINES.values()))  # pylint: disable=protected-access
  compiled = dict(engine.num_compiled)
  alone = [train(i) for i in range(len(models))]
  assert together == alone
  assert engine.num_compiled == compiled  # Nothing compiled twice.
  assert len(layerwise._ENGINES) == 1  # pylint: disable=protected-access
