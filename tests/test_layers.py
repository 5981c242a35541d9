"""jsim.models.layers.Conv: every lowering is XLA's conv (values and gradients), nn.Conv's parameters, the choice."""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jsim import configs, models, validate
from jsim.models import layers
from conftest import parametrize_fast_first

# (batch, H, W, in, out, kernel, strides, padding, groups): strides 1 and 2, kernels 1/3/5/7, SAME, VALID and
# explicit (also asymmetric) padding, odd and non-square sizes, a single channel, batch 1, depthwise, grouped.
SHAPES = [
  (2, 9, 9, 8, 16, 1, 1, "SAME", 1),
  (2, 9, 7, 8, 12, 1, 2, "SAME", 1),
  (1, 7, 7, 4, 6, 1, 2, ((1, 0), (0, 1)), 1),
  (2, 8, 8, 6, 10, 3, 1, ((1, 1), (1, 1)), 1),
  (2, 9, 11, 6, 10, 3, 2, ((1, 1), (1, 1)), 1),
  (1, 2, 2, 16, 16, 3, 1, ((1, 1), (1, 1)), 1),  # output no larger than the kernel: auto picks im2col on a CPU
  (2, 4, 4, 16, 8, 3, 2, "SAME", 1),
  (2, 10, 10, 5, 7, 5, 1, "SAME", 1),
  (2, 11, 9, 5, 7, 5, 2, "VALID", 1),
  (1, 13, 13, 3, 8, 7, 2, ((3, 3), (3, 3)), 1),  # the ResNet stem
  (2, 9, 10, 1, 4, 7, 1, ((2, 1), (0, 3)), 1),  # a single input channel, asymmetric padding
  (2, 7, 7, 4, 1, 3, 1, "SAME", 1),  # a single output channel
  (2, 9, 9, 8, 8, 3, 1, "SAME", 8),  # depthwise
  (1, 9, 7, 8, 8, 3, 2, ((1, 1), (1, 1)), 8),
  (2, 11, 11, 6, 6, 5, 2, "SAME", 6),
  (2, 10, 10, 4, 4, 7, 1, "SAME", 4),
  (2, 6, 6, 4, 4, 1, 1, "SAME", 4),
  (2, 8, 8, 4, 12, 3, 1, "SAME", 4),  # depthwise with channel multiplier 3
  (2, 10, 9, 4, 8, 3, 2, ((0, 2), (2, 1)), 4),  # strided depthwise: multiplier 2, asymmetric padding
  (1, 7, 7, 4, 4, 1, 2, "SAME", 4),  # strided 1x1 depthwise (input phases no tap reaches)
  (1, 10, 11, 3, 3, 5, 3, ((1, 2), (2, 0)), 3),  # stride 3
  (2, 8, 8, 8, 12, 3, 1, "SAME", 2),  # grouped
  (1, 9, 9, 6, 9, 3, 2, ((1, 1), (1, 1)), 3),
]


def _lowerings(kernel: int, in_features: int, groups: int) -> tuple[list[str], list[str]]:
  """(forward, backward): the lowerings that apply to a conv of this shape."""
  out = ["xla", "im2col"]
  if kernel == 1 and groups == 1:
    out.append("dot")
  if groups > 1 and groups == in_features:
    out.append("shifted")
  return out, out + (["taps", "tuned"] if groups == 1 else [])


def _normal(rng, *shape) -> np.ndarray:
  return rng.standard_normal(shape, dtype=np.float32)  # (numpy: jax.random would compile a sampler per shape)


# make test-fast takes one shape of each kind: 1x1, kxk with explicit padding, the im2col cliff, the stem, one input
# channel, depthwise, with a multiplier, strided with asymmetric padding, stride 3, grouped; make test all of them.
FAST_SHAPES = {0, 4, 5, 9, 10, 12, 17, 18, 20, 21}


