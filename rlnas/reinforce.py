"""REINFORCE with an exponential-moving-average baseline (Zoph & Le 2017, sec. 3.2).

The policy gradient of sec. 3.2, eq. (2), with the baseline b an exponential
moving average of previous rewards:

  loss = -mean_k[stop_gradient(R_k - b) * log p(a_k)] - entropy_weight * H

The baseline is updated after the gradient step (so R_k - b compares a reward
with the rewards that came before it). Before the first update it holds no
information, so the first batch's advantage uses that batch's mean reward.

Rewards turn child validation accuracies into a scalar (`reward_from_accuracies`);
the paper's is the maximum validation accuracy of the last 5 epochs, cubed (sec.
4.1).
"""

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlnas.controller import Controller


@flax.struct.dataclass
class ReinforceState:
  """Controller training state. All leaves are arrays (checkpointable)."""
  step: jax.Array            # int32 [], controller updates applied
  params: Any                # controller parameters
  opt_state: Any             # optimizer state
  baseline: jax.Array        # float32 [], EMA of rewards
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (Zoph & Le 2017, sec. 4.1: lr 0.0006), optional global-norm clipping."""
  return _optimizer(float(cfg.learning_rate), float(cfg.get("grad_clip_norm") or 0.0))


@functools.lru_cache(maxsize=None)
def _optimizer(learning_rate: float, clip: float) -> optax.GradientTransformation:
  # Cached: `tx` is a static field of ReinforceState, so a new object per run
  # would recompile `jitted_update` for every search started in one process.
  adam = optax.adam(learning_rate)
  if clip:
    return optax.chain(optax.clip_by_global_norm(clip), adam)
  return adam


def init_state(controller: Controller, cfg: ml_collections.ConfigDict,
               rng: jax.Array) -> ReinforceState:
  params = controller.init(rng)
  tx = make_optimizer(cfg)
  return ReinforceState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=tx.init(params),
                        baseline=jnp.zeros((), jnp.float32), tx=tx)


def ema_baseline(baseline: jax.Array, step: jax.Array, rewards: jax.Array,
                 decay: float) -> jax.Array:
  """b <- decay * b + (1 - decay) * mean(R); the first step starts from mean(R)."""
  mean = rewards.mean()
  previous = jnp.where(step == 0, mean, baseline)
  return decay * previous + (1.0 - decay) * mean


def reinforce_loss(params, controller: Controller, tokens, rewards, baseline,
                   entropy_weight: float):
  """REINFORCE loss and metrics. tokens int32 [M, T]; rewards [M]; baseline []."""
  log_prob, entropy = controller.log_prob(params, tokens)
  advantage = rewards - baseline
  loss = -(jax.lax.stop_gradient(advantage) * log_prob).mean() - entropy_weight * entropy.mean()
  return loss, {"log_prob": log_prob.mean(), "entropy": entropy.mean(),
                "advantage_abs": jnp.abs(advantage).mean()}


def update(state: ReinforceState, tokens: jax.Array, rewards: jax.Array, *,
           controller: Controller, entropy_weight: float,
           baseline_decay: float) -> tuple[ReinforceState, dict[str, jax.Array]]:
  """One policy-gradient step. tokens int32 [M, T]; rewards float32 [M].

  Pure; jit it with `controller`, `entropy_weight` and `baseline_decay` static
  (see `jitted_update`).
  """
  rewards = rewards.astype(jnp.float32)
  baseline = jnp.where(state.step == 0, rewards.mean(), state.baseline)
  grad_fn = jax.grad(reinforce_loss, has_aux=True)
  grads, metrics = grad_fn(state.params, controller, tokens, rewards, baseline,
                           entropy_weight)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_baseline = ema_baseline(state.baseline, state.step, rewards, baseline_decay)
  metrics.update(reward_mean=rewards.mean(), baseline=new_baseline,
                 grad_norm=optax.global_norm(grads))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       baseline=new_baseline), metrics


jitted_update = jax.jit(update, static_argnames=("controller", "entropy_weight",
                                                 "baseline_decay"))


def reward_from_accuracies(val_accuracies: Sequence[float],
                           cfg: ml_collections.ConfigDict) -> float:
  """Scalar reward from per-epoch validation accuracies (fractions in [0, 1]).

  `cfg.last_k` epochs are considered; `cfg.aggregate` is "max" (Zoph & Le 2017,
  sec. 4.1: "maximum validation accuracy of the last 5 epochs") or "last";
  the result is raised to `cfg.power` (sec. 4.1: cubed).
  """
  accs = np.asarray(val_accuracies, np.float64)[-cfg.last_k:]
  if accs.size == 0 or not np.all(np.isfinite(accs)):
    raise ValueError(f"no finite validation accuracies in {val_accuracies}")
  if cfg.aggregate == "max":
    value = accs.max()
  elif cfg.aggregate == "last":
    value = accs[-1]
  else:
    raise ValueError(f"reward.aggregate must be 'max' or 'last', got {cfg.aggregate!r}")
  return float(value ** cfg.power)
