"""Whole NAS-Bench-201 searches as one jitted JAX function, vmapped over seeds.

A search run on a tabular benchmark is a loop over queries: propose a cell,
look up its validation accuracy (the reward) and its simulated training cost,
update the strategy, charge the clock, track the best cell seen. Here that loop
is a `lax.while_loop` and the seed is a `vmap` axis, so 500 runs of a strategy
are one compiled call (`run_many`).

Protocol (NAS-Bench-201, Dong & Yang 2020, search experiments; NATS-Bench
`exps/NATS-algos/*.py`): each query is charged `table.cost_s` (12 epochs of
training); the result of a run is the test accuracy of the cell with the best
validation accuracy seen. One deliberate difference: the reference loops stop
after the first query that crosses the budget (so they overspend by one query);
here a query that would not fit is not made and the run ends, so a run never
spends more than `budget_s`. A run also ends after `max_queries` queries.

Strategies are small frozen dataclasses with three pure methods:
  init(key) -> state
  propose(state, key) -> tokens int32 [6]
  update(state, tokens, reward) -> state      (reward = valid_acc / 100)
They must be hashable (they are static under jit), and so must a policy
inside one. Randomness follows the ordinary search loop (`rlnas.search` with
one child per step): init from `fold_in(PRNGKey(seed), 0)`, query t proposed
with `rlnas.strategies.proposal_key(seed, t)`; random search and uniform-edge
evolution draw exactly as `rlnas.strategies` does, so the same seed gives the
same cells whichever loop drives the strategy (tests/test_nb201.py checks it).
"""

import dataclasses
import functools
import math
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlnas import reinforce
from rlnas import strategies
from rlnas import tabular
from rlnas.spaces import base
from rlnas.spaces import nb201

# NAS-Bench-201 (Dong & Yang 2020), search experiments: a search on CIFAR-10
# gets a simulated budget of 12,000 s.
DEFAULT_BUDGET_S = 12000.0

_DECISIONS = nb201.NB201Space().decisions


# ----------------------------------------------------------------------------
# Strategies.


@dataclasses.dataclass(frozen=True)
class RandomSearch:
  """Uniform sampling of cells (Bergstra & Bengio 2012; NAS-Bench-201 "RS")."""

  def init(self, key: jax.Array) -> tuple[()]:
    del key
    return ()

  def propose(self, state: Any, key: jax.Array) -> jax.Array:
    del state
    return _random_cell(key)

  def update(self, state, tokens, reward):
    del tokens, reward
    return state


def _random_cell(key: jax.Array) -> jax.Array:
  """A uniform cell, int32 [6], drawn as `rlnas.strategies` draws one."""
  return base.random_tokens(_DECISIONS, key, 1)[0]


@flax.struct.dataclass
class Population:
  """REA state: a ring buffer of the most recent `population_size` cells.

  Attributes:
    tokens: int32 [P, 6]; slot `count % P` holds the oldest member once full.
    fitness: float32 [P], reward of each member.
    count: int32 [], number of cells ever added (queries made).
  """
  tokens: jax.Array
  fitness: jax.Array
  count: jax.Array


