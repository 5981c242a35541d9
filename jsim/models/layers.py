"""`Conv`: flax.linen.Conv with the convolution lowered per platform and per shape.

    from jsim.models.layers import Conv
    y = Conv(features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), feature_group_count=1,
             use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=..., bias_init=...,
             conv_impl="auto", name="conv1")(x)          # x: [N, H, W, C] (more leading batch dims are flattened)

A drop-in for `nn.Conv` as jsim's backbones use it: the same constructor arguments (kernel_size (kh, kw);
strides an int or a pair; padding "SAME", "VALID", an int, or ((lo, hi), (lo, hi)); feature_group_count,
depthwise = in_channels), the same parameters ('kernel' [kh, kw, in / groups, features] HWIO and 'bias'
[features], created in the same order with the same initialisers, so checkpoints, the torchvision port
and the ONNX export see the same tree) and the same dtype promotion. Only the lowering differs, chosen
by `choose_impl(platform, ...)` from `conv_impl` (config `model.conv_impl`):
  * "xla": always `jax.lax.conv_general_dilated`, differentiated by XLA's own transposes;
  * "matmul": never it (1x1 as a dot, depthwise as shifted multiply-adds, kxk as im2col + a dot);
  * "auto" (default): XLA's conv on GPU/TPU (cuDNN is the fast path there); on a CPU the lowerings,
    one for the forward and one for the backward (input and kernel gradients, through one custom_vjp
    where they differ), that the table above `choose_impl` (with the measurements behind it) picks.
Every lowering computes the same convolution; results differ only in float rounding (summation order).
A backbone takes `conv_impl` as a field and passes it to each of its convs.

    y = max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), conv_impl="auto")

is nn.max_pool (padding with -inf) with the same rule: on a CPU, unless conv_impl="xla", XLA's
reduce_window forward with a gradient computed from the k*k strided views, which goes to the first
maximum of each window in row-major order as XLA's select-and-scatter does (exactly: the same values,
only the summation order of overlapping windows differs); XLA:CPU's select-and-scatter was 60x slower
(ResNet50's 3x3/2 pool at 64 px, batch 16, fwd+bwd: 236 vs 3.9 ms; VGG's 2x2/2 at 64x64x64: 388 vs 27
ms; load average 18, ratios only). The forward stays XLA's because XLA:CPU fuses a reduce_window with
the convs, biases and ReLUs around it into one YNNPACK subgraph, where the max of strided slices ends
each: VGG16's forward at 64 px, batch 16, compiles to 11 fusions (6 YNNPACK) instead of 35 (18), and
ran as fast as with conv_impl="xla" (1.003x, twice) instead of 0.92-0.94x (2-core AMD EPYC, load < 2).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import canonicalize_padding, default_kernel_init
from jax import lax

from jsim.models import conv_tuning

# config.model.conv_impl.
CONV_IMPLS = ("auto", "xla", "matmul")
# The lowerings choose_impl returns: forward ones, and the backward ones (the forward's own, or "taps":
# XLA's input gradient and the kernel gradient as one dot per kernel tap, `_taps_vjp`; "tuned": "xla" or "taps",
# whichever conv_tuning recorded as the faster on this host for the shape).
LOWERINGS = ("xla", "dot", "im2col", "shifted")
GRAD_LOWERINGS = (*LOWERINGS, "taps", "tuned")

# The (forward, backward) lowerings on a CPU for conv_impl=auto, first matching row wins. The backward one
# computes the input and kernel gradients: its own autodiff ("shifted": `_depthwise_vjp`); a pair that
# differs runs through one custom_vjp. Measured on the 2-core Xeon of the dev machine, jax 0.10.2, float32,
# XLA's conv vs the lowering, fwd / fwd+bwd (grad of input and kernel) ms, batch 16 unless said (the
# forward choices under load average 4-10, min of 3: ratios, not absolutes):
#   depthwise (groups == in > 1) -> shifted / shifted  3x3 32x32x32 b64: 90 / 240 vs 2.2 / 50 (quiet machine)
#   other grouped                -> xla / xla          (not measured: no jsim backbone has one)
#   1x1                          -> dot / dot          64->256 16x16: 5.5 / 28 vs 3.8 / 11; 2048->512 2x2: 6.0 / 32 vs 2.0 / 5.7;
#                                                      64->256 56x56: 184 / 1221 vs 148 / 236; 256->512 /2 8x8: 0.7 / 11.5 vs 0.9 / 2.7
#   kxk, output <= the kernel    -> im2col / im2col    3x3 512->512 2x2: 688 / 1616 vs 8.9 / 27 (b64: 2270 / 5619 vs 39 / 96);
#                                                      3x3: 20 / 60 vs 9.1 / 27; 1x1: 20 / 68 vs 1.9 / 5.3; 4x4 /2 -> 2x2: 20 / 864 vs 4.8 / 15
#   kxk, output <= 8x8           -> xla / im2col       (fwd) 4x4 256->256: 4.5 / 13 vs 4.9 / 18; 8x8 128: 31 / 119 vs 48 / 177 (b64);
#   kxk, larger                  -> xla / tuned            64x64 64->64: 173 / 862 vs 607 / 1049; 7x7 stem 64 px: 5.8 / 52 vs 9.7 / 63
# (XLA:CPU's conv falls off a cliff once the output is no larger than the kernel; above that its own
# im2col-free kernel wins the forward, the more so the larger the image.) The backward column: the
# backward alone (input + kernel gradient), XLA's vs im2col's, interleaved, load average 4-6, ms:
# 3x3 128->128 /2 16->8: 11.1 vs 7.4; 8x8 128: 8.7 vs 6.9; 4x4 256: 12.6 vs 7.6; 8x8 512: 173 vs 170;
# 4x4 512: 56 vs 34. Larger outputs also measured faster alone with im2col's backward (16x16 64: 13.6 vs
# 12.5; 56x56 64 at 224 px: 374 vs 326; 7x7 stem 64 px: 21 vs 29 the other way), but a whole ResNet50
# step at 64 px b16 with im2col's backward everywhere was 6-12% slower than with XLA's (840 vs 752 ms),
# with it up to 8x8 outputs 5-11% faster (729 vs 768, 784 vs 883; noisy): hence the 8x8 bound. Above it
# "tuned": XLA's backward or "taps" (XLA's input gradient, the kernel gradient as one dot per tap), whichever
# this host ran faster for the shape (conv_tuning: a Zen 4 host runs XLA's faster, the others the taps;
# XLA's kernel-gradient conv is the slow half there). Backward alone, XLA's / im2col's / taps, quiet
# 2-core AMD EPYC (load <= 1.8), ms: 64x64 64->64 665 / 251 / 213; 56x56 64 (224 px) 543 / 187 / 197;
# 28x28 256 830 / 435 / 408; 16x16 64 20.8 / 12.5 / 14.5; 7x7 stem 224 px 635 / 283 / 366; 8x8 512 145 / 128 /
# 135. Whole fwd+bwd step, 64 px b16,
# XLA's backward above 8x8 vs taps: ResNet50 607 vs 569 ms, VGG16 3357 vs 2647 (load 1.6-2.0). Depthwise: the
# hand-written VJP against the shifted sum's own autodiff, backward alone: 5x5 8x8x240 3.3 vs 9.4 ms,
# 5x5 /2 16x16x144 8.7 vs 10.8, 3x3 16x16x144 3.5 vs 4.6, 3x3 32x32x32 6.8 vs 4.5 (the one loss); a whole
# EfficientNet-Lite0 fwd+bwd at 64 px b16: 263 vs 321 ms (an earlier run 258 vs 399). `benchmarks/cpu_convs.py --layers` re-measures.


def choose_impl(
  platform: str,
  conv_impl: str,
  *,
  kernel_size: tuple[int, int],
  in_features: int,
  groups: int,
  out_hw: tuple[int, int],
) -> tuple[str, str]:
  """(forward, backward): the lowerings (of LOWERINGS) of a conv of this shape on `platform` ('cpu', 'gpu', ...).

  The backward one computes the input and kernel gradients (`conv`'s grad_lowering). A pure function of
  its arguments, so that the choice for every platform is testable anywhere.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl={conv_impl!r}: expected one of {', '.join(CONV_IMPLS)}")
  if conv_impl == "xla" or (conv_impl == "auto" and platform != "cpu"):
    return "xla", "xla"
  depthwise = groups > 1 and groups == in_features  # (a 1-channel input is an ordinary conv)
  pointwise = tuple(kernel_size) == (1, 1) and groups == 1
  if conv_impl == "matmul":
    lo = "shifted" if depthwise else "dot" if pointwise else "im2col"
    return lo, lo
  if depthwise:
    return "shifted", "shifted"
  if groups != 1:
    return "xla", "xla"
  if pointwise:
    return "dot", "dot"
  if out_hw[0] <= kernel_size[0] and out_hw[1] <= kernel_size[1]:
    return "im2col", "im2col"
  return "xla", "im2col" if max(out_hw) <= 8 else "tuned"


def explicit_padding(padding: Any, in_hw: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int]):
  """((lo, hi), (lo, hi)) of a flax padding ("SAME", "VALID", an int, ints or pairs)."""
  pads = canonicalize_padding(padding, 2)
  if isinstance(pads, str):
    if pads not in ("SAME", "VALID", "SAME_LOWER"):
      raise ValueError(f"Conv: padding {padding!r} is not supported (SAME, VALID, an int or (lo, hi) pairs)")
    pads = lax.padtype_to_pads(tuple(in_hw), tuple(kernel_size), tuple(strides), pads)
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def _pad_hw(x: jax.Array, padding) -> jax.Array:
  """NHWC `x` zero-padded by ((lo, hi), (lo, hi)) in H and W."""
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))


