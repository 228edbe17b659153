"""A NAS-RL child as a chain of units, and its variables laid out unit by unit.

What the layer-wise engine (rlnas/child/layerwise.py) runs and trains, apart
from the compiling: how a `cnn.NASRLConvNet` splits into layer nodes (a
convolution unit and a bias-BatchNorm-ReLU unit per layer, then a classifier),
the optional padding buckets that make layer signatures rarer, the per-node
variables drawn on the host with Flax's default initializers (nothing
compiles), and `assemble`, which joins trained per-node variables back into
the model's own layout.
"""

import dataclasses
import math
from typing import Any, Hashable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlnas.child import cnn

# Flax's LeCun normal draws from a standard normal truncated to [-2, 2] and
# divides by its standard deviation, 0.8796... (jax.nn.initializers).
TRUNCATED_NORMAL_STD = 0.87962566103423978


@dataclasses.dataclass(frozen=True)
class Bucketing:
  """How layers map to compiled shapes; the default compiles exact shapes.

  Attributes:
    kernel_sizes: odd sizes a kernel dimension is zero-padded up to (the
      smallest that fits), e.g. (5,) runs every 1x3 or 3x3 kernel as a masked
      5x5; () keeps kernels exact.
    pow2_channels: zero-pad the depth of every layer input (except the image)
      to the next power of two.
  """
  kernel_sizes: tuple[int, ...] = ()
  pow2_channels: bool = False

  def kernel(self, size: int, stride: int, extent: int) -> int:
    """Padded size of a kernel dimension over an input `extent` pixels wide.

    Only stride-1 dimensions are padded: with larger strides, SAME padding of
    a larger kernel can shift the window. A kernel is never padded past the
    input extent (a 1-pixel-high 1D signal keeps height-1 kernels).
    """
    fits = [k for k in sorted(self.kernel_sizes) if size <= k <= extent]
    return fits[0] if fits and stride == 1 else size

  def channels(self, depth: int) -> int:
    return 1 << (depth - 1).bit_length() if self.pow2_channels else depth


class MaskedConv(nn.Module):
  """nn.Conv(padding="SAME", use_bias=False) computing with kernel * mask.

  Without a mask (exact kernels) it is a plain convolution: the multiply is
  an elementwise fusion, which XLA:CPU compiles in ~20 ms against ~5 ms for
  the convolution alone.
  """
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  num_filters: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """x: [N, H, W, C], mask: [kh, kw, 1, 1] or None -> [N, H', W', num_filters]."""
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        self.kernel_size + (x.shape[-1], self.num_filters))
    return jax.lax.conv_general_dilated(
        x, kernel if mask is None else kernel * mask, self.strides, "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BiasNormReLU(nn.Module):
  """The rest of cnn.ConvBNReLU: + conv bias -> BatchNorm -> ReLU."""
  num_filters: int
  use_bias: bool
  bn_momentum: float

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    """z: [N, H, W, num_filters] convolution output -> same shape."""
    if self.use_bias:
      z = z + self.param("conv_bias", nn.initializers.zeros, (self.num_filters,))
    z = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     name="BatchNorm_0")(z)
    return nn.relu(z)