@dataclasses.dataclass(frozen=True)
class RegularizedEvolution:
  """Aging evolution (Real et al. 2019, Algorithm 1).

  The first `population_size` queries are uniform; then each query mutates the
  fittest of `sample_size` members drawn uniformly with replacement (the first
  of equals wins, as Python's `max`), and the child replaces the oldest
  member. Defaults are NATS-Bench's (`regularized_ea.py --ea_population 10
  --ea_sample_size 3`).

  Attributes:
    population_size: P, members kept.
    sample_size: S, tournament size.
    uniform_edge: how mutation picks the edge to change. False: as
      NATS-Bench's `mutate_topology_func`, a node uniformly in {1, 2, 3}, then
      one of its incoming edges uniformly (so edge 0->1 is picked with
      probability 1/3, each edge into node 3 with 1/9). True: one of the 6
      edges uniformly, exactly as `rlnas.strategies.mutate`. Either way the
      new op is uniform among the 4 others.
  """
  population_size: int = 10
  sample_size: int = 3
  uniform_edge: bool = False

  def init(self, key: jax.Array) -> Population:
    del key
    p = self.population_size
    return Population(tokens=jnp.zeros((p, nb201.NUM_EDGES), jnp.int32),
                      fitness=jnp.zeros((p,), jnp.float32),
                      count=jnp.zeros((), jnp.int32))

  def mutate(self, tokens: jax.Array, key: jax.Array) -> jax.Array:
    """Changes one edge's op to a different op. tokens: int32 [6]."""
    if self.uniform_edge:
      return strategies.mutate(_DECISIONS, key, tokens)
    k_node, k_edge, k_op = jax.random.split(key, 3)
    node = jax.random.randint(k_node, (), 1, nb201.NUM_NODES)  # edge's target
    src = jax.random.randint(k_edge, (), 0, node)
    edge = node * (node - 1) // 2 + src  # position of (src, node) in EDGES
    shift = jax.random.randint(k_op, (), 1, nb201.NUM_OPS)
    return tokens.at[edge].set((tokens[edge] + shift) % nb201.NUM_OPS)

  def propose(self, state: Population, key: jax.Array) -> jax.Array:
    # Key use as `rlnas.strategies.EvolutionStrategy` for child 0 of a step.
    k_init, k_pick, k_mutate = jax.random.split(jax.random.fold_in(key, 0), 3)
    fresh = _random_cell(k_init)
    picks = jax.random.choice(k_pick, self.population_size,
                              (self.sample_size,), replace=True)
    parent = picks[jnp.argmax(state.fitness[picks])]
    child = self.mutate(state.tokens[parent], k_mutate)
    return jnp.where(state.count < self.population_size, fresh, child)

  def update(self, state: Population, tokens, reward) -> Population:
    slot = state.count % self.population_size  # the oldest member once full
    return Population(tokens=state.tokens.at[slot].set(tokens),
                      fitness=state.fitness.at[slot].set(reward),
                      count=state.count + 1)


@dataclasses.dataclass(frozen=True)
class LogitsPolicy:
  """Independent per-edge softmaxes: the NAS-Bench-201 papers' "REINFORCE".

  NATS-Bench `reinforce.py` (`PolicyTopology`): a [6, 5] logit table,
  initialised to 1e-3 * N(0, 1), one categorical per edge, no conditioning
  between edges. Same `sample`/`log_prob` contract as `rlnas.controller`.

  Attributes:
    temperature: logits are divided by it before the softmax.
    init_scale: std of the initial logits.
  """
  temperature: float = 1.0
  init_scale: float = 1e-3

  def init(self, rng: jax.Array) -> jax.Array:
    return self.init_scale * jax.random.normal(
        rng, (nb201.NUM_EDGES, nb201.NUM_OPS), jnp.float32)

  def sample(self, params: jax.Array, rng: jax.Array, num: int):
    """tokens int32 [num, 6], log_prob [num], entropy [num].

    Inverse-CDF sampling: one uniform per edge instead of the Gumbel-max
    trick's one per op. Random bits dominate the runner's cost (threefry on
    CPU), and this halves a whole REINFORCE run.
    """
    probs = jax.nn.softmax(params / self.temperature, axis=-1)  # [6, 5]
    u = jax.random.uniform(rng, (num, nb201.NUM_EDGES, 1))
    below = jnp.sum(jnp.cumsum(probs, axis=-1) < u, axis=-1)
    tokens = jnp.minimum(below, nb201.NUM_OPS - 1).astype(jnp.int32)
    log_prob, entropy = self.log_prob(params, tokens)
    return tokens, log_prob, entropy

  def log_prob(self, params: jax.Array, tokens: jax.Array):
    """log p(tokens) [num] and policy entropy [num] for tokens int [num, 6]."""
    logp = jax.nn.log_softmax(params / self.temperature, axis=-1)  # [6, 5]
    picked = jnp.take_along_axis(logp[None], tokens[..., None], axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp)
    return picked[..., 0].sum(-1), jnp.broadcast_to(entropy, tokens.shape[:1])


