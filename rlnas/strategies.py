"""Search strategies behind one interface: REINFORCE, random search, evolution.

A strategy proposes token vectors and learns from their rewards; it never sees
a child network. Its state is a pytree of arrays (checkpointed by the search
loop), and every proposal's randomness is `fold_in(key, step)`, so a resumed
search proposes exactly what an uninterrupted one would.

- `reinforce`: the NAS-RL LSTM controller trained by REINFORCE with an EMA
  baseline (Zoph & Le 2017, sec. 3.2).
- `random`: uniform sampling over the space: the honest control for any run.
- `evolution`: regularized (aging) evolution (Real et al. 2019, sec. 2:
  tournament selection over a population, one mutation per child, the oldest
  member dies); a population of `population_size` seeded by random samples.
"""

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlnas import reinforce
from rlnas.controller import Controller
from rlnas.spaces import base

_PROPOSE = 1  # fold_in tag of proposal keys (0: init, 2: children)


def proposal_key(seed: int, step: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _PROPOSE), step)


def make_controller(cfg: ml_collections.ConfigDict,
                    decisions: Sequence[base.Decision]) -> Controller:
  """The controller of `config.controller` over `decisions`."""
  return Controller(tuple(decisions), hidden_size=cfg.hidden_size,
                    num_layers=cfg.num_layers, init_range=cfg.init_range,
                    temperature=cfg.temperature,
                    tanh_constant=cfg.tanh_constant or None)


class ReinforceStrategy:
  """NAS-RL: sample from the LSTM controller, update it with REINFORCE."""
  name = "reinforce"

  def __init__(self, config: ml_collections.ConfigDict, decisions):
    self.cfg = config.controller
    self.seed = int(config.seed)
    self.controller = make_controller(self.cfg, decisions)

  def init_state(self) -> reinforce.ReinforceState:
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), 0)
    return reinforce.init_state(self.controller, self.cfg, key)

  def _at(self, decisions) -> Controller:
    return self.controller.with_decisions(decisions)

  def propose(self, state, step: int, num: int, decisions) -> np.ndarray:
    tokens, _, _ = self._at(decisions).sample(state.params, proposal_key(self.seed, step), num)
    return np.asarray(jax.device_get(tokens))

  def update(self, state, tokens: np.ndarray, rewards: np.ndarray, decisions):
    state, metrics = reinforce.jitted_update(
        state, jnp.asarray(tokens), jnp.asarray(rewards, jnp.float32),
        controller=self._at(decisions),
        entropy_weight=float(self.cfg.entropy_weight),
        baseline_decay=float(self.cfg.baseline_decay))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for k, v in metrics.items():
      if not np.isfinite(v):
        # The controller is tiny and its inputs are bounded: a non-finite
        # value is a bug or a bad setting, never something to train through.
        raise FloatingPointError(
            f"controller {k} became {v}; lower config.controller.learning_rate "
            "or set config.controller.grad_clip_norm")
    return state, metrics


@flax.struct.dataclass
class StepState:
  """State of strategies that only count steps."""
  step: jax.Array


class RandomStrategy:
  """Uniform random search over the same space, evaluator and outputs."""
  name = "random"

  def __init__(self, config: ml_collections.ConfigDict, decisions):
    self.seed = int(config.seed)

  def init_state(self) -> StepState:
    return StepState(step=jnp.zeros((), jnp.int32))

  def propose(self, state, step: int, num: int, decisions) -> np.ndarray:
    return np.asarray(base.random_tokens(decisions, proposal_key(self.seed, step), num))

  def update(self, state, tokens, rewards, decisions):
    return state.replace(step=state.step + 1), {}


@flax.struct.dataclass
class PopulationState:
  """Aging-evolution population as a ring buffer of the last P children."""
  step: jax.Array      # int32 []
  tokens: jax.Array    # int32 [P, T]
  rewards: jax.Array   # float32 [P]
  count: jax.Array     # int32 [], children ever added