def _windows(x: jax.Array, kernel_size, strides, out_hw):
  """The kh * kw strided views x[:, i + s*y, j + s*x, :] ([N, Ho, Wo, C] each), in (i, j) order."""
  n, _, _, c = x.shape
  (sh, sw), (ho, wo) = strides, out_hw
  return [
    lax.slice(x, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
    for i in range(kernel_size[0])
    for j in range(kernel_size[1])
  ]


def conv(
  x: jax.Array,
  kernel: jax.Array,
  *,
  strides: Sequence[int],
  padding: Sequence[tuple[int, int]],
  groups: int,
  lowering: str,
  grad_lowering: str | None = None,
) -> jax.Array:
  """The convolution of NHWC `x` with HWIO `kernel` (explicit padding) by `lowering` (one of LOWERINGS).

  Its gradient (input and kernel) is that of `grad_lowering` (of GRAD_LOWERINGS; default: `lowering`):
  autodiff of that lowering, except "shifted", whose gradient is `_depthwise_vjp`, and "taps" (`_taps_vjp`).
  A pair that differs, or "shifted", goes through the one custom_vjp `_split_conv`; ("xla", "xla") is
  XLA's conv and its own transposes.
  """
  grad_lowering = lowering if grad_lowering is None else grad_lowering
  for lo, known in ((lowering, LOWERINGS), (grad_lowering, GRAD_LOWERINGS)):
    if lo not in known:
      raise ValueError(f"unknown conv lowering {lo!r}; expected one of {', '.join(known)}")
  if grad_lowering in ("taps", "tuned") and groups != 1:
    raise ValueError(f"the {grad_lowering} gradient is for ungrouped convs, got groups={groups}")
  strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
  if lowering == grad_lowering != "shifted":
    return _conv(x, kernel, strides, padding, groups, lowering)
  return _split_conv(x, kernel, strides, padding, groups, lowering, grad_lowering)


def _conv(x: jax.Array, kernel: jax.Array, strides, padding, groups: int, lowering: str) -> jax.Array:
  """The forward of `conv` by one lowering (differentiable by autodiff)."""
  if lowering == "xla":
    return lax.conv_general_dilated(
      x, kernel, tuple(strides), tuple(padding), dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups
    )
  kh, kw, cin_g, features = kernel.shape
  dtype = jnp.result_type(x, kernel)
  acc = jnp.promote_types(dtype, jnp.float32)  # bf16 inputs accumulate in float32, as XLA's conv does
  x = _pad_hw(x, padding)
  n, hp, wp, c = x.shape
  out_hw = ((hp - kh) // strides[0] + 1, (wp - kw) // strides[1] + 1)
  views = _windows(x, (kh, kw), strides, out_hw)
  if lowering == "shifted":  # depthwise: out[..., c*m + t] = sum_ij x_ij[..., c] * k[i, j, 0, c*m + t]
    if cin_g != 1 or groups != c:
      raise ValueError(f"the shifted lowering is for depthwise convs (groups == in_features), got groups={groups}")
    return _shifted_sum(views, kernel.reshape(kh * kw, features), acc).astype(dtype)
  # im2col (a 1x1 conv's single view is the input itself): patches [N, Ho, Wo, kh*kw*C] in (i, j, c) order,
  # the kernel's row-major order.
  patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  if groups == 1:
    y = jnp.dot(
      patches.reshape(-1, kh * kw * c), kernel.reshape(kh * kw * c, features), preferred_element_type=acc
    ).reshape(n, *out_hw, features)
  else:  # input channel g*cin_g + a and output feature g*(F/groups) + f belong to group g
    p = patches.reshape(n, *out_hw, kh * kw, groups, cin_g)
    k = kernel.reshape(kh * kw, cin_g, groups, features // groups)
    y = jnp.einsum("nhwkga,kagf->nhwgf", p, k, preferred_element_type=acc).reshape(n, *out_hw, features)
  return y.astype(dtype)


def _shifted_sum(views, k: jax.Array, acc) -> jax.Array:
  """sum_t views[t][..., c] * k[t, c*m + u] over [.., C*m] (each input channel repeated m = F / C times)."""
  m = k.shape[-1] // views[0].shape[-1]
  k = k.astype(acc)
  y = None
  for t, v in enumerate(views):
    v = jnp.repeat(v, m, axis=-1) if m > 1 else v
    term = v.astype(acc) * k[t]
    y = term if y is None else y + term
  return y


def _depthwise_vjp(x: jax.Array, kernel: jax.Array, strides, padding, g: jax.Array):
  """(input, kernel) gradients of the depthwise conv y = _conv(x, kernel, ..., "shifted") at cotangent g.

  Kernel: for each of the k*k taps, the product of the input's strided view and g summed over
  (N, Ho, Wo), from 64 channels up by halving the rows with elementwise adds (XLA:CPU's reduction over
  the leading axes, the autodiff's, was 2-4x slower at 144-240 channels, 10% faster at 32). Input:
  `_depthwise_input_grad` (stride 1, 5x5 at 8x8x240: 0.8 vs 4.0 ms for the autodiff's k*k pads).
  """
  kh, kw, _, features = kernel.shape
  m, (ho, wo) = features // x.shape[-1], g.shape[1:3]
  acc = jnp.promote_types(jnp.result_type(x, kernel), jnp.float32)
  dx = _depthwise_input_grad(g, kernel, strides, padding, x.shape, acc).astype(x.dtype)
  xp = _pad_hw(x, padding)
  ga = g.astype(acc)
  dk = []
  for v in _windows(xp, (kh, kw), strides, (ho, wo)):
    p = ((jnp.repeat(v, m, axis=-1) if m > 1 else v).astype(acc) * ga).reshape(-1, features)
    while features >= 64 and p.shape[0] > 64 and p.shape[0] % 2 == 0:
      p = p[: p.shape[0] // 2] + p[p.shape[0] // 2 :]
    dk.append(p.sum(0))
  return dx, jnp.stack(dk).reshape(kernel.shape).astype(kernel.dtype)


def _depthwise_input_grad(g: jax.Array, kernel: jax.Array, strides, padding, x_shape, acc) -> jax.Array:
  """The input gradient of the depthwise conv at cotangent g, as shifted sums (a correlation with the kernel
  flipped), one per input phase: the input rows r = s*t + rho (rho < s) take the taps i = r + lo (mod s)
  only, so each phase is a stride-1 shifted sum over g with its share of the taps, and the phases interleave.
  No multiplication by the zeros of a dilated g, no scatter. Stride 1 is one phase. Strided, against the
  autodiff's gradient (k*k pads of g) on EfficientNet-Lite0's shapes, batch 16, quiet 2-core AMD EPYC, ms:
  3x3/2 112x112x96 51.6 vs 30.8; 5x5/2 56x56x144 74.7 vs 8.6; 5x5/2 14x14x672 20.2 vs 3.0; a whole Lite0
  fwd+bwd 1888 vs 1852 at 224 px, 658 vs 637 at 64 px batch 64, 147 vs 139 at batch 16.
  """
  n, h, w, c = x_shape
  kh, kw, _, features = kernel.shape
  (ho, wo), m = g.shape[1:3], features // c

  def phase(rho, size, lo, k, s, out):  # (first tap, number of taps, g's padding, rows) of residue rho
    a = (rho + lo) % s
    taps = len(range(a, k, s))
    p0, rows = -((a - lo) // s), -(-(size - rho) // s)
    return a, taps, (taps - 1 - p0, rows + p0 - out), rows

  (sh, sw), (th, tw) = strides, (-(-h // strides[0]), -(-w // strides[1]))
  row_phases = []
  for rho_h in range(sh):
    a, ti, pad_h, rows = phase(rho_h, h, padding[0][0], kh, sh, ho)
    cols = []
    for rho_w in range(sw):
      b, tj, pad_w, width = phase(rho_w, w, padding[1][0], kw, sw, wo)
      if ti and tj and rows > 0 and width > 0:
        gp = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (*pad_h, 0), (*pad_w, 0), (0, 0, 0)))
        taps = kernel[a::sh, b::sw][::-1, ::-1].reshape(ti * tj, features)
        d = _shifted_sum(_windows(gp, (ti, tj), (1, 1), (rows, width)), taps, acc)
        d = d.reshape(n, rows, width, c, m).sum(-1) if m > 1 else d
      else:
        d = jnp.zeros((n, max(rows, 0), max(width, 0), c), acc)
      cols.append(jnp.pad(d, ((0, 0), (0, th - d.shape[1]), (0, tw - d.shape[2]), (0, 0))))
    row_phases.append(cols[0] if sw == 1 else jnp.stack(cols, axis=3).reshape(n, th, tw * sw, c))
  dx = row_phases[0] if sh == 1 else jnp.stack(row_phases, axis=2).reshape(n, th * sh, tw * sw, c)
  return dx[:, :h, :w]


def _taps_vjp(x: jax.Array, kernel: jax.Array, strides, padding, g: jax.Array):
  """(input, kernel) gradients of an ungrouped conv at cotangent g: XLA's transpose for the input; for the
  kernel, per tap (i, j), the strided view of the padded input contracted with g over (N, Ho, Wo), one dot
  [C, N*Ho*Wo] x [N*Ho*Wo, F] each. XLA:CPU's kernel-gradient conv ran at 1.4 GFLOP/s on VGG16's first
  layers (a dot runs at 30-60 here); the per-tap dots measured in the table above `choose_impl`.
  """
  kh, kw, c, features = kernel.shape
  acc = jnp.promote_types(jnp.result_type(x, kernel), jnp.float32)
  dx = jax.vjp(lambda x: _conv(x, kernel, strides, padding, 1, "xla"), x)[1](g)[0]
  xp = _pad_hw(x, padding)
  g2 = g.reshape(-1, features)
  dk = [
    lax.dot_general(v.reshape(-1, c), g2, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    for v in _windows(xp, (kh, kw), strides, g.shape[1:3])
  ]
  return dx, jnp.stack(dk).reshape(kernel.shape).astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _split_conv(x, kernel, strides, padding, groups, lowering, grad_lowering):
  """`_conv` by `lowering` whose VJP is that of `grad_lowering` ("shifted": `_depthwise_vjp`, "taps": `_taps_vjp`)."""
  return _conv(x, kernel, strides, padding, groups, lowering)


def _split_conv_fwd(x, kernel, strides, padding, groups, lowering, grad_lowering):
  return _conv(x, kernel, strides, padding, groups, lowering), (x, kernel)


def _split_conv_bwd(strides, padding, groups, lowering, grad_lowering, res, g):
  x, kernel = res
  return backward(x, kernel, strides, padding, groups, grad_lowering, g)


def backward(x, kernel, strides, padding, groups, grad_lowering, g):
  """(input, kernel) gradients of the conv of `x` with `kernel` at cotangent g by `grad_lowering`."""
  if grad_lowering == "tuned":
    grad_lowering = conv_tuning.backward_lowering(
      x.shape,
      kernel.shape,
      g.shape,
      strides,
      padding,
      jnp.result_type(x, kernel),
      lambda x, kernel, g, lowering: backward(x, kernel, strides, padding, 1, lowering, g),
    )
  if grad_lowering == "shifted":
    return _depthwise_vjp(x, kernel, strides, padding, g)
  if grad_lowering == "taps":
    return _taps_vjp(x, kernel, strides, padding, g)
  # (the forward inside this VJP is dead code once jitted: only the transposes of grad_lowering run)
  return jax.vjp(lambda x, k: _conv(x, k, strides, padding, groups, grad_lowering), x, kernel)[1](g)


_split_conv.defvjp(_split_conv_fwd, _split_conv_bwd)


class Conv(nn.Module):
  """flax.linen.Conv (2-D, NHWC) whose lowering is `choose_impl(jax.default_backend(), conv_impl, ...)`."""

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    # (An int kernel_size means a 1-D conv to flax: refused here rather than read as (k, k).)
    kernel_size = tuple(self.kernel_size) if not isinstance(self.kernel_size, int) else ()
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    if len(kernel_size) != 2 or len(strides) != 2:
      raise ValueError(f"Conv is 2-D: kernel_size={self.kernel_size!r} (expected (kh, kw)), strides={self.strides!r}")
    batch_shape = inputs.shape[:-3]
    x = inputs.reshape(-1, *inputs.shape[-3:])
    in_features, groups = x.shape[-1], self.feature_group_count
    if in_features % groups or self.features % groups:
      raise ValueError(
        f"Conv: feature_group_count={groups} must divide {in_features} inputs and {self.features} outputs"
      )
    kernel = self.param(
      "kernel", self.kernel_init, (*kernel_size, in_features // groups, self.features), self.param_dtype
    )
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)

    padding = explicit_padding(self.padding, x.shape[1:3], kernel_size, strides)
    out_hw = tuple((x.shape[1 + d] + sum(padding[d]) - kernel_size[d]) // strides[d] + 1 for d in range(2))
    lowering, grad_lowering = choose_impl(
      jax.default_backend(),
      self.conv_impl,
      kernel_size=kernel_size,
      in_features=in_features,
      groups=groups,
      out_hw=out_hw,
    )
    y = conv(x, kernel, strides=strides, padding=padding, groups=groups, lowering=lowering, grad_lowering=grad_lowering)
    if bias is not None:
      y = y + bias
    return y.reshape(*batch_shape, *y.shape[1:])


def _pool_geometry(x_shape, window, strides, padding):
  pads = explicit_padding(padding, x_shape[1:3], window, strides)
  hp, wp = x_shape[1] + sum(pads[0]), x_shape[2] + sum(pads[1])
  return pads, (hp, wp), ((hp - window[0]) // strides[0] + 1, (wp - window[1]) // strides[1] + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, window, strides, padding) -> jax.Array:
  """XLA's reduce_window (which XLA:CPU fuses with the convs around it: the module docstring); its gradient is
  `_max_pool_bwd`'s."""
  pads = ((0, 0), *padding, (0, 0))  # (`max_pool` passes explicit padding)
  return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, *window, 1), (1, *strides, 1), pads)


def _max_pool_fwd(x, window, strides, padding):
  y = _max_pool(x, window, strides, padding)
  return y, (x, y)


def _max_pool_bwd(window, strides, padding, res, g):
  """Each window's gradient to its first maximum (row-major), as XLA's select-and-scatter."""
  x, y = res
  pads, (hp, wp), out_hw = _pool_geometry(x.shape, window, strides, padding)
  xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(xp.shape, g.dtype)
  zero = jnp.zeros((), g.dtype)
  views = _windows(xp, window, strides, out_hw)
  for t, v in enumerate(views):
    i, j = divmod(t, window[1])
    first = (v == y) & ~taken
    taken = taken | first
    hi = (hp - i - strides[0] * (out_hw[0] - 1) - 1, wp - j - strides[1] * (out_hw[1] - 1) - 1)
    dxp = dxp + lax.pad(
      jnp.where(first, g, zero), zero, ((0, 0, 0), (i, hi[0], strides[0] - 1), (j, hi[1], strides[1] - 1), (0, 0, 0))
    )
  (plo, _), (qlo, _) = pads
  return (dxp[:, plo : plo + x.shape[1], qlo : qlo + x.shape[2]],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int], padding: Any = "VALID", *, conv_impl="auto"):
  """nn.max_pool on NHWC `x`, lowered as the module docstring says (conv_impl as for Conv)."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl={conv_impl!r}: expected one of {', '.join(CONV_IMPLS)}")
  if conv_impl == "xla" or (conv_impl == "auto" and jax.default_backend() != "cpu"):
    return nn.max_pool(x, tuple(window), strides=tuple(strides), padding=padding)
  pads = explicit_padding(padding, x.shape[1:3], window, strides)
  with jax.named_scope("max_pool"):  # profiles (benchmarks/cpu_convs.py --profile) name it, and its gradient
    return _max_pool(x, tuple(window), tuple(strides), pads)
