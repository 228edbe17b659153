"""Search-space and child-network structure (tier 2)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlnas import child as child_lib
from rlnas.child import cnn
from rlnas.spaces import base
from rlnas.spaces import nasrl_cnn
from rlnas.spaces.nasrl_cnn import Layer


def _space(**kw):
  args = dict(num_layers=3, filter_heights=(1, 3, 5, 7), filter_widths=(1, 3, 5, 7),
              stride_heights=(1, 2, 3), stride_widths=(1, 2, 3),
              num_filters=(24, 36, 48, 64))
  args.update(kw)
  return nasrl_cnn.NASRLCNNSpace(**args)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_tokens_round_trip_and_json():
  space = _space()
  tokens = np.asarray(space.random_tokens(jax.random.PRNGKey(0), 20))
  for row in tokens:
    arch = space.from_tokens(row)
    assert space.to_tokens(arch.details) == arch.tokens
    record = json.loads(json.dumps(arch.to_json()))
    again = space.from_tokens(base.tokens_from_json(record, space.name))
    assert again == arch and again.key == arch.key and str(again) == str(arch)
    assert len(str(arch).splitlines()) == space.num_layers
  keys = {space.from_tokens(r).key for r in tokens}
  assert len(keys) == len(tokens)  # 20 draws from ~1e10 architectures


def test_bad_tokens_and_json_are_rejected():
  space = _space(num_layers=2)
  with pytest.raises(base.ArchitectureError, match="expected 11 tokens"):
    space.from_tokens([0] * 3)
  with pytest.raises(base.ArchitectureError, match="outside"):
    space.from_tokens([9] * space.num_tokens)
  with pytest.raises(base.ArchitectureError, match="not valid JSON"):
    base.tokens_from_json("{oops", space.name)
  with pytest.raises(base.ArchitectureError, match="search space 'nb201'"):
    base.tokens_from_json({"space": "nb201", "tokens": [0]}, space.name)
  with pytest.raises(base.ArchitectureError, match="list of ints"):
    base.tokens_from_json({"tokens": ["a"]}, space.name)


def test_config_validation_of_choice_lists():
  cfg = ml_collections.ConfigDict(dict(
      num_layers=2, filter_heights=(), filter_widths=(3,), stride_heights=(1,),
      stride_widths=(1,), num_filters=(8,), skip_connections=True))
  with pytest.raises(ValueError, match="filter_heights is empty"):
    nasrl_cnn.NASRLCNNSpace.from_config(cfg)
  with pytest.raises(ValueError, match="num_layers must be >= 1"):
    _space(num_layers=0)


def test_tutorial_keras_model_parameter_count():
  # The Keras tutorial's hand-written model: three conv-BN-ReLU cells, 3x3
  # kernels, 32/64/128 filters, strides 1/2/2, "same" padding, 28x28x1 input,
  # flatten, dense 10, expressed as an architecture of this space.
  space = nasrl_cnn.NASRLCNNSpace(
      num_layers=3, filter_heights=(3,), filter_widths=(3,), stride_heights=(1, 2),
      stride_widths=(1, 2), num_filters=(32, 64, 128))
  layers = (Layer(3, 3, 1, 1, 32, ()), Layer(3, 3, 2, 2, 64, (0,)),
            Layer(3, 3, 2, 2, 128, (1,)))
  arch = space.from_tokens(space.to_tokens(layers))
  model = child_lib.build_model(arch, 10, ml_collections.ConfigDict(dict(
      head="flatten", use_bias=True, bn_momentum=0.99)))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  # conv1 3*3*1*32 + 32 = 320, BN 2*32 = 64; conv2 3*3*32*64 + 64 = 18,496,
  # BN 128; conv3 3*3*64*128 + 128 = 73,856, BN 256; 28 -> 28 -> 14 -> 7, so
  # flatten 7*7*128 = 6,272 and dense 6,272*10 + 10 = 62,730.
  # 320 + 64 + 18,496 + 128 + 73,856 + 256 + 62,730 = 155,850.
  assert _count(variables["params"]) == 155_850
  # BatchNorm mean and variance: 2 * (32 + 64 + 128) = 448.
  assert _count(variables["batch_stats"]) == 448
  logits = model.apply(variables, jnp.zeros((2, 28, 28, 1)))
  assert logits.shape == (2, 10)


@pytest.mark.parametrize("layers, expected_hw, expected_channels", [
    # Chain with strides: 12 -> ceil(12/2)=6 -> ceil(6/3)=2; only L2 feeds the head.
    ((Layer(3, 3, 2, 2, 8, ()), Layer(1, 5, 3, 3, 16, (0,)),
      Layer(7, 1, 1, 1, 4, (1,))), (2, 2), 4),
    # Skips: L2 reads image-sized L0 (12x12) and strided L1 (6x6): L1 is
    # zero-padded to 12x12 before concatenation; L2 with stride 1 stays 12x12.
    # L2 is the only unconsumed layer.
    ((Layer(3, 3, 1, 1, 8, ()), Layer(3, 3, 2, 2, 16, (0,)),
      Layer(1, 1, 1, 1, 4, (0, 1))), (12, 12), 4),
    # No inputs: L1 takes the image (stride 3x1: 4x12); L0 (12x4) and L1 are
    # both unconsumed, padded to 12x12 and concatenated -> 8 + 16 channels.
    ((Layer(5, 5, 1, 3, 8, ()), Layer(3, 3, 3, 1, 16, ())), (4, 12), 24),
])
def test_child_shapes_with_strides_and_skips(layers, expected_hw, expected_channels):
  model = cnn.NASRLConvNet(layers=layers, num_classes=5)
  x = jnp.ones((2, 12, 12, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  captured = model.apply(variables, x, capture_intermediates=True,
                         mutable=["intermediates"])[1]["intermediates"]
  logits = model.apply(variables, x)
  assert logits.shape == (2, 5)
  last = max(int(k.split("_")[1]) for k in captured if k.startswith("layer_"))
  assert last == len(layers) - 1
  # The classifier sees the padded concatenation of unconsumed layers.
  dense_in = variables["params"]["classifier"]["kernel"].shape[0]
  assert dense_in == expected_channels
  conv_kernel = variables["params"][f"layer_{len(layers) - 1}"]["Conv_0"]["kernel"]
  in_channels = sum(layers[j].num_filters for j in layers[-1].inputs) or 3
  assert conv_kernel.shape == (layers[-1].filter_height, layers[-1].filter_width,
                               in_channels, layers[-1].num_filters)
  out = captured[f"layer_{len(layers) - 1}"]["__call__"][0]
  assert out.shape[1:3] == expected_hw


def test_every_choice_builds():
  space = _space(num_layers=2, filter_heights=(1, 3, 5, 7), filter_widths=(1, 7),
                 stride_heights=(1, 2, 3), stride_widths=(1, 3), num_filters=(24, 64))
  cfg = ml_collections.ConfigDict(dict(head="gap", use_bias=False, bn_momentum=0.9))
  x = jnp.ones((1, 9, 9, 1))
  for fh in (1, 3, 5, 7):
    for sh in (1, 2, 3):
      layers = (Layer(fh, 7, sh, 3, 24, ()), Layer(fh, 1, 1, 1, 64, (0,)))
      arch = space.from_tokens(space.to_tokens(layers))
      model = child_lib.build_model(arch, 10, cfg)
      variables = model.init(jax.random.PRNGKey(0), x)
      # no bias: conv1 fh*7*1*24, conv2 fh*1*24*64, BN 2*(24+64), dense 64*10+10.
      expected = fh * 7 * 24 + fh * 24 * 64 + 2 * (24 + 64) + 64 * 10 + 10
      assert _count(variables["params"]) == expected
      assert model.apply(variables, x).shape == (1, 10)


def test_one_dimensional_inputs():
  space = nasrl_cnn.NASRLCNNSpace(num_layers=2, filter_heights=(1,), filter_widths=(3, 5),
                                  stride_heights=(1,), stride_widths=(1, 2),
                                  num_filters=(8, 16))
  # Filter height fixed to 1 is a constant, not a decision.
  assert not any("filter_height" in d.name for d in space.decisions)
  arch = space.from_tokens(np.asarray(space.random_tokens(jax.random.PRNGKey(1), 1)[0]))
  model = child_lib.build_model(arch, 10, ml_collections.ConfigDict(dict(
      head="gap", use_bias=True, bn_momentum=0.9)))
  x = jnp.ones((4, 40, 1))  # mnist1d: [N, L, C]
  variables = model.init(jax.random.PRNGKey(0), x)
  assert model.apply(variables, x).shape == (4, 10)