class Classifier(nn.Module):
  """The NAS-RL child's head: pooled (or flattened) features -> logits."""
  num_classes: int
  head: str = "gap"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, H, W, C] -> logits [N, num_classes]."""
    return nn.Dense(self.num_classes, name="classifier")(cnn.head_features(x, self.head))


@dataclasses.dataclass(frozen=True)
class Node:
  """One layer of a child, as the engine runs it.

  Attributes:
    conv: the layer's convolution, None for the classifier. With the input
      shape it is a compile cache key, so it holds padded sizes only.
    module: BiasNormReLU for a layer, Classifier for the last node.
    inputs: earlier nodes whose outputs are zero-padded at the bottom/right,
      concatenated in depth (cnn.pad_and_concat) and zero-padded in depth to
      `in_depth`; () = the child's input.
    kernel: the layer's real (filter_height, filter_width); None for the head.
    in_depth: padded input depth the node sees.
  """
  conv: Optional[MaskedConv]
  module: nn.Module
  inputs: tuple[int, ...]
  kernel: Optional[tuple[int, int]]
  in_depth: int


def nodes_from_model(model: nn.Module, input_shape: Sequence[int],
                     bucketing: Bucketing = Bucketing()) -> tuple[Node, ...]:
  """Splits a cnn.NASRLConvNet into layer nodes and a classifier node.

  Args:
    model: the child network.
    input_shape: per-example input shape, e.g. (8, 8, 1) or (40, 1).
    bucketing: padding policy (exact by default).

  Raises:
    TypeError: `model` is not a network this engine can split.
  """
  if not isinstance(model, cnn.NASRLConvNet):
    raise TypeError(f"the layer-wise engine splits cnn.NASRLConvNet children, "
                    f"not {type(model).__name__}; use trainer.train_and_evaluate")
  image = tuple(as_image(np.zeros((1,) + tuple(input_shape))).shape[1:])
  shapes = []  # Real [H, W, C] of each layer's output.
  nodes = []

  def source(inputs):
    if not inputs:
      return image[:2], image[2]
    height = max(shapes[j][0] for j in inputs)
    width = max(shapes[j][1] for j in inputs)
    return (height, width), bucketing.channels(sum(shapes[j][2] for j in inputs))

  for layer in model.layers:
    (height, width), in_depth = source(layer.inputs)
    kernel = (layer.filter_height, layer.filter_width)
    conv = MaskedConv(
        (bucketing.kernel(kernel[0], layer.stride_height, height),
         bucketing.kernel(kernel[1], layer.stride_width, width)),
        (layer.stride_height, layer.stride_width), layer.num_filters)
    module = BiasNormReLU(layer.num_filters, model.use_bias, model.bn_momentum)
    nodes.append(Node(conv, module, tuple(layer.inputs), kernel, in_depth))
    shapes.append((-(-height // layer.stride_height),
                   -(-width // layer.stride_width), layer.num_filters))
  head_inputs = cnn.unconsumed(model.layers)
  _, in_depth = source(head_inputs)
  nodes.append(Node(None, Classifier(model.num_classes, model.head), head_inputs,
                    None, in_depth))
  return tuple(nodes)


def _real_depth(nodes: Sequence[Node], i: int, image_depth: int) -> int:
  node = nodes[i]
  if not node.inputs:
    return image_depth
  return sum(nodes[j].module.num_filters for j in node.inputs)


def _input_shapes(nodes: Sequence[Node], input_shape: tuple[int, ...]):
  """Per-node padded input shapes [H, W, C] (without batch)."""
  outputs, shapes = [], []
  for node in nodes:
    if node.inputs:
      height = max(outputs[j][0] for j in node.inputs)
      width = max(outputs[j][1] for j in node.inputs)
      shapes.append((height, width, node.in_depth))
    else:
      shapes.append(tuple(input_shape))
    if node.conv is not None:
      sh, sw = node.conv.strides
      outputs.append((-(-shapes[-1][0] // sh), -(-shapes[-1][1] // sw),
                      node.conv.num_filters))
  return shapes


def truncated_normal(rng: np.random.Generator, shape) -> np.ndarray:
  z = rng.standard_normal(shape)
  while True:
    bad = np.abs(z) > 2.0
    if not bad.any():
      return z
    z[bad] = rng.standard_normal(int(bad.sum()))


def merge_fn(in_depth: int):
  """xs -> cnn.pad_and_concat(xs) zero-padded in depth to in_depth."""
  def merge(xs):
    x = cnn.pad_and_concat(xs)
    pad = in_depth - x.shape[-1]
    return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, pad),)) if pad else x
  return merge


def as_image(x):
  """1D signals [N, L, C] run as [N, 1, L, C] images, as in cnn.NASRLConvNet."""
  return x[:, None] if x.ndim == 3 else x


def _init_leaf(path, leaf):
  """Flax defaults for everything but kernels: ones for scales and variances."""
  if path[-1].key in ("scale", "var"):
    return np.ones(leaf.shape, leaf.dtype)
  return np.zeros(leaf.shape, leaf.dtype)


class HostVariables:
  """Per-node variables of children: shapes from `jax.eval_shape`, values drawn
  with numpy, optimizer states as zeros of `tx.init`'s shapes.

  Per-node variables are dicts of lists: a layer has "conv": [params,
  opt_state] and "norm": [params, state, opt_state]; the classifier has
  "head": [params, opt_state].
  """

  def __init__(self, tx: optax.GradientTransformation):
    self.tx = tx
    self._shapes: dict[Hashable, Any] = {}

  def _unit_shapes(self, module: nn.Module, *args):
    """(params, state, opt_state) shapes of a unit applied to args' shapes."""
    key = (module,) + tuple((a.shape, a.dtype) for a in args)
    if key not in self._shapes:
      init = lambda *args: module.init(jax.random.PRNGKey(0), *args)
      if isinstance(module, BiasNormReLU):
        init = lambda z: module.init(jax.random.PRNGKey(0), z, train=False)
      variables = dict(jax.eval_shape(init, *args))
      params = variables.pop("params")
      self._shapes[key] = (params, variables, jax.eval_shape(self.tx.init, params))
    return self._shapes[key]

  def variable_shapes(self, nodes: Sequence[Node], input_shape) -> list[dict]:
    """Per-node variables as ShapeDtypeStructs (batch 1), for `init` and the
    engine's `precompile`."""
    sds = jax.ShapeDtypeStruct
    out = []
    for node, shape in zip(nodes, _input_shapes(nodes, input_shape)):
      x = sds((1,) + tuple(shape), jnp.float32)
      if node.conv is None:
        params, _, opt = self._unit_shapes(node.module, x)
        out.append({"head": [params, opt]})
        continue
      mask = sds(node.conv.kernel_size + (1, 1), jnp.float32)
      conv_params, _, conv_opt = self._unit_shapes(node.conv, x, mask)
      z = jax.eval_shape(lambda p, x, m: node.conv.apply({"params": p}, x, m),
                         conv_params, x, mask)
      norm_params, norm_state, norm_opt = self._unit_shapes(node.module, z)
      out.append({"conv": [conv_params, conv_opt],
                  "norm": [norm_params, norm_state, norm_opt]})
    return out

  def init(self, nodes: Sequence[Node], input_shape: tuple[int, ...],
           seed: Sequence[int]) -> list[dict]:
    """Per-node variables (numpy): Flax's default initializers, drawn on the
    host and embedded in the padding (padded weights start at zero)."""
    shapes = self.variable_shapes(nodes, input_shape)
    image_depth = input_shape[-1]
    out = []
    for i, (node, node_shapes) in enumerate(zip(nodes, shapes)):
      rng = np.random.default_rng(list(seed) + [i])
      depth = _real_depth(nodes, i, image_depth)
      zeros = lambda tree: jax.tree_util.tree_map(
          lambda s: np.zeros(s.shape, s.dtype), tree)
      if node.conv is None:
        params, opt = node_shapes["head"]
        params = jax.tree_util.tree_map_with_path(_init_leaf, params)
        kernel = params["classifier"]["kernel"]  # [groups * in_depth, classes]
        # A flattened head has one group of in_depth features per pixel, of
        # which the first `depth` are real.
        groups = kernel.shape[0] // node.in_depth
        std = math.sqrt(1.0 / (groups * depth)) / TRUNCATED_NORMAL_STD
        value = np.zeros((groups, node.in_depth) + kernel.shape[1:], np.float32)
        value[:, :depth] = truncated_normal(rng, (groups, depth) + kernel.shape[1:]) * std
        params["classifier"]["kernel"] = value.reshape(kernel.shape)
        out.append({"head": [params, zeros(opt)]})
        continue
      (conv_params, conv_opt), (norm_params, norm_state, norm_opt) = (
          node_shapes["conv"], node_shapes["norm"])
      (kh, kw), (ph, pw) = node.kernel, node.conv.kernel_size
      std = math.sqrt(1.0 / (kh * kw * depth)) / TRUNCATED_NORMAL_STD
      kernel = np.zeros(conv_params["kernel"].shape, np.float32)
      top, left = (ph - kh) // 2, (pw - kw) // 2
      kernel[top:top + kh, left:left + kw, :depth] = truncated_normal(
          rng, (kh, kw, depth, node.conv.num_filters)) * std
      out.append({
          "conv": [{"kernel": kernel}, zeros(conv_opt)],
          "norm": [jax.tree_util.tree_map_with_path(_init_leaf, norm_params),
                   jax.tree_util.tree_map_with_path(_init_leaf, norm_state),
                   zeros(norm_opt)]})
    return out