@pytest.mark.parametrize(
  "shape",
  [pytest.param(s, marks=() if i in FAST_SHAPES else pytest.mark.slow) for i, s in enumerate(SHAPES)],
  ids=lambda s: "x".join(map(str, s[:6])) + f"_s{s[6]}_g{s[8]}_{s[7]}",
)
def test_every_lowering_equals_xla_in_value_and_gradient(shape):
  # Every (forward, backward) pair of lowerings, jitted: the forward's value, and the input and kernel
  # gradients of the backward one (its own autodiff, or the custom VJP when the two differ or for "shifted").
  n, h, w, cin, cout, k, s, padding, groups = shape
  rng = np.random.default_rng(SHAPES.index(shape))
  x, kernel = _normal(rng, n, h, w, cin), _normal(rng, k, k, cin // groups, cout) / np.sqrt(k * k * cin / groups)
  pads = layers.explicit_padding(padding, (h, w), (k, k), (s, s))
  out_hw = tuple((d + sum(p) - k) // s + 1 for d, p in zip((h, w), pads))
  cotangent = _normal(rng, n, *out_hw, cout)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def run(lowering, grad_lowering):
    f = lambda x, k: layers.conv(
      x, k, strides=(s, s), padding=pads, groups=groups, lowering=lowering, grad_lowering=grad_lowering
    )
    y, vjp = jax.vjp(f, x, kernel)
    return y, vjp(cotangent)

  y_ref, (dx_ref, dk_ref) = run("xla", "xla")
  for lowering, grad_lowering in itertools.product(*_lowerings(k, cin, groups)):
    y, (dx, dk) = run(lowering, grad_lowering)
    what = f"{lowering}/{grad_lowering}"
    assert y.shape == y_ref.shape and dx.shape == dx_ref.shape and dk.shape == dk_ref.shape, what
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=f"{what}: output")
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5, err_msg=f"{what}: input gradient")
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=2e-5, err_msg=f"{what}: kernel gradient")


@parametrize_fast_first("shape", [SHAPES[4], SHAPES[13], SHAPES[17]], ids=["3x3", "dw", "dw_x3"])
def test_split_lowerings_under_vmap_and_grad_of_grad(shape):
  # Nothing in jsim takes second derivatives or vmaps a conv; the custom VJP supports both anyway (its
  # backward is itself differentiable), checked here against XLA's conv.
  n, h, w, cin, cout, k, s, padding, groups = shape
  rng = np.random.default_rng(7)
  x, kernel = _normal(rng, 3, n, h, w, cin), _normal(rng, k, k, cin // groups, cout)
  pads = layers.explicit_padding(padding, (h, w), (k, k), (s, s))
  pairs = [("xla", "im2col"), ("im2col", "xla")]
  pairs += [("shifted", "shifted"), ("xla", "shifted")] if groups > 1 else [("xla", "taps"), ("im2col", "taps")]

  def loss(x, kernel, pair):
    y = layers.conv(x, kernel, strides=(s, s), padding=pads, groups=groups, lowering=pair[0], grad_lowering=pair[1])
    return jnp.sum(jnp.sin(y))

  per_example = lambda pair: jax.jit(jax.vmap(jax.grad(lambda x, k: loss(x, k, pair), argnums=(0, 1)), (0, None)))
  second = lambda pair: jax.jit(jax.grad(lambda k: jnp.sum(jax.grad(loss)(x[0], k, pair) ** 2)))
  ref_first, ref_second = per_example(("xla", "xla"))(x, kernel), second(("xla", "xla"))(kernel)
  for pair in pairs:
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=str(pair)),
      per_example(pair)(x, kernel),
      ref_first,
    )
    # The second derivative sums products of terms up to ~1e3: float32 rounding is relative to that scale
    # (an element of 10.7 was 2.2e-3 off XLA's, 2.5e-6 of the largest, on one machine), not to each element.
    scale = float(np.abs(ref_second).max())
    np.testing.assert_allclose(second(pair)(kernel), ref_second, rtol=1e-4, atol=1e-5 * scale, err_msg=str(pair))


# auto in make test-fast; the forced lowerings (each shape compiles again) in make test.
@pytest.mark.parametrize(
  "conv_impl", [pytest.param(i, marks=() if i == "auto" else pytest.mark.slow) for i in layers.CONV_IMPLS]
)
@parametrize_fast_first("shape", [SHAPES[4], SHAPES[5], SHAPES[13], SHAPES[18]], ids=["3x3", "tiny", "dw", "grouped"])
def test_conv_is_nn_conv_with_the_same_parameters(shape, conv_impl):
  n, h, w, cin, cout, k, s, padding, groups = shape
  x = _normal(np.random.default_rng(0), n, h, w, cin)
  kw = dict(features=cout, kernel_size=(k, k), strides=(s, s), padding=padding, feature_group_count=groups)
  kw["bias_init"] = nn.initializers.normal(1.0)  # a nonzero bias, so that adding it is checked
  ref, ours = nn.Conv(**kw), layers.Conv(**kw, conv_impl=conv_impl)
  variables = ref.init(jax.random.PRNGKey(1), x)
  mine = ours.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(mine) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, mine, variables)  # same names, layout, order and initialisers
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5)
  # int strides, as flax accepts them; no bias
  kw.update(strides=s, use_bias=False)
  shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(m.init, jax.random.PRNGKey(2), x))
  assert shapes(layers.Conv(**kw, conv_impl=conv_impl)) == shapes(nn.Conv(**kw))


