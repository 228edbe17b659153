"""The NAS-RL controller: an autoregressive Flax LSTM policy over a space's decisions.

Zoph & Le 2017, sec. 3.1-3.3: an LSTM emits one decision per step; each
categorical decision is predicted by a softmax classifier and the sampled
token's embedding is the next step's input. Skip connections use anchor points
(sec. 3.3): at layer i, P(layer j feeds layer i) = sigmoid(v^T tanh(W_prev h_j +
W_curr h_i)), with h_j the hidden state at layer j's anchor point.

Defaults are the paper's (sec. 4.1): 2 LSTM layers of 35 hidden units, weights
initialised uniformly in [-0.08, 0.08]. Temperature and tanh logit clipping
(`logits = c * tanh(logits / T)`) follow ENAS (Pham et al. 2018, sec. 3.1 and its
released code) and are off by default.

The input after an anchor step is the mean of the chosen layers' anchor hidden
states, `sum_j b_j h_j / (1 + sum_j b_j)` (ENAS's released code; the NAS-RL paper
does not say what it feeds back).

`log_prob` always means log p(tokens) (not ENAS's -log p).
"""

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlnas.spaces import base


def _uniform(scale: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


class _LSTMPolicy(nn.Module):
  """Parameters and one-step logic of the controller; see `Controller`."""
  head_sizes: tuple[tuple[str, int], ...]
  hidden_size: int
  num_layers: int
  init_range: float

  def setup(self):
    init = _uniform(self.init_range)
    self.cells = [nn.LSTMCell(self.hidden_size, kernel_init=init,
                              recurrent_kernel_init=init, bias_init=init,
                              name=f"lstm_{i}") for i in range(self.num_layers)]
    self.start = self.param("start", init, (self.hidden_size,))
    self.embed = {name: nn.Embed(n, self.hidden_size, embedding_init=init,
                                 name=f"embed_{name}")
                  for name, n in self.head_sizes}
    self.softmax = {name: nn.Dense(n, kernel_init=init, bias_init=init,
                                   name=f"softmax_{name}")
                    for name, n in self.head_sizes}
    self.w_prev = nn.Dense(self.hidden_size, use_bias=False, kernel_init=init)
    self.w_curr = nn.Dense(self.hidden_size, use_bias=False, kernel_init=init)
    self.v = nn.Dense(1, use_bias=False, kernel_init=init)

  def step(self, carry, x):
    """One LSTM step. carry: list of (c, h) [B, H]; x: [B, H] -> new carry, h."""
    new = []
    for cell, state in zip(self.cells, carry):
      state, x = cell(state, x)
      new.append(state)
    return new, x

  def logits(self, head: str, h):
    return self.softmax[head](h)

  def embedding(self, head: str, token):
    return self.embed[head](token)

  def anchor_logits(self, prev_proj, h):
    """prev_proj: [B, i, H] (W_prev h_j); h: [B, H] -> logits [B, i]."""
    return self.v(jnp.tanh(prev_proj + self.w_curr(h)[:, None]))[..., 0]

  def project_anchor(self, h):
    return self.w_prev(h)

  def touch_all(self, batch: int):
    """Creates every parameter, whatever the current depth uses."""
    x = jnp.broadcast_to(self.start, (batch, self.hidden_size))
    carry = [(jnp.zeros_like(x), jnp.zeros_like(x))] * self.num_layers
    _, h = self.step(carry, x)
    for name, _ in self.head_sizes:
      self.logits(name, h)
      self.embedding(name, jnp.zeros((batch,), jnp.int32))
    return self.anchor_logits(self.project_anchor(h)[:, None], h)


@dataclasses.dataclass(frozen=True)
class Controller:
  """The policy over `decisions`. Hashable, so methods jit with `self` static.

  Attributes:
    decisions: the search space's decisions at the current depth.
    head_sizes: (head, num_choices) pairs for every head the controller owns;
      a superset of the heads in `decisions`, so one set of parameters serves
      every depth of a depth schedule. Defaults to the heads of `decisions`.
    hidden_size, num_layers, init_range: Zoph & Le 2017, sec. 4.1.
    temperature: logits are divided by it (gradients scale by 1/temperature).
    tanh_constant: if set, logits = tanh_constant * tanh(logits / temperature).
  """
  decisions: tuple[base.Decision, ...]
  head_sizes: tuple[tuple[str, int], ...] = ()
  hidden_size: int = 35
  num_layers: int = 2
  init_range: float = 0.08
  temperature: float = 1.0
  tanh_constant: float | None = None

  def __post_init__(self):
    own = base.heads(self.decisions)
    if not self.head_sizes:
      object.__setattr__(self, "head_sizes", tuple(sorted(own.items())))
    have = dict(self.head_sizes)
    for name, n in own.items():
      if have.get(name) != n:
        raise ValueError(f"controller head {name!r}: decisions need {n} choices, "
                         f"parameters have {have.get(name)}")
    if self.temperature <= 0:
      raise ValueError(f"controller temperature must be > 0, got {self.temperature}")

  def with_decisions(self, decisions: Sequence[base.Decision]) -> "Controller":
    """Same parameters' shapes, new decision sequence (e.g. a deeper network)."""
    return dataclasses.replace(self, decisions=tuple(decisions))

  @property
  def module(self) -> _LSTMPolicy:
    return _LSTMPolicy(self.head_sizes, self.hidden_size, self.num_layers,
                       self.init_range)

  @property
  def num_tokens(self) -> int:
    return base.num_tokens(self.decisions)

  def init(self, rng: jax.Array):
    """Returns the parameter pytree (every head and the anchor attention)."""
    return self.module.init(rng, 1, method=_LSTMPolicy.touch_all)["params"]

  def _scale(self, logits):
    logits = logits / self.temperature
    if self.tanh_constant is not None:
      logits = self.tanh_constant * jnp.tanh(logits)
    return logits

  def _step_tables(self):
    """Per-decision constants driving the scan: kind, head, choices, position."""
    names = [name for name, _ in self.head_sizes]
    kind, head, choices, pos = [], [], [], []
    offset = 0
    for d in self.decisions:
      kind.append(int(d.kind == base.ANCHOR))
      head.append(names.index(d.head) if d.kind == base.CATEGORICAL else 0)
      choices.append(d.num_choices)
      pos.append(offset)
      offset += d.num_tokens
    as_int = lambda v: jnp.asarray(np.asarray(v, np.int32).reshape(-1))
    return as_int(kind), as_int(head), as_int(choices), as_int(pos)

  def _unroll(self, params, rng, tokens, batch: int):
    """Walks the decisions in one `lax.scan`; samples, or teacher-forces `tokens`.

    Compile time does not grow with the number of decisions: each step computes
    every head's logits (a handful of tiny matmuls), masks them to the step's
    head and choice count, and writes its tokens at the step's position.

    Returns tokens int32 [B, T], log_prob [B], entropy [B].
    """
    hidden, num_steps, num_tokens = self.hidden_size, len(self.decisions), self.num_tokens
    max_anchor = max([d.num_choices for d in self.decisions if d.kind == base.ANCHOR],
                     default=0) + 1
    max_choices = max([n for _, n in self.head_sizes], default=1)
    pad = lambda a, n, axis: jnp.pad(a, [(0, n - a.shape[axis]) if i == axis else (0, 0)
                                         for i in range(a.ndim)])
    names = [name for name, _ in self.head_sizes] or ["none"]
    if self.head_sizes:
      w_soft = jnp.stack([pad(params[f"softmax_{n}"]["kernel"], max_choices, 1) for n in names])
      b_soft = jnp.stack([pad(params[f"softmax_{n}"]["bias"], max_choices, 0) for n in names])
      emb = jnp.stack([pad(params[f"embed_{n}"]["embedding"], max_choices, 0) for n in names])
    else:
      w_soft = jnp.zeros((1, hidden, 1))
      b_soft, emb = jnp.zeros((1, 1)), jnp.zeros((1, 1, hidden))
    cell = nn.LSTMCell(hidden)
    start = jnp.broadcast_to(params["start"], (batch, hidden))
    w_prev, w_curr = params["w_prev"]["kernel"], params["w_curr"]["kernel"]
    v = params["v"]["kernel"][:, 0]
    # Token buffer with room for a full-width anchor write at the last position.
    if tokens is None:
      tok_in = jnp.zeros((batch, num_tokens + max_anchor), jnp.int32)
    else:
      tok_in = jnp.pad(tokens.astype(jnp.int32), ((0, 0), (0, max_anchor)))
    keys = (jax.random.split(rng, num_steps) if rng is not None
            else jnp.zeros((num_steps, 2), jnp.uint32))

    def body(carry, xs):
      lstm, x, anchor_h, anchor_p, n_anchor, buf, log_prob, entropy = carry
      kind, head, choices, pos, key = xs
      k_cat, k_anchor = jax.random.split(key)
      new_lstm = []
      for i, state in enumerate(lstm):
        state, x = cell.apply({"params": params[f"lstm_{i}"]}, state, x)
        new_lstm.append(state)
      h = x
      # Categorical decision: the step's head, choices beyond its size masked.
      valid = jnp.arange(max_choices) < choices
      logits = jnp.where(valid, self._scale(h @ w_soft[head] + b_soft[head]), -1e9)
      logp = jax.nn.log_softmax(logits)
      if tokens is None:
        tok = jax.random.categorical(k_cat, logits).astype(jnp.int32)
      else:
        tok = jax.lax.dynamic_index_in_dim(tok_in, pos, axis=1, keepdims=False)
      lp_cat = jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0]
      ent_cat = -jnp.where(valid, jnp.exp(logp) * logp, 0.0).sum(-1)
      x_cat = emb[head][tok]
      buf_cat = jax.lax.dynamic_update_slice_in_dim(buf, tok[:, None], pos, axis=1)
      # Anchor decision (Zoph & Le 2017, sec. 3.3): one Bernoulli per earlier layer.
      live = jnp.arange(max_anchor) < choices
      a_logits = self._scale(jnp.tanh(anchor_p + (h @ w_curr)[:, None]) @ v)
      if tokens is None:
        bits = jax.random.bernoulli(k_anchor, jax.nn.sigmoid(a_logits)).astype(jnp.int32)
      else:
        bits = jax.lax.dynamic_slice_in_dim(tok_in, pos, max_anchor, axis=1)
      bits = jnp.where(live, bits, 0)
      log_on, log_off = jax.nn.log_sigmoid(a_logits), jax.nn.log_sigmoid(-a_logits)
      lp_anchor = jnp.where(live, jnp.where(bits == 1, log_on, log_off), 0.0).sum(-1)
      ent_anchor = -jnp.where(live, jnp.exp(log_on) * log_on
                              + jnp.exp(log_off) * log_off, 0.0).sum(-1)
      chosen = bits.astype(h.dtype)
      x_anchor = jnp.where(choices > 0, (chosen[..., None] * anchor_h).sum(1)
                           / (1.0 + chosen.sum(-1, keepdims=True)), start)
      buf_anchor = jax.lax.dynamic_update_slice_in_dim(buf, bits, pos, axis=1)
      new_h = jax.lax.dynamic_update_slice_in_dim(anchor_h, h[:, None], n_anchor, axis=1)
      new_p = jax.lax.dynamic_update_slice_in_dim(anchor_p, (h @ w_prev)[:, None],
                                                  n_anchor, axis=1)
      is_anchor = kind == 1
      pick = lambda a, c: jnp.where(is_anchor, a, c)
      carry = (new_lstm, pick(x_anchor, x_cat), pick(new_h, anchor_h),
               pick(new_p, anchor_p), n_anchor + is_anchor, pick(buf_anchor, buf_cat),
               log_prob + pick(lp_anchor, lp_cat), entropy + pick(ent_anchor, ent_cat))
      return carry, None

    zeros = jnp.zeros((batch, hidden))
    carry = ([(zeros, zeros)] * self.num_layers, start,
             jnp.zeros((batch, max_anchor, hidden)), jnp.zeros((batch, max_anchor, hidden)),
             jnp.zeros((), jnp.int32), tok_in, jnp.zeros(batch), jnp.zeros(batch))
    carry, _ = jax.lax.scan(body, carry, self._step_tables() + (keys,))
    return carry[5][:, :num_tokens], carry[6], carry[7]

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def sample(self, params, rng: jax.Array, num: int):
    """Samples `num` architectures.

    Returns:
      tokens int32 [num, T], log_prob [num] (log p of each sample), entropy [num]
      (sum over decisions of each step's policy entropy, in nats).
    """
    return self._unroll(params, rng, None, num)

  @functools.partial(jax.jit, static_argnums=0)
  def log_prob(self, params, tokens: jax.Array):
    """Teacher-forced log p(tokens) [num] and entropy [num]; tokens [num, T]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    _, log_prob, entropy = self._unroll(params, None, tokens, tokens.shape[0])
    return log_prob, entropy
