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

  def _unroll(self, mdl: _LSTMPolicy, rng, tokens, batch: int):
    """Walks the decisions; samples where `tokens` is None, else teacher-forces.

    Returns tokens int32 [B, T], log_prob [B], entropy [B].
    """
    x = jnp.broadcast_to(mdl.start, (batch, self.hidden_size))
    zeros = jnp.zeros((batch, self.hidden_size), x.dtype)
    carry = [(zeros, zeros)] * self.num_layers
    keys = (jax.random.split(rng, max(len(self.decisions), 1))
            if rng is not None else [None] * len(self.decisions))
    anchor_h, anchor_proj = [], []
    out_tokens, log_prob, entropy = [], jnp.zeros(batch), jnp.zeros(batch)
    pos = 0
    for key, d in zip(keys, self.decisions):
      carry, h = mdl.step(carry, x)
      if d.kind == base.CATEGORICAL:
        logits = self._scale(mdl.logits(d.head, h))  # [B, N]
        if tokens is None:
          tok = jax.random.categorical(key, logits).astype(jnp.int32)
        else:
          tok = tokens[:, pos]
        logp = jax.nn.log_softmax(logits)
        log_prob += jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0]
        entropy += -(jnp.exp(logp) * logp).sum(-1)
        out_tokens.append(tok[:, None])
        x = mdl.embedding(d.head, tok)
      else:
        if d.num_choices:
          logits = self._scale(mdl.anchor_logits(jnp.stack(anchor_proj, 1), h))
          if tokens is None:
            bits = jax.random.bernoulli(key, jax.nn.sigmoid(logits)).astype(jnp.int32)
          else:
            bits = tokens[:, pos:pos + d.num_choices]
          log_on, log_off = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
          log_prob += jnp.where(bits == 1, log_on, log_off).sum(-1)
          entropy += -(jnp.exp(log_on) * log_on + jnp.exp(log_off) * log_off).sum(-1)
          out_tokens.append(bits)
          chosen = bits.astype(h.dtype)
          x = (chosen[..., None] * jnp.stack(anchor_h, 1)).sum(1) / (
              1.0 + chosen.sum(-1, keepdims=True))
        else:
          x = jnp.broadcast_to(mdl.start, (batch, self.hidden_size))
        anchor_h.append(h)
        anchor_proj.append(mdl.project_anchor(h))
      pos += d.num_tokens
    toks = (jnp.concatenate(out_tokens, axis=1) if out_tokens
            else jnp.zeros((batch, 0), jnp.int32))
    return toks, log_prob, entropy

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def sample(self, params, rng: jax.Array, num: int):
    """Samples `num` architectures.

    Returns:
      tokens int32 [num, T], log_prob [num] (log p of each sample), entropy [num]
      (sum over decisions of each step's policy entropy, in nats).
    """
    return self.module.apply({"params": params}, rng, None, num,
                             method=lambda m, *a: self._unroll(m, *a))

  @functools.partial(jax.jit, static_argnums=0)
  def log_prob(self, params, tokens: jax.Array):
    """Teacher-forced log p(tokens) [num] and entropy [num]; tokens [num, T]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    _, log_prob, entropy = self.module.apply(
        {"params": params}, None, tokens, tokens.shape[0],
        method=lambda m, *a: self._unroll(m, *a))
    return log_prob, entropy