@pytest.mark.parametrize("conv_impl", [pytest.param("xla", marks=pytest.mark.slow), "matmul"])
def test_dtype_promotion_as_nn_conv(conv_impl):
  x = jnp.asarray(_normal(np.random.default_rng(0), 2, 6, 6, 4), jnp.bfloat16)
  for dtype in (None, jnp.bfloat16, jnp.float32):
    ref = nn.Conv(8, (3, 3), dtype=dtype)
    variables = ref.init(jax.random.PRNGKey(1), x)
    y_ref = ref.apply(variables, x)
    y = layers.Conv(8, (3, 3), dtype=dtype, conv_impl=conv_impl).apply(variables, x)
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=2e-2, atol=2e-2)


def test_an_int_kernel_size_is_refused_not_read_as_square():
  with pytest.raises(ValueError, match=r"Conv is 2-D: kernel_size=3 \(expected \(kh, kw\)\)"):
    layers.Conv(4, 3).init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 2)))


def test_conv_refuses_lowerings_that_do_not_apply():
  x, k = jnp.zeros((1, 5, 5, 4)), jnp.zeros((3, 3, 1, 4))
  conv = lambda lo, glo, groups: layers.conv(
    x, k, strides=(1, 1), padding=((1, 1), (1, 1)), groups=groups, lowering=lo, grad_lowering=glo
  )
  with pytest.raises(ValueError, match=r"unknown conv lowering 'taps'; expected one of xla, dot, im2col, shifted$"):
    conv("taps", "xla", 4)  # a backward-only lowering
  with pytest.raises(
    ValueError, match=r"unknown conv lowering 'fast'; expected one of xla, dot, im2col, shifted, taps, tuned$"
  ):
    conv("xla", "fast", 4)
  for glo in ("taps", "tuned"):
    with pytest.raises(ValueError, match=rf"the {glo} gradient is for ungrouped convs, got groups=4"):
      conv("xla", glo, 4)


def test_leading_batch_dimensions_are_flattened_as_nn_conv():
  x = _normal(np.random.default_rng(0), 2, 3, 5, 5, 4)
  variables = nn.Conv(6, (3, 3)).init(jax.random.PRNGKey(1), x)
  y = layers.Conv(6, (3, 3), conv_impl="matmul").apply(variables, x)
  np.testing.assert_allclose(y, nn.Conv(6, (3, 3)).apply(variables, x), rtol=1e-5, atol=1e-5)


SHAPE_GRID = [
  dict(kernel_size=(k, k), in_features=c, groups=g, out_hw=(o, o))
  for k in (1, 3, 5, 7)
  for c in (1, 3, 64, 512)
  for g in {1, c}
  for o in (1, 2, 3, 4, 7, 56, 112)
]


@pytest.mark.parametrize("platform", ["gpu", "tpu", "cuda", "rocm", "METAL"])
def test_accelerators_always_use_xla_conv_unless_forced(platform):
  assert {layers.choose_impl(platform, "auto", **s) for s in SHAPE_GRID} == {("xla", "xla")}
  assert {layers.choose_impl(platform, "xla", **s) for s in SHAPE_GRID} == {("xla", "xla")}
  assert "xla" not in {lo for s in SHAPE_GRID for lo in layers.choose_impl(platform, "matmul", **s)}


def test_the_cpu_table():
  choose = lambda k, c, g, o: layers.choose_impl("cpu", "auto", kernel_size=(k, k), in_features=c, groups=g, out_hw=o)
  assert choose(3, 32, 32, (32, 32)) == ("shifted", "shifted")  # depthwise, any size: _depthwise_vjp backward
  assert choose(5, 240, 240, (2, 2)) == ("shifted", "shifted")
  assert choose(1, 64, 1, (56, 56)) == ("dot", "dot")
  assert choose(1, 2048, 1, (2, 2)) == ("dot", "dot")
  assert choose(3, 512, 1, (2, 2)) == ("im2col", "im2col")  # ResNet50's stage 4 at 64 px
  assert choose(3, 512, 1, (3, 3)) == ("im2col", "im2col")
  assert choose(3, 256, 1, (4, 4)) == ("xla", "im2col")  # XLA's forward, im2col's backward
  assert choose(3, 128, 1, (8, 8)) == ("xla", "im2col")
  assert choose(3, 64, 1, (9, 9)) == ("xla", "tuned")  # XLA's forward; XLA's or the taps' backward (conv_tuning)
  assert choose(3, 64, 1, (56, 56)) == ("xla", "tuned")
  assert choose(7, 3, 1, (112, 112)) == ("xla", "tuned")
  assert choose(3, 64, 4, (8, 8)) == ("xla", "xla")  # grouped, not depthwise
  assert {layers.choose_impl("cpu", "xla", **s) for s in SHAPE_GRID} == {("xla", "xla")}
  assert all(fwd == bwd != "xla" for fwd, bwd in (layers.choose_impl("cpu", "matmul", **s) for s in SHAPE_GRID))
  with pytest.raises(ValueError, match="conv_impl='fast'"):
    choose_bad = layers.choose_impl("cpu", "fast", **SHAPE_GRID[0])
    del choose_bad


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_xla_conv_impl_and_accelerators_have_no_custom_vjp(platform, monkeypatch):
  # conv_impl=xla anywhere, and auto off the CPU: XLA's conv and XLA's own transposes, no custom_vjp; auto on
  # a CPU: the split lowering's custom_vjp. (make_jaxpr only traces, so the platform can be pretended.)
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  # 8x8 outputs: ("xla", "im2col") and ("shifted", "shifted") on a CPU
  x = _normal(np.random.default_rng(0), 2, 8, 8, 8)
  for kw in (dict(features=8, kernel_size=(3, 3)), dict(features=8, kernel_size=(3, 3), feature_group_count=8)):
    for impl in ("xla", "auto"):
      conv = layers.Conv(**kw, conv_impl=impl)
      variables = conv.init(jax.random.PRNGKey(0), x)
      forward = _primitives(jax.make_jaxpr(conv.apply)(variables, x).jaxpr)
      both = _primitives(jax.make_jaxpr(jax.grad(lambda v, x: conv.apply(v, x).sum(), (0, 1)))(variables, x).jaxpr)
      plain = impl == "xla" or platform != "cpu"
      assert ("custom_vjp_call" not in forward) == plain, (kw, impl, sorted(forward))
      assert ("conv_general_dilated" in both and "dot_general" not in both) or not plain, (kw, impl, sorted(both))