def assemble(nodes: Sequence[Node], variables: Sequence[dict], image_depth: int,
             part: int) -> Any:
  """Joins per-node variables into cnn.NASRLConvNet's layout, cutting padding.

  Args:
    nodes: the child.
    variables: per-node variables (from `init` or after training).
    image_depth: channels of the child's input.
    part: 0 = params, 1 = batch statistics, 2 = optimizer state. Optax states
      are joined in their parameter-shaped subtrees; step counts, equal in
      every unit, come from the first.
  """
  def cut_kernel(i, leaf):
    node = nodes[i]
    depth = _real_depth(nodes, i, image_depth)
    if not hasattr(leaf, "shape"):  # optax.MaskedNode and the like.
      return leaf
    if node.conv is None:
      grouped = leaf.reshape((-1, node.in_depth) + leaf.shape[1:])
      return grouped[:, :depth].reshape((-1,) + leaf.shape[1:])
    (kh, kw), (ph, pw) = node.kernel, leaf.shape[:2]
    top, left = (ph - kh) // 2, (pw - kw) // 2
    return leaf[top:top + kh, left:left + kw, :depth]

  def layer_tree(i, conv, norm):
    if part == 1:
      return norm.get("batch_stats", {})
    out = {"Conv_0": {"kernel": cut_kernel(i, conv["kernel"])}}
    if "conv_bias" in norm:
      out["Conv_0"]["bias"] = norm["conv_bias"]
    out["BatchNorm_0"] = norm["BatchNorm_0"]
    return out

  def head_tree(head):
    if part == 1:
      return None
    kernel = cut_kernel(len(nodes) - 1, head["classifier"]["kernel"])
    return {"classifier": {**head["classifier"], "kernel": kernel}}

  # Units: per layer conv and norm, then the head; their trees share one
  # optax skeleton, so map over them together, joining at parameter dicts.
  units = []
  for v in variables[:-1]:
    units.append(v["conv"][0 if part == 0 else -1] if part != 1 else {})
    units.append(v["norm"][part])
  units.append(variables[-1]["head"][0 if part == 0 else -1] if part != 1 else {})

  def join(*trees):
    if not isinstance(trees[0], dict):
      return trees[0]
    out = {}
    for i in range(len(nodes) - 1):
      out[f"layer_{i}"] = layer_tree(i, trees[2 * i], trees[2 * i + 1])
    head = head_tree(trees[-1])
    if head:
      out.update(head)
    return out
  if part == 1:
    return join(*units)
  return jax.tree_util.tree_map(join, *units, is_leaf=lambda t: isinstance(t, dict))