@flax.struct.dataclass
class PolicyState:
  """REINFORCE state: rlnas's controller state plus an advantage scale.

  Attributes:
    rl: `rlnas.reinforce.ReinforceState` (step, params, opt_state, EMA
      baseline, optimizer).
    adv_sq_sum: float32 [], decayed sum of squared advantages.
    adv_sq_weight: float32 [], decayed count (bias correction).
  """
  rl: reinforce.ReinforceState
  adv_sq_sum: jax.Array
  adv_sq_weight: jax.Array


@dataclasses.dataclass(frozen=True)
class Reinforce:
  """REINFORCE (Williams 1992) with an EMA baseline, one query per update.

  The update is rlnas's (`rlnas.reinforce.update`): loss
  `-(stop_gradient(R - b) * log_prob).mean() - entropy_weight * entropy.mean()`,
  the baseline b an EMA of earlier rewards updated after the step (the first
  step's baseline is its own reward). NATS-Bench's `reinforce.py` instead folds
  the current reward into a bias-corrected EMA before the step; that scales the
  advantage by `baseline_decay` after the first few steps, which Adam undoes.

  Attributes:
    policy: `LogitsPolicy()` (independent per-edge logits, the benchmark
      papers' variant) or an `rlnas.controller.Controller` over
      `NB201Space().decisions` (the Zoph & Le LSTM); anything with that
      init/sample/log_prob contract. Must be hashable.
    learning_rate: optimizer step size (NATS-Bench: Adam, 0.01).
    baseline_decay: EMA decay (NATS-Bench `--EMA_momentum`: 0.9).
    entropy_weight: weight of the entropy bonus (NATS-Bench: 0).
    optimizer_name: "adam" (NATS-Bench, Zoph & Le) or "sgd". With one sample
      per update Adam's per-parameter normalisation makes early steps nearly
      sign-like: a tiny advantage moves the logits as far as a large one.
    normalize_advantage: divide the advantage by the running RMS of past
      advantages (an EMA with `baseline_decay`), so its scale is stationary and
      one very bad cell (accuracy 10%) does not dominate later steps. Not in
      the papers; measured in bench/nb201_results.md.
  """
  policy: Any = LogitsPolicy()
  learning_rate: float = 0.01
  baseline_decay: float = 0.9
  entropy_weight: float = 0.0
  optimizer_name: str = "adam"
  normalize_advantage: bool = False

  def make_optimizer(self) -> optax.GradientTransformation:
    if self.optimizer_name == "adam":
      return optax.adam(self.learning_rate)
    if self.optimizer_name == "sgd":
      return optax.sgd(self.learning_rate)
    raise ValueError(f"unknown optimizer {self.optimizer_name!r}")

  def init(self, key: jax.Array) -> PolicyState:
    params = self.policy.init(key)
    tx = self.make_optimizer()
    rl = reinforce.ReinforceState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=tx.init(params), baseline=jnp.zeros((), jnp.float32), tx=tx)
    return PolicyState(rl=rl, adv_sq_sum=jnp.zeros((), jnp.float32),
                       adv_sq_weight=jnp.zeros((), jnp.float32))

  def propose(self, state: PolicyState, key: jax.Array) -> jax.Array:
    tokens, _, _ = self.policy.sample(state.rl.params, key, 1)
    return tokens[0]

  def update(self, state: PolicyState, tokens: jax.Array,
             reward: jax.Array) -> PolicyState:
    """One REINFORCE step on a single cell: tokens int32 [6], reward []."""
    tokens, rewards = tokens[None], jnp.reshape(reward, (1,)).astype(jnp.float32)
    if not self.normalize_advantage:
      rl, _ = reinforce.update(state.rl, tokens, rewards, controller=self.policy,
                               entropy_weight=self.entropy_weight,
                               baseline_decay=self.baseline_decay)
      return state.replace(rl=rl)
    # The same step, with R and b both divided by the advantages' running RMS.
    rl, d = state.rl, self.baseline_decay
    baseline = jnp.where(rl.step == 0, rewards.mean(), rl.baseline)
    adv_sq_sum = d * state.adv_sq_sum + (1 - d) * jnp.mean(
        (rewards - baseline) ** 2)
    adv_sq_weight = d * state.adv_sq_weight + (1 - d)
    scale = jax.lax.rsqrt(adv_sq_sum / adv_sq_weight + 1e-12)
    grads, _ = jax.grad(reinforce.reinforce_loss, has_aux=True)(
        rl.params, self.policy, tokens, rewards * scale, baseline * scale,
        self.entropy_weight)
    updates, opt_state = rl.tx.update(grads, rl.opt_state, rl.params)
    rl = rl.replace(
        step=rl.step + 1, params=optax.apply_updates(rl.params, updates),
        opt_state=opt_state,
        baseline=reinforce.ema_baseline(rl.baseline, rl.step, rewards, d))
    return PolicyState(rl=rl, adv_sq_sum=adv_sq_sum,
                       adv_sq_weight=adv_sq_weight)


