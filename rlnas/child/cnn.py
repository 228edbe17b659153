"""The child network of the NAS-RL CNN space (Zoph & Le 2017, sec. 3.3, 4.1).

Each layer is conv -> BatchNorm -> ReLU. A layer with several inputs
concatenates them in depth; a layer with no input takes the image; every layer
output that no later layer reads is concatenated before the classifier.

Deviations from the paper, all configurable or forced by the paper's silence:
- Feature maps of different sizes are zero-padded at the bottom/right to the
  largest before depth concatenation (the paper says "pad the small layers with
  zeros" without saying where).
- Classifier head: global average pooling + dense by default (the paper does
  not describe its head); `head="flatten"` gives flatten + dense.
- Convolutions carry a bias by default, like the Keras `Conv2D` of the
  tutorial this project started from; it is redundant before BatchNorm and can
  be switched off with `use_bias=False`.
- 1D inputs [N, L, C] run as [N, 1, L, C] images; the space then fixes filter
  height (and stride height) to 1.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlnas.spaces.nasrl_cnn import Layer


def pad_and_concat(tensors: Sequence[jax.Array]) -> jax.Array:
  """Zero-pads NHWC maps at the bottom/right to the largest H, W; concats depth."""
  if len(tensors) == 1:
    return tensors[0]
  height = max(t.shape[1] for t in tensors)
  width = max(t.shape[2] for t in tensors)
  padded = [jnp.pad(t, ((0, 0), (0, height - t.shape[1]),
                        (0, width - t.shape[2]), (0, 0))) for t in tensors]
  return jnp.concatenate(padded, axis=-1)


def unconsumed(layers: Sequence[Layer]) -> tuple[int, ...]:
  """Indices of layers no later layer reads; they feed the classifier."""
  consumed = {j for layer in layers for j in layer.inputs}
  return tuple(i for i in range(len(layers)) if i not in consumed)


class ConvBNReLU(nn.Module):
  """conv -> BatchNorm -> ReLU, the NAS-RL layer (and the tutorial's NASCell)."""
  layer: Layer
  use_bias: bool = True
  bn_momentum: float = 0.99

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [N, H, W, C] -> [N, ceil(H/sh), ceil(W/sw), num_filters]."""
    layer = self.layer
    x = nn.Conv(layer.num_filters, (layer.filter_height, layer.filter_width),
                strides=(layer.stride_height, layer.stride_width),
                padding="SAME", use_bias=self.use_bias)(x)
    x = nn.BatchNorm(use_running_average=not train,
                     momentum=self.bn_momentum)(x)
    return nn.relu(x)


def head_features(x: jax.Array, head: str) -> jax.Array:
  """What the classifier reads: [N, H, W, C] -> [N, C] ("gap", global average
  pooling) or [N, H * W * C] ("flatten")."""
  if head == "gap":
    return x.mean(axis=(1, 2))
  if head == "flatten":
    return x.reshape(x.shape[0], -1)
  raise ValueError(f"unknown child head {head!r}; use 'gap' or 'flatten'")


class NASRLConvNet(nn.Module):
  """The child network of a decoded architecture.

  Attributes:
    layers: decoded layers (see `Layer`).
    num_classes: classifier outputs.
    head: "gap" (global average pool + dense) or "flatten" (flatten + dense).
  """
  layers: tuple[Layer, ...]
  num_classes: int
  head: str = "gap"
  use_bias: bool = True
  bn_momentum: float = 0.99

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [N, H, W, C] images or [N, L, C] sequences -> logits [N, classes]."""
    if x.ndim == 3:  # 1D signals run as 1 x L images with filter height 1.
      x = x[:, None]
    outputs = []
    for i, layer in enumerate(self.layers):
      inp = pad_and_concat([outputs[j] for j in layer.inputs]) if layer.inputs else x
      outputs.append(ConvBNReLU(layer, self.use_bias, self.bn_momentum,
                                name=f"layer_{i}")(inp, train))
    features = pad_and_concat([outputs[i] for i in unconsumed(self.layers)])
    return nn.Dense(self.num_classes, name="classifier")(head_features(features, self.head))
