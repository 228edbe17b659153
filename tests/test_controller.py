"""Closed-form controller math (tier 1) and structure (tier 2)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlnas.controller import Controller
from rlnas.spaces import base
from rlnas.spaces import nasrl_cnn


def _space(**kw):
  args = dict(num_layers=3, filter_heights=(1, 3, 5, 7), filter_widths=(1, 3, 5, 7),
              stride_heights=(1, 2, 3), stride_widths=(1, 2, 3),
              num_filters=(24, 36, 48, 64))
  args.update(kw)
  return nasrl_cnn.NASRLCNNSpace(**args)


def test_uniform_logits_entropy_and_log_prob_closed_form():
  space = _space()
  # init_range 0 zeroes every weight: h = 0, all logits 0, the policy is uniform.
  ctrl = Controller(space.decisions, init_range=0.0)
  params = ctrl.init(jax.random.PRNGKey(0))
  tokens, log_prob, entropy = ctrl.sample(params, jax.random.PRNGKey(1), 5)
  # 3 layers x (4 * 4 * 3 * 3 * 4 choices) and 0 + 1 + 2 anchor bits.
  expected = 3 * (math.log(4) * 3 + math.log(3) * 2) + 3 * math.log(2)
  assert base.log_space_size(space.decisions) == pytest.approx(expected)
  np.testing.assert_allclose(entropy, expected, rtol=1e-5)
  np.testing.assert_allclose(log_prob, -expected, rtol=1e-5)
  lp2, ent2 = ctrl.log_prob(params, tokens)
  np.testing.assert_allclose(lp2, log_prob, rtol=1e-6)
  np.testing.assert_allclose(ent2, entropy, rtol=1e-6)


def test_teacher_forced_log_prob_matches_sampling():
  space = _space()
  ctrl = Controller(space.decisions)
  params = ctrl.init(jax.random.PRNGKey(3))
  tokens, log_prob, entropy = ctrl.sample(params, jax.random.PRNGKey(4), 16)
  assert tokens.shape == (16, space.num_tokens) and tokens.dtype == jnp.int32
  lp, ent = ctrl.log_prob(params, tokens)
  np.testing.assert_allclose(lp, log_prob, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, entropy, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(log_prob) < 0)


@pytest.mark.parametrize("tanh_constant", [None, 2.5])
def test_temperature_scales_gradients_by_inverse_temperature(tanh_constant):
  space = _space(num_layers=2)
  tokens = jnp.asarray([space.random_tokens(jax.random.PRNGKey(0), 1)[0]])

  def grad_wrt_softmax_bias(temperature):
    ctrl = Controller(space.decisions, init_range=0.0, temperature=temperature,
                      tanh_constant=tanh_constant)
    params = ctrl.init(jax.random.PRNGKey(0))
    grads = jax.grad(lambda p: ctrl.log_prob(p, tokens)[0].sum())(params)
    return grads["softmax_num_filters"]["bias"]

  g1, g2 = grad_wrt_softmax_bias(1.0), grad_wrt_softmax_bias(2.0)
  assert np.abs(g1).max() > 0
  # At uniform logits d log p / d logit = (onehot - 1/N) / T (times c if tanh-clipped).
  np.testing.assert_allclose(g2, g1 / 2.0, rtol=1e-5)
  # Two layers each add (onehot - 1/4) * c / T for their num_filters token:
  # entries sum to zero and the chosen entries reach at most 2 * c * 3/4.
  scale = tanh_constant or 1.0
  np.testing.assert_allclose(np.asarray(g1).sum(), 0.0, atol=1e-6)
  assert np.abs(g1).max() <= 2 * scale * (1 - 0.25) + 1e-6
  assert np.abs(g1).max() >= scale * (1 - 0.25) - 1e-6


def test_anchor_decisions_and_heads_structure():
  space = _space(num_layers=4, stride_heights=(1,), stride_widths=(1,))
  names = [d.name for d in space.decisions]
  # Paper order per layer (Zoph & Le 2017, Fig. 4): anchor, FH, FW, (SH, SW), NF;
  # fixed strides are constants, not decisions.
  assert names[:4] == ["layer_0/inputs", "layer_0/filter_height",
                       "layer_0/filter_width", "layer_0/num_filters"]
  anchors = [d.num_choices for d in space.decisions if d.kind == base.ANCHOR]
  assert anchors == [0, 1, 2, 3]
  assert space.num_tokens == 4 * 3 + (0 + 1 + 2 + 3)
  ctrl = Controller(space.decisions)
  params = ctrl.init(jax.random.PRNGKey(0))
  # 2 LSTM layers x 35 units: 4 gates x (35 in + 35 recurrent) x 35 + 4 x 35 bias.
  lstm = sum(x.size for x in jax.tree_util.tree_leaves(params["lstm_0"]))
  assert lstm == 4 * (35 * 35 + 35 * 35) + 4 * 35
  flat = jax.tree_util.tree_leaves(params)
  assert all(np.abs(np.asarray(x)).max() <= 0.08 for x in flat)


def test_parameters_shared_across_depths():
  shallow, deep = _space(num_layers=2), _space(num_layers=5)
  ctrl = Controller(shallow.decisions)
  params = ctrl.init(jax.random.PRNGKey(0))
  deep_ctrl = ctrl.with_decisions(deep.decisions)
  tokens, lp, _ = deep_ctrl.sample(params, jax.random.PRNGKey(1), 3)
  assert tokens.shape == (3, deep.num_tokens)
  assert jax.tree_util.tree_structure(deep_ctrl.init(jax.random.PRNGKey(0))) == \
      jax.tree_util.tree_structure(params)
  for row in np.asarray(tokens):
    deep.from_tokens(row)