@flax.struct.dataclass
class MemoryState:
  """`NoRepeats` state: the inner strategy's state and the cells queried.

  Attributes:
    inner: the wrapped strategy's state.
    seen: bool [15625], cells this run has already queried.
  """
  inner: Any
  seen: jax.Array


@dataclasses.dataclass(frozen=True)
class NoRepeats:
  """Wraps a strategy so that it does not pay twice for the same cell.

  A searcher that trained a cell knows its accuracy; proposing it again wastes
  a 12-epoch training run of the budget (the reference loops do this: REA
  repeats ~9% of its queries, REINFORCE at a high learning rate ~50%). This
  wrapper draws `num_candidates` proposals from the inner strategy (same state,
  different keys) and submits the first one not queried before; if all were
  seen, a uniformly random unseen one. The inner strategy's update is
  unchanged, so the policy gradient is the ordinary one for the cell actually
  queried. Every query is still charged in full.

  Attributes:
    inner: the strategy to wrap.
    num_candidates: proposals drawn per query.
  """
  inner: Any
  num_candidates: int = 32

  def init(self, key: jax.Array) -> MemoryState:
    return MemoryState(inner=self.inner.init(key),
                       seen=jnp.zeros((nb201.NUM_ARCHS,), bool))

  def propose(self, state: MemoryState, key: jax.Array) -> jax.Array:
    k_cands, k_fallback = jax.random.split(key)
    keys = jax.random.split(k_cands, self.num_candidates)
    cands = jax.vmap(lambda k: self.inner.propose(state.inner, k))(keys)
    # If every proposal was seen, the policy has collapsed onto known cells
    # and re-querying one buys nothing: fall back to uniform cells. With at
    # most a few hundred of the 15,625 cells seen, all 8 being seen has
    # probability below 1e-15.
    fallback = jax.random.randint(k_fallback, (8, nb201.NUM_EDGES), 0,
                                  nb201.NUM_OPS, jnp.int32)
    cands = jnp.concatenate([cands, fallback])
    novel = ~state.seen[nb201.tokens_to_index(cands)]
    return cands[jnp.argmax(novel)]  # the first novel candidate

  def update(self, state: MemoryState, tokens, reward) -> MemoryState:
    return MemoryState(
        inner=self.inner.update(state.inner, tokens, reward),
        seen=state.seen.at[nb201.tokens_to_index(tokens)].set(True))


# ----------------------------------------------------------------------------
# The run loop.


@dataclasses.dataclass(frozen=True)
class Budget:
  """When a run stops: whichever limit is hit first.

  Attributes:
    seconds: simulated seconds (NAS-Bench-201 protocol: 12,000 s on CIFAR-10).
    max_queries: number of queries, None for no limit.
  """
  seconds: float = DEFAULT_BUDGET_S
  max_queries: Optional[int] = None


