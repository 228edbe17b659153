"""REINFORCE: closed-form pieces (tier 1) and learning a planted optimum (tier 4)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlnas import reinforce
from rlnas.controller import Controller
from rlnas.spaces import nasrl_cnn


def _cfg(**kw):
  cfg = ml_collections.ConfigDict(dict(learning_rate=0.05, grad_clip_norm=0.0))
  cfg.update(kw)
  return cfg


def test_ema_baseline_matches_hand_computation():
  decay = 0.9
  rewards = [jnp.asarray([0.2, 0.4]), jnp.asarray([1.0, 0.0]), jnp.asarray([0.9, 0.7])]
  b = jnp.zeros(())
  for step, r in enumerate(rewards):
    b = reinforce.ema_baseline(b, jnp.asarray(step), r, decay)
  # Step 0 starts from its own mean 0.3: b = 0.9*0.3 + 0.1*0.3 = 0.3;
  # step 1: 0.9*0.3 + 0.1*0.5 = 0.32; step 2: 0.9*0.32 + 0.1*0.8 = 0.368.
  assert float(b) == pytest.approx(0.368, abs=1e-6)


def test_update_uses_baseline_and_counts_steps():
  space = nasrl_cnn.NASRLCNNSpace(2, (1, 3), (1, 3), (1,), (1,), (8, 16))
  ctrl = Controller(space.decisions)
  state = reinforce.init_state(ctrl, _cfg(), jax.random.PRNGKey(0))
  tokens, _, _ = ctrl.sample(state.params, jax.random.PRNGKey(1), 4)
  same = jnp.full((4,), 0.5)
  new, metrics = reinforce.jitted_update(state, tokens, same, controller=ctrl,
                                         entropy_weight=0.0, baseline_decay=0.9)
  # Equal rewards at step 0: advantage 0, so no gradient and no parameter change.
  assert float(metrics["grad_norm"]) == 0.0
  assert int(new.step) == 1 and float(new.baseline) == pytest.approx(0.5)
  chex_equal = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)),
                                      new.params, state.params)
  assert all(jax.tree_util.tree_leaves(chex_equal))


def test_reward_from_accuracies():
  cfg = ml_collections.ConfigDict(dict(aggregate="max", last_k=5, power=3.0))
  accs = [0.1, 0.9, 0.5, 0.6, 0.7, 0.8, 0.4]
  # Zoph & Le 2017, sec. 4.1: max of the last 5 epochs (0.8), cubed.
  assert reinforce.reward_from_accuracies(accs, cfg) == pytest.approx(0.8 ** 3)
  cfg.aggregate = "last"
  assert reinforce.reward_from_accuracies(accs, cfg) == pytest.approx(0.4 ** 3)
  with pytest.raises(ValueError, match="finite"):
    reinforce.reward_from_accuracies([float("nan")], cfg)


def test_reinforce_learns_planted_optimum():
  # Toy reward with a known best architecture: the fraction of tokens equal to
  # `target`, cubed like the paper's reward (sharper near the optimum). The
  # controller must put > 0.9 probability on the whole target. A small entropy
  # bonus keeps it from committing early to a near-miss (without it, and at
  # lr 0.05, it locked onto 10 of 12 tokens within 40 steps).
  space = nasrl_cnn.NASRLCNNSpace(3, (1, 3, 5), (1, 3, 5), (1,), (1,), (8, 16, 32))
  target = jnp.asarray(space.random_tokens(jax.random.PRNGKey(42), 1)[0])
  ctrl = Controller(space.decisions)
  state = reinforce.init_state(ctrl, _cfg(learning_rate=0.01), jax.random.PRNGKey(0))

  @jax.jit
  def step(state, key):
    tokens, _, _ = ctrl.sample(state.params, key, 8)
    rewards = (tokens == target).mean(axis=1) ** 3
    return reinforce.update(state, tokens, rewards, controller=ctrl,
                            entropy_weight=0.02, baseline_decay=0.9)

  p_start = float(jnp.exp(ctrl.log_prob(state.params, target[None])[0][0]))
  for i in range(300):
    state, _ = step(state, jax.random.fold_in(jax.random.PRNGKey(7), i))
  p_best = float(jnp.exp(ctrl.log_prob(state.params, target[None])[0][0]))
  assert p_start < 1e-3  # 3 layers of 3*3*3 choices and 3 anchor bits: ~1/157,464
  assert p_best > 0.9, p_best