def mutate(decisions: Sequence[base.Decision], key: jax.Array,
           tokens: jax.Array) -> jax.Array:
  """Changes one randomly chosen decision of tokens [T] (Real et al. 2019, sec. 2).

  A categorical decision gets a different choice, uniformly; an anchor decision
  flips one of its bits. Decisions with a single option are never picked.
  """
  starts, sizes, kinds = [], [], []
  pos = 0
  for d in decisions:
    if (d.kind == base.CATEGORICAL and d.num_choices > 1) or (
        d.kind == base.ANCHOR and d.num_choices > 0):
      starts.append(pos)
      sizes.append(d.num_choices)
      kinds.append(d.kind == base.ANCHOR)
    pos += d.num_tokens
  if not starts:
    return tokens
  k_dec, k_val = jax.random.split(key)
  which = jax.random.randint(k_dec, (), 0, len(starts))
  start, size, anchor = (jnp.asarray(starts)[which], jnp.asarray(sizes)[which],
                         jnp.asarray(kinds)[which])
  # Categorical: shift by 1..size-1 modulo size (a different value, uniformly).
  shift = jax.random.randint(k_val, (), 1, jnp.maximum(size, 2))
  bit = jax.random.randint(k_val, (), 0, size)
  current = tokens[start]
  new_cat = tokens.at[start].set((current + shift) % size)
  new_anchor = tokens.at[start + bit].set(1 - tokens[start + bit])
  return jnp.where(anchor, new_anchor, new_cat)


class EvolutionStrategy:
  """Regularized evolution: tournament of `sample_size`, mutate, oldest dies."""
  name = "evolution"

  def __init__(self, config: ml_collections.ConfigDict, decisions):
    self.seed = int(config.seed)
    self.population_size = int(config.evolution.population_size)
    self.sample_size = int(config.evolution.sample_size)
    self.num_tokens = base.num_tokens(decisions)

  def init_state(self) -> PopulationState:
    return PopulationState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.zeros((self.population_size, self.num_tokens), jnp.int32),
        rewards=jnp.zeros((self.population_size,), jnp.float32),
        count=jnp.zeros((), jnp.int32))

  def propose(self, state, step: int, num: int, decisions) -> np.ndarray:
    key = proposal_key(self.seed, step)
    size = int(min(int(state.count), self.population_size))
    out = []
    for i in range(num):
      k_init, k_pick, k_mut = jax.random.split(jax.random.fold_in(key, i), 3)
      if int(state.count) + i < self.population_size or size == 0:
        out.append(base.random_tokens(decisions, k_init, 1)[0])
        continue
      members = jax.random.choice(k_pick, size, (self.sample_size,), replace=True)
      parent = state.tokens[members[jnp.argmax(state.rewards[members])]]
      out.append(mutate(decisions, k_mut, parent))
    return np.asarray(jnp.stack(out))

  def update(self, state, tokens, rewards, decisions):
    tok, rew = np.array(state.tokens), np.array(state.rewards)
    count = int(state.count)
    for t, r in zip(tokens, rewards):
      tok[count % self.population_size] = t   # overwrite the oldest
      rew[count % self.population_size] = r
      count += 1
    return state.replace(step=state.step + 1, tokens=jnp.asarray(tok),
                         rewards=jnp.asarray(rew), count=jnp.asarray(count, jnp.int32)), {}


_STRATEGIES = {s.name: s for s in (ReinforceStrategy, RandomStrategy, EvolutionStrategy)}


def names() -> tuple[str, ...]:
  return tuple(sorted(_STRATEGIES))


def make(config: ml_collections.ConfigDict, decisions) -> Any:
  name = config.search.strategy
  if name not in _STRATEGIES:
    raise ValueError(f"unknown search strategy {name!r}; known: {', '.join(names())} "
                     "(set config.search.strategy)")
  return _STRATEGIES[name](config, decisions)