def num_slots(table: tabular.Table, budget: Budget) -> int:
  """Host: an upper bound on queries per run (the trace length)."""
  limit = budget.max_queries if budget.max_queries is not None else math.inf
  if math.isfinite(budget.seconds):
    cheapest = float(np.min(np.asarray(table.cost_s)))
    limit = min(limit, math.floor(budget.seconds / cheapest) + 1)
  if not math.isfinite(limit):
    raise ValueError("budget needs finite seconds or max_queries")
  return max(int(limit), 1)


@flax.struct.dataclass
class Trace:
  """Per-query record of one run; slots after the last query hold -1 / NaN.

  All arrays have shape [Q] (`num_slots`), batched as [num_seeds, Q] by
  `run_many`.

  Attributes:
    index: int32, dense index of the queried cell.
    valid_acc: float32, its validation accuracy (percent).
    time_s: float32, simulated seconds spent after this query.
    best_valid: float32, best validation accuracy seen so far.
    best_test: float32, test accuracy of that best-validation cell.
  """
  index: jax.Array
  valid_acc: jax.Array
  time_s: jax.Array
  best_valid: jax.Array
  best_test: jax.Array


@flax.struct.dataclass
class RunState:
  """Carry of the query loop (also the final result of a run).

  Attributes:
    strategy: the strategy's own state.
    step: int32 [], queries made so far.
    time_s: float32 [], simulated seconds spent; never above the budget.
    done: bool [], the next proposal did not fit the budget.
    best_index: int32 [], cell with the best validation accuracy (-1: none).
    best_valid: float32 [], its validation accuracy (percent; -inf: none).
    best_test: float32 [], its test accuracy (percent; NaN: none).
    trace: per-query `Trace`.
  """
  strategy: Any
  step: jax.Array
  time_s: jax.Array
  done: jax.Array
  best_index: jax.Array
  best_valid: jax.Array
  best_test: jax.Array
  trace: Trace


def init_state(strategy, seed: jax.Array, slots: int) -> RunState:
  """State before the first query of the run with seed `seed` (int32 [])."""
  nan = jnp.full((slots,), jnp.nan, jnp.float32)
  init_key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
  return RunState(
      strategy=strategy.init(init_key),
      step=jnp.zeros((), jnp.int32), time_s=jnp.zeros((), jnp.float32),
      done=jnp.zeros((), bool), best_index=jnp.full((), -1, jnp.int32),
      best_valid=jnp.full((), -jnp.inf, jnp.float32),
      best_test=jnp.full((), jnp.nan, jnp.float32),
      trace=Trace(index=jnp.full((slots,), -1, jnp.int32), valid_acc=nan,
                  time_s=nan, best_valid=nan, best_test=nan))


def step_once(strategy, table: tabular.Table, state: RunState, seed: jax.Array,
              budget_s: jax.Array, max_queries: jax.Array) -> RunState:
  """One query: propose, look up, charge, update, track. Pure.

  A query that would take the clock past `budget_s`, or come after
  `max_queries`, is not made: the state is returned unchanged but `done`.
  """
  tokens = strategy.propose(state.strategy,
                            strategies.proposal_key(seed, state.step))
  index = nb201.tokens_to_index(tokens)
  valid, test, cost = table.lookup(index)
  time_s = state.time_s + cost
  fits = (time_s <= budget_s) & (state.step < max_queries) & ~state.done
  better = valid > state.best_valid  # strict: the first of equals is kept
  best_valid = jnp.where(better, valid, state.best_valid)
  best_test = jnp.where(better, test, state.best_test)
  s = state.step
  trace = Trace(index=state.trace.index.at[s].set(index),
                valid_acc=state.trace.valid_acc.at[s].set(valid),
                time_s=state.trace.time_s.at[s].set(time_s),
                best_valid=state.trace.best_valid.at[s].set(best_valid),
                best_test=state.trace.best_test.at[s].set(best_test))
  new = RunState(
      strategy=strategy.update(state.strategy, tokens, table.reward[index]),
      step=s + 1, time_s=time_s, done=state.done,
      best_index=jnp.where(better, index, state.best_index),
      best_valid=best_valid, best_test=best_test, trace=trace)
  kept = jax.tree.map(lambda a, b: jnp.where(fits, a, b), new, state)
  return kept.replace(done=~fits)