def _primitives(jaxpr) -> set[str]:
  out = set()
  for eqn in jaxpr.eqns:
    out.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _primitives(sub)
  return out


@pytest.mark.parametrize("name", ["resnet_tiny", "vgg_tiny"])
@pytest.mark.slow
def test_backbones_pass_conv_impl_to_every_conv(name):
  x = _normal(np.random.default_rng(0), 2, 32, 32, 3)
  outputs, variables = {}, None
  for impl in ("xla", "matmul"):
    model = models.build(name, num_classes=5, conv_impl=impl)
    init = lambda k, m=model: m.init({"params": k, "dropout": k}, x, train=False)
    if variables is None:
      variables = jax.jit(init)(jax.random.PRNGKey(0))
    assert jax.tree.map(jnp.shape, jax.eval_shape(init, jax.random.PRNGKey(0))) == jax.tree.map(jnp.shape, variables)
    apply = lambda v, m=model: m.apply(v, x, train=False)
    prims = _primitives(jax.make_jaxpr(jax.grad(lambda v: apply(v)[0].sum()))(variables).jaxpr)
    assert ("conv_general_dilated" in prims) == (impl == "xla"), (impl, sorted(prims))
    outputs[impl] = jax.jit(apply)(variables)
  np.testing.assert_allclose(outputs["matmul"][0], outputs["xla"][0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(outputs["matmul"][1], outputs["xla"][1], rtol=1e-4, atol=1e-4)


def test_conv_impl_is_a_checked_config_key():
  config = configs.base_config()
  assert config.model.conv_impl == "auto"
  config.model.conv_impl = "fast"
  with pytest.raises(ValueError, match=r"^model.conv_impl='fast': expected one of 'auto', 'xla', 'matmul'$"):
    validate.check_config(config)


@parametrize_fast_first(
  "shape,window,strides,padding",
  [
    ((2, 9, 9, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool, odd size
    ((1, 8, 10, 2), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),  # VGG's pools
    ((1, 7, 9, 2), (2, 2), (2, 2), "VALID"),  # torch floors odd sizes
    ((2, 9, 9, 2), (3, 3), (1, 1), "SAME"),
  ],
)
def test_max_pool_equals_nn_max_pool_with_ties(shape, window, strides, padding):
  # Few distinct values and ReLU's zeros: windows with tied maxima, where the gradient goes to the first.
  x = np.maximum(np.round(_normal(np.random.default_rng(1), *shape) * 2), 0).astype(np.float32)
  ref = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)
  y_ref = ref(x)
  g = _normal(np.random.default_rng(2), *y_ref.shape)
  dx_ref = jax.vjp(ref, x)[1](g)[0]
  for impl in ("matmul", "auto"):  # auto: the shifted lowering on this CPU
    ours = lambda x: layers.max_pool(x, window, strides, padding, conv_impl=impl)
    y, vjp = jax.vjp(ours, x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(vjp(g)[0], dx_ref, rtol=1e-6, atol=1e-6)
    assert (
      "select_and_scatter_add" in _primitives(jax.make_jaxpr(jax.grad(lambda x: ours(x).sum()))(x).jaxpr)
    ) is False
  assert "select_and_scatter_add" in str(
    jax.make_jaxpr(jax.grad(lambda x: layers.max_pool(x, window, strides, padding, conv_impl="xla").sum()))(x)
  )