def run(strategy, table: tabular.Table, seed: jax.Array, budget_s: jax.Array,
        max_queries: jax.Array, slots: int) -> RunState:
  """One whole run (not jitted here; `run_many` jits and vmaps it)."""
  return jax.lax.while_loop(
      lambda s: ~s.done & (s.step < slots),
      lambda s: step_once(strategy, table, s, seed, budget_s, max_queries),
      init_state(strategy, seed, slots))


@functools.partial(jax.jit, static_argnames=("strategy", "slots"))
def _run_seeds(strategy, table, seeds, budget_s, max_queries, slots):
  return jax.vmap(lambda seed: run(strategy, table, seed, budget_s,
                                   max_queries, slots))(seeds)


def run_many(strategy, table: tabular.Table, seeds: Any,
             budget: Budget = Budget()) -> RunState:
  """Runs `strategy` once per seed, all in one compiled call.

  Args:
    strategy: a hashable strategy (RandomSearch(), RegularizedEvolution(),
      Reinforce(...), NoRepeats(...)); it is static, so a new one compiles.
    table: the benchmark table (an argument, not a constant).
    seeds: int [num_seeds], one run per seed.
    budget: the stopping rule. Only the trace length `num_slots(table,
      budget)` and the number of seeds are static: another table, budget or
      set of seeds with the same trace length reuses the compiled run.

  Returns:
    A `RunState` whose leaves have a leading [num_seeds] axis.
  """
  slots = num_slots(table, budget)
  max_queries = budget.max_queries if budget.max_queries is not None else slots
  return _run_seeds(strategy, table, jnp.asarray(seeds, jnp.int32),
                    jnp.float32(budget.seconds), jnp.int32(max_queries),
                    slots)


def best_so_far_at(result: RunState, times_s: np.ndarray) -> np.ndarray:
  """Host: test accuracy of the best-validation cell known at each time.

  Args:
    result: `run_many` output (leaves [num_seeds, Q]).
    times_s: float [G], increasing simulated times.

  Returns:
    float [num_seeds, G]; NaN before a run's first query.
  """
  trace_t = np.asarray(result.trace.time_s)
  trace_best = np.asarray(result.trace.best_test)
  out = np.full((trace_t.shape[0], len(times_s)), np.nan)
  for i in range(trace_t.shape[0]):
    valid = ~np.isnan(trace_t[i])
    t, best = trace_t[i][valid], trace_best[i][valid]
    pos = np.searchsorted(t, times_s, side="right") - 1
    out[i] = np.where(pos >= 0, best[np.maximum(pos, 0)], np.nan)
  return out


def strategy_from_config(config) -> Any:
  """The runner strategy equivalent to an ordinary-loop config.

  Maps `config.search.strategy` ("reinforce", "random", "evolution") with
  `config.controller` / `config.evolution` to the strategy that proposes the
  same cells as `rlnas.search.run` does with one child per step, so a config
  written for the CLI can be benchmarked over hundreds of seeds here.
  """
  name = config.search.strategy
  if config.search.children_per_step != 1:
    raise ValueError("the jitted runner makes one query per step; set "
                     "config.search.children_per_step=1")
  if name == "random":
    return RandomSearch()
  if name == "evolution":
    return RegularizedEvolution(
        population_size=int(config.evolution.population_size),
        sample_size=int(config.evolution.sample_size), uniform_edge=True)
  if name == "reinforce":
    c = config.controller
    if c.get("grad_clip_norm"):
      raise ValueError("the runner's REINFORCE has no gradient clipping; set "
                       "config.controller.grad_clip_norm=0")
    space = nb201.NB201Space.from_config(config.space)
    return Reinforce(policy=strategies.make_controller(c, space.decisions),
                     learning_rate=float(c.learning_rate),
                     baseline_decay=float(c.baseline_decay),
                     entropy_weight=float(c.entropy_weight))
  raise ValueError(f"no runner strategy for config.search.strategy={name!r}")
