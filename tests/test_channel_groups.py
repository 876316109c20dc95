"""Channel groups (gsm_optax/groups.py): channels that span several leaves, as a
transformer's MLP neurons and attention heads, their GSM mask, cut and report,
the narrow GPT / ViT built from them, and train.py's config.channels.groups.

The references are NumPy written here: channel scores summed slice by slice in
float64 over values that are small multiples of 1/2, so that every sum is exact
in float32 too and the kept sets can be compared exactly, ties included.
"""

from __future__ import annotations

import json
import os
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from test_lm_train import corpus  # noqa: E402, F401  (the fixture)
from test_lm_train import lm_config  # noqa: E402
from test_train import data_dir  # noqa: E402, F401  (the fixture)
from test_train import tiny_config  # noqa: E402

from benchmarks import bench_export  # noqa: E402
from configs import default as default_config  # noqa: E402
import gsm_optax  # noqa: E402
from gsm_optax import ChannelSlice  # noqa: E402
from models import count_params  # noqa: E402
from models.gpt import GPT  # noqa: E402
from models.narrow import count_macs  # noqa: E402
from models.narrow import narrow  # noqa: E402
from models.transformer import channel_groups  # noqa: E402
from models.vit import ViT  # noqa: E402
from training import checkpoints  # noqa: E402
from training import config as config_lib  # noqa: E402
from training import stages  # noqa: E402
from training import steps  # noqa: E402
from training import train_lib  # noqa: E402

# Four grouped kernels, a kernel and two biases in no group. Group "mlp": 6
# channels, column j of a and row j of b; group "conv": 2 channels of width 2
# along c's last axis and of width 4 along d's axis 1.
SHAPES = {
  "a": {"kernel": (3, 6), "bias": (6,)},
  "b": {"kernel": (6, 4), "bias": (4,)},
  "c": {"kernel": (2, 2, 3, 4)},
  "d": {"kernel": (4, 8)},
  "e": {"kernel": (4, 5)},
}
SPECS = {
  "a": {"kernel": ChannelSlice("mlp", -1), "bias": None},
  "b": {"kernel": ChannelSlice("mlp", 0), "bias": None},
  "c": {"kernel": ChannelSlice("conv", 3, 2)},
  "d": {"kernel": ChannelSlice("conv", 1, 4)},
  "e": {"kernel": None},
}
CHANNELS = 6 + 2
MEMBERS = (("a", "kernel"), ("b", "kernel"), ("c", "kernel"), ("d", "kernel"))
LR, BETA, ETA = 0.5, 0.5, 0.25  # dyadic: every update below is exact in float32


def halves(seed: int, zeros: bool = True) -> dict:
  """Params of SHAPES with entries in {-3, ..., 3} / 2 (float32); no zeros unless `zeros`."""
  rng = np.random.default_rng(seed)

  def draw(shape):
    x = rng.integers(-3, 4, shape)
    if not zeros:
      x = np.where(x == 0, 1, x)
    return (x / 2).astype(np.float32)

  return {k: {n: draw(s) for n, s in v.items()} for k, v in SHAPES.items()}


def maybe_jit(fn, use_jit: bool):
  return jax.jit(fn) if use_jit else fn


# ----------------------------------------------------------------------------
# NumPy reference.


def ref_scores(per_weight: dict, specs: dict, channel_score: str) -> list[tuple[str, np.ndarray]]:
  """[(group, S_c per channel)] in the order of the groups' first member."""
  totals: dict[str, list] = {}
  for layer, names in specs.items():
    for name, spec in names.items():
      if spec is None:
        continue
      x = np.moveaxis(np.asarray(per_weight[layer][name], np.float64), spec.axis, 0)
      channels = x.shape[0] // spec.width
      sums = np.array(
        [x[c * spec.width : (c + 1) * spec.width].sum() for c in range(channels)], np.float64
      )
      entry = totals.setdefault(spec.group, [np.zeros(channels), 0])
      entry[0] = entry[0] + sums
      entry[1] += x.size // channels
  out = []
  for group, (sums, count) in totals.items():
    if channel_score == "mean":  # float32 division, as the library's
      sums = (sums.astype(np.float32) / np.float32(count)).astype(np.float64)
    out.append((group, sums))
  return out


def ref_expand(kept: dict[str, np.ndarray], specs: dict, shapes: dict) -> dict:
  """Channel booleans per group -> a bool array per leaf (True for leaves in no group)."""
  out = {}
  for layer, names in specs.items():
    out[layer] = {}
    for name, spec in names.items():
      shape = shapes[layer][name]
      if spec is None:
        out[layer][name] = np.ones(shape, bool)
        continue
      per_index = np.repeat(kept[spec.group], spec.width)
      view = [1] * len(shape)
      view[spec.axis] = -1
      out[layer][name] = np.broadcast_to(per_index.reshape(view), shape)
  return out


def ref_gsm_mask(grads, params, specs, compression, channel_score="sum") -> tuple[dict, int]:
  """(B per leaf, number of active channels): S_c >= t, t the Q-th greatest S_c over all
  groups (NaN ranked as 0), and S_c > 0 unless Q is every channel; NaN never."""
  taylor = jax.tree.map(lambda g, w: np.abs(np.float64(g) * np.float64(w)), grads, params)
  scores = ref_scores(taylor, specs, channel_score)
  flat = np.concatenate([s for _, s in scores])
  keep = int(flat.size / compression)
  t = np.sort(np.nan_to_num(flat, nan=0.0))[::-1][keep - 1]
  active = {g: (s >= t) & ((s > 0) | (keep >= flat.size)) for g, s in scores}
  return ref_expand(active, specs, SHAPES), int(sum(a.sum() for a in active.values()))


def ref_cut(params, specs, compression, channel_score="sum") -> dict:
  """The Q channels of greatest S_c = sum |w|: sorted by (-S_c, position in group order)."""
  magnitudes = jax.tree.map(lambda w: np.abs(np.float64(w)), params)
  scores = ref_scores(magnitudes, specs, channel_score)
  flat = np.concatenate([s for _, s in scores])
  keep = int(flat.size / compression)
  order = sorted(range(flat.size), key=lambda i: (-flat[i], i))
  kept = np.zeros(flat.size, bool)
  kept[order[:keep]] = True
  pieces, start = {}, 0
  for group, s in scores:
    pieces[group] = kept[start : start + s.size]
    start += s.size
  return ref_expand(pieces, specs, SHAPES)


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ----------------------------------------------------------------------------
# The library: resolution, mask, GSM, cut, report.


def test_resolve_groups_orders_groups_by_first_member_and_counts_channels():
  layout = gsm_optax.resolve_groups(halves(0), SPECS)
  assert layout.names == ("mlp", "conv") and layout.channels == (6, 2)
  assert layout.paths == ("a/kernel", "b/kernel", "c/kernel", "d/kernel")
  assert [[(m.axis, m.width) for m in ms] for ms in layout.members] == [
    [(1, 1), (0, 1)],
    [(3, 2), (1, 4)],
  ]
  pool = gsm_optax.group_pool(SPECS)(halves(0))
  assert pool == {
    "a": {"kernel": True, "bias": False},
    "b": {"kernel": True, "bias": False},
    "c": {"kernel": True},
    "d": {"kernel": True},
    "e": {"kernel": False},
  }


@pytest.mark.parametrize("channel_score", ["sum", "mean"])
@pytest.mark.parametrize(
  "use_jit,compression",
  [(False, 1.0), (False, 2.0), (False, 7.5), (True, 3.0)],  # jit compiles anew each time
  ids=["nojit-1", "nojit-2", "nojit-7.5", "jit-3"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_keeps_the_gradient_of_the_global_top_q_channels(
  seed, use_jit, compression, channel_score
):
  params, grads = halves(seed), halves(seed + 100)
  tx = gsm_optax.mask_by_global_group_taylor(compression, SPECS, channel_score=channel_score)
  state = tx.init(params)
  masked, state = maybe_jit(tx.update, use_jit)(grads, state, params)
  expected, num_active = ref_gsm_mask(grads, params, SPECS, compression, channel_score)
  assert_trees_equal(masked, jax.tree.map(lambda g, b: np.where(b, g, 0), grads, expected))
  stats = gsm_optax.channel_stats(state)
  assert int(stats["keep"]) == int(CHANNELS / compression)
  assert int(stats["num_active"]) == num_active >= int(stats["keep"])


def test_tied_channels_are_all_active_and_the_cut_takes_the_earlier_ones():
  ones = jax.tree.map(np.ones_like, halves(0))
  params = {k: dict(v) for k, v in ones.items()}
  # Every "mlp" channel scores 3 + 4 = 7, every "conv" channel 12 + 16 = 28.
  tx = gsm_optax.mask_by_global_group_taylor(2.0, SPECS)  # Q = 4: both conv + 2 of 6 tied
  masked, state = tx.update(ones, tx.init(params), params)
  assert int(state.num_active) == CHANNELS and float(state.threshold) == 7.0
  assert_trees_equal(masked, ones)
  mask = gsm_optax.channel_group_mask(params, 2.0, SPECS)
  np.testing.assert_array_equal(mask["a"]["kernel"][0], [True, True, False, False, False, False])
  np.testing.assert_array_equal(mask["b"]["kernel"][:, 0], mask["a"]["kernel"][0])
  assert mask["c"]["kernel"].all() and mask["d"]["kernel"].all() and mask["e"]["kernel"].all()


@pytest.mark.parametrize("compression", [1.0, 1.5, 4.0])
def test_zero_scores_are_passive_unless_c_is_1_and_nan_never_active(compression):
  params, grads = halves(3, zeros=False), halves(4, zeros=False)
  grads["a"]["kernel"][:, 0] = 0.0
  grads["b"]["kernel"][0] = 0.0  # mlp channel 0 scores 0
  grads["a"]["kernel"][0, 1] = np.nan  # mlp channel 1 scores NaN
  tx = gsm_optax.mask_by_global_group_taylor(compression, SPECS)
  masked, state = tx.update(grads, tx.init(params), params)
  expected, num_active = ref_gsm_mask(grads, params, SPECS, compression)
  assert not expected["b"]["kernel"][1].any()  # NaN: never active, even at C = 1
  assert expected["b"]["kernel"][0].all() == (compression == 1.0)  # 0: active at C = 1 only
  assert int(state.num_active) == num_active
  np.testing.assert_array_equal(
    masked["b"]["kernel"], np.where(expected["b"]["kernel"], grads["b"]["kernel"], 0)
  )


@pytest.mark.parametrize("use_jit", [False, True], ids=["nojit", "jit"])
def test_gsm_channel_groups_is_momentum_sgd_with_the_group_mask(use_jit):
  """z <- beta z + eta w [member] + B g;  w <- w - alpha z; leaves in no group: no decay."""
  params = halves(5, zeros=False)
  opt = gsm_optax.gsm_channel_groups(LR, 2.0, SPECS, momentum=BETA, weight_decay=ETA)
  state = opt.init(params)
  update = maybe_jit(opt.update, use_jit)
  ref_w = jax.tree.map(np.float64, params)
  ref_z = jax.tree.map(np.zeros_like, ref_w)
  pool = gsm_optax.group_pool(SPECS)(params)
  for step in range(3):
    grads = halves(10 + step)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    mask, _ = ref_gsm_mask(grads, ref_w, SPECS, 2.0)
    ref_z = jax.tree.map(
      lambda z, w, g, b, m: BETA * z + (ETA * w if m else 0.0) + np.where(b, g, 0.0),
      ref_z,
      ref_w,
      jax.tree.map(np.float64, grads),
      mask,
      pool,
    )
    ref_w = jax.tree.map(lambda w, z: w - LR * z, ref_w, ref_z)
    assert_trees_equal(params, jax.tree.map(np.float32, ref_w))
  assert int(gsm_optax.channel_stats(state)["step"]) == 3


def test_one_group_per_leaf_is_the_per_leaf_channel_rule(params_factory, rng):
  """Groups of one leaf, width 1, axis -1: the masks of the per-leaf channel code, bit for bit."""
  params = params_factory(rng)
  grads = params_factory(rng)
  specs = jax.tree_util.tree_map_with_path(
    lambda path, x: ChannelSlice(jax.tree_util.keystr(path)) if x.ndim >= 2 else None, params
  )
  for how in ("sum", "mean"):
    group_tx = gsm_optax.mask_by_global_group_taylor(2.5, specs, channel_score=how)
    leaf_tx = gsm_optax.mask_by_global_channel_taylor(2.5, channel_score=how)
    by_group, group_state = group_tx.update(grads, group_tx.init(params), params)
    by_leaf, leaf_state = leaf_tx.update(grads, leaf_tx.init(params), params)
    assert_trees_equal(by_group, by_leaf)
    assert_trees_equal(group_state, leaf_state)
    assert_trees_equal(
      gsm_optax.channel_group_mask(params, 2.5, specs, channel_score=how),
      gsm_optax.global_channel_mask(params, 2.5, channel_score=how),
    )


@pytest.mark.parametrize("channel_score", ["sum", "mean"])
@pytest.mark.parametrize("compression", [1.0, 2.5, 8.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cut_keeps_exactly_q_channels_ties_to_the_earlier(seed, compression, channel_score):
  params = halves(seed)
  cut = jax.jit(
    lambda p: gsm_optax.channel_group_mask(p, compression, SPECS, channel_score=channel_score)
  )
  mask = cut(params)
  assert_trees_equal(mask, ref_cut(params, SPECS, compression, channel_score))
  pruned = gsm_optax.prune_channel_groups(params, compression, SPECS, channel_score=channel_score)
  report = gsm_optax.channel_group_report(pruned, SPECS)
  assert report.total_channels == CHANNELS
  keep = int(CHANNELS / compression)
  assert report.total_channels_kept <= keep  # a kept channel may be all zero already
  assert [r.group for r in report.rows] == ["mlp", "conv"]
  assert report.rows[0].paths == ("a/kernel", "b/kernel")
  assert report.total_size == 18 + 24 + 48 + 32
  assert report.total_nonzeros == sum(int(np.count_nonzero(pruned[k]["kernel"])) for k in "abcd")


def test_report_counts_a_channel_alive_in_any_member_slice():
  params = jax.tree.map(np.zeros_like, halves(0))
  params["b"]["kernel"][2, 1] = 1.0  # mlp channel 2, in b only
  params["d"]["kernel"][0, 7] = -1.0  # conv channel 1 (columns 4..7 of d)
  params["e"]["kernel"][:] = 1.0  # in no group
  report = gsm_optax.channel_group_report(params, SPECS)
  assert report.kept_per_group == {"mlp": 1, "conv": 1}
  assert (report.total_channels_kept, report.total_nonzeros) == (2, 2)
  assert report.channel_compression == CHANNELS / 2
  text = str(report)
  assert "mlp" in text and "channel compression 4.00x (8 / 2)" in text


def test_bad_groups_raise_one_clear_error():
  params = halves(0)
  cases = [
    ({**SPECS, "d": {"kernel": ChannelSlice("conv", 1, 2)}}, r"different numbers of channels"),
    ({**SPECS, "d": {"kernel": ChannelSlice("conv", 1, 3)}}, r"width=3 .* dividing the size 8"),
    ({**SPECS, "d": {"kernel": ChannelSlice("conv", 2)}}, r"axis=2 does not exist in d/kernel"),
    ({**SPECS, "e": None}, r"groups must be a pytree with the structure of params"),
    (jax.tree.map(lambda _: None, params), r"the channel groups take no leaf"),
  ]
  for specs, message in cases:
    with pytest.raises(ValueError, match=message):
      gsm_optax.resolve_groups(params, specs)
  with pytest.raises(ValueError, match=r"use 1 <= compression <= 8 \(C counts channels\)"):
    gsm_optax.mask_by_global_group_taylor(9.0, SPECS).init(params)
  with pytest.raises(ValueError, match=r"use 1 <= compression <= 8"):
    gsm_optax.prune_channel_groups(params, 9.0, SPECS)
  with pytest.raises(ValueError, match=r"channel_score="):
    gsm_optax.gsm_channel_groups(0.1, 2.0, SPECS, channel_score="max")
  with pytest.raises(ValueError, match=r"needs params"):
    tx = gsm_optax.mask_by_global_group_taylor(2.0, SPECS)
    tx.update(params, tx.init(params))


def test_groups_may_be_a_callable_and_masked_nodes_mark_leaves_out():
  params = halves(0)
  specs = jax.tree.map(
    lambda s: optax.MaskedNode() if s is None else s,
    SPECS,
    is_leaf=lambda x: x is None or isinstance(x, ChannelSlice),
  )
  a = gsm_optax.channel_group_mask(params, 2.0, SPECS)
  assert_trees_equal(gsm_optax.channel_group_mask(params, 2.0, specs), a)
  assert_trees_equal(gsm_optax.channel_group_mask(params, 2.0, lambda p: SPECS), a)


# ----------------------------------------------------------------------------
# Transformers: the groups of a GPT / ViT, and the narrow models.


def random_transformer(name: str, seed: int) -> nnx.Module:
  """A tiny GPT (context 16) or ViT with random kernels and non-zero biases (std 0.5)."""
  if name == "gpt":
    build = lambda: GPT(rngs=nnx.Rngs(0), size="tiny", context=16)  # noqa: E731
  else:
    build = lambda: ViT(rngs=nnx.Rngs(0), size="tiny")  # noqa: E731
  return bench_export.random_model(build, seed, bias_scale=0.5)


def model_input(name: str) -> jax.Array:
  if name == "gpt":
    return jax.random.randint(jax.random.key(0), (3, 16), 0, 256)
  return jax.random.normal(jax.random.key(0), (3, 28, 28, 1))


def input_spec(name: str) -> tuple[tuple[int, ...], jnp.dtype]:
  return ((16,), jnp.int32) if name == "gpt" else ((28, 28, 1), jnp.float32)


@nnx.jit
def logits(model: nnx.Module, x: jax.Array) -> jax.Array:
  return model(x)


def group_params(model: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def set_params(model: nnx.Module, params: dict) -> None:
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def test_transformer_groups_are_each_block_s_neurons_and_heads():
  model = random_transformer("gpt", 0)
  params = group_params(model)
  neurons = gsm_optax.resolve_groups(params, channel_groups("neurons"))
  assert neurons.names == ("blocks/0/mlp", "blocks/1/mlp") and neurons.channels == (512, 512)
  assert neurons.paths[:2] == ("blocks/0/mlp/fc1/kernel", "blocks/0/mlp/fc2/kernel")
  assert [(m.axis, m.width) for m in neurons.members[0]] == [(1, 1), (0, 1)]
  heads = gsm_optax.resolve_groups(params, channel_groups("heads", model.blocks[0].attn.head_dim))
  assert heads.names == ("blocks/0/attn", "blocks/1/attn") and heads.channels == (4, 4)
  assert [p.rsplit("/", 2)[1] for p in heads.paths[:4]] == ["key", "out", "query", "value"]
  assert {(m.axis, m.width) for m in heads.members[0]} == {(1, 32), (0, 32)}
  # An nnx.State names its leaves as the pure dicts do.
  state_layout = gsm_optax.resolve_groups(nnx.state(model, nnx.Param), channel_groups("neurons"))
  assert state_layout.paths == neurons.paths
  with pytest.raises(ValueError, match=r"unknown channel group kind 'rows'"):
    channel_groups("rows")
  with pytest.raises(ValueError, match=r"need the head_dim"):
    channel_groups("heads")


@pytest.mark.parametrize("kind", ["neurons", "heads"])
@pytest.mark.parametrize("name", ["gpt", "vit"])
def test_narrow_transformer_equals_the_masked_model(name, kind):
  model = random_transformer(name, 1)
  groups = channel_groups(kind, model.blocks[0].attn.head_dim)
  pruned = gsm_optax.prune_channel_groups(group_params(model), 2.0, groups)
  set_params(model, pruned)
  kept = gsm_optax.channel_group_report(pruned, groups).kept_per_group
  small = narrow(model)
  widths = [
    b.mlp.fc1.kernel.shape[1] if kind == "neurons" else b.attn.num_heads for b in small.blocks
  ]
  half = {("gpt", "neurons"): 512, ("vit", "neurons"): 128}.get((name, kind), 4)
  assert widths == list(kept.values()) and sum(widths) == half
  x = model_input(name)
  np.testing.assert_allclose(logits(small, x), logits(model, x), rtol=1e-5, atol=1e-5)
  shape, dtype = input_spec(name)
  assert count_macs(small, shape, dtype) < count_macs(model, shape, dtype)
  assert count_params(small) < count_params(model)


def zero_neurons(model, block: int, neurons, fc1: bool = True, fc2: bool = True) -> None:
  mlp = model.blocks[block].mlp
  for layer, on, axis in ((mlp.fc1, fc1, 1), (mlp.fc2, fc2, 0)):
    if on:
      index = (slice(None), neurons) if axis == 1 else (neurons,)
      layer.kernel.set_value(layer.kernel.get_value().at[index].set(0.0))


def zero_heads(model, block: int, heads, qkv=("query", "key", "value"), out: bool = True) -> None:
  attn = model.blocks[block].attn
  cols = np.concatenate([np.arange(h * attn.head_dim, (h + 1) * attn.head_dim) for h in heads])
  for name in qkv:
    kernel = getattr(attn, name).kernel
    kernel.set_value(kernel.get_value().at[:, cols].set(0.0))
  if out:
    attn.out.kernel.set_value(attn.out.kernel.get_value().at[cols].set(0.0))


@pytest.mark.parametrize("name", ["gpt", "vit"])
def test_narrow_blocks_of_different_widths_and_an_emptied_block(name):
  model = random_transformer(name, 2)
  hidden = model.blocks[0].mlp.fc1.kernel.shape[1]
  # Block 0: heads 0 and 2 cut, a third of the neurons; block 1: nothing left.
  zero_heads(model, 0, [0, 2])
  zero_neurons(model, 0, np.arange(0, hidden, 3))
  zero_heads(model, 1, range(4))
  zero_neurons(model, 1, np.arange(hidden))
  small = narrow(model)
  assert [b.attn.num_heads for b in small.blocks] == [2, 0]
  assert [b.mlp.fc1.kernel.shape[1] for b in small.blocks] == [hidden - len(range(0, hidden, 3)), 0]
  assert small.blocks[1].attn.query.kernel.shape == (model.blocks[0].ln1.scale.shape[0], 0)
  x = model_input(name)
  np.testing.assert_allclose(logits(small, x), logits(model, x), rtol=1e-5, atol=1e-5)
  shape, dtype = input_spec(name)
  assert count_macs(small, shape, dtype) < count_macs(model, shape, dtype) // 2


@pytest.mark.parametrize("name", ["gpt", "vit"])
def test_narrow_folds_constant_neurons_and_heads_into_the_output_bias(name):
  """fc1 column zero (fc2 row not): GELU(b1) fc2 row; value columns zero (out rows not): b_v out."""
  model = random_transformer(name, 3)
  zero_neurons(model, 0, [1, 5, 9], fc2=False)
  zero_neurons(model, 1, [0], fc1=False)  # fc2 row zero: adds nothing
  zero_heads(model, 0, [3], qkv=("value",), out=False)
  zero_heads(model, 1, [1], qkv=("query", "key"), out=False)  # still a head: not removed
  small = narrow(model)
  hidden = model.blocks[0].mlp.fc1.kernel.shape[1]
  assert [b.mlp.fc1.kernel.shape[1] for b in small.blocks] == [hidden - 3, hidden - 1]
  assert [b.attn.num_heads for b in small.blocks] == [3, 4]
  x = model_input(name)
  np.testing.assert_allclose(logits(small, x), logits(model, x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# train.py: config.channels.groups.


GPT_NANO = (("size", "nano"), ("context", 16))


def test_channel_group_configs_are_refused_before_training():
  config = default_config.get_config()
  config.method, config.channels.groups = "gsm_channels", "rows"
  with pytest.raises(config_lib.ConfigError, match=r"config.channels.groups must be '' "):
    train_lib.validate_config(config)
  config.channels.groups = "neurons"  # the default model is LeNet-300-100
  with pytest.raises(
    config_lib.ConfigError, match=r"prunes the neurons of transformer blocks: use model gpt"
  ):
    train_lib.validate_config(config)
  config.model, config.model_size = "vit", "nano"
  train_lib.validate_config(config)
  config.channels.layers = "blocks"
  with pytest.raises(config_lib.ConfigError, match=r"config.channels.layers='blocks' selects"):
    train_lib.validate_config(config)
  config.channels.layers = ""
  params = steps.abstract_params("vit", 10, (("size", "nano"),))
  config.compression = 64.0  # 64 neurons: Q = 1
  stages.check_params(config, params)
  config.compression = 65.0
  with pytest.raises(
    config_lib.ConfigError,
    match=r"config.compression=65, config.channels.groups='neurons': .* Q = int\(64 / 65.0\) = 0",
  ):
    stages.check_params(config, params)
  config.channels.groups, config.compression = "heads", 2.0  # 2 heads: Q = 1
  stages.check_params(config, params)
  config.compression = 3.0
  with pytest.raises(config_lib.ConfigError, match=r"use 1 <= compression <= 2 \(C counts"):
    stages.check_params(config, params)
  config.compression, config.pool.include = 2.0, (r"attn/(query|key|value)/kernel$",)
  with pytest.raises(config_lib.ConfigError, match=r"config.pool leaves out blocks/0/attn/out"):
    stages.check_params(config, params)
  stored = config_lib.config_json(config)  # a workdir from before the groups
  del stored["channels"]["groups"]
  config.channels.groups = ""
  assert config_lib.config_differences(stored, config) == []


def _summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def test_gsm_channels_over_gpt_neurons_with_adamw_keeps_exactly_q(corpus, tmp_path):  # noqa: F811
  """GPT nano (one block, MLP 64): C = 2 keeps 32 neurons, each both its fc1 column and fc2 row."""
  config = lm_config(corpus, method="gsm_channels", gsm__passive_rule="decay")
  config.channels.groups = "neurons"
  config.compression, config.skip_dense, config.gsm.epochs = 2.0, True, 1
  workdir = str(tmp_path / "neurons")
  train_lib.train_and_evaluate(config, workdir)
  results = _summary(workdir)["method_results"]
  assert results["channel_groups"] == "neurons"
  assert (results["channels_total"], results["channels_kept"]) == (64, 32)
  assert results["channels_kept_per_group"] == {"blocks/0/mlp": 32}
  assert results["groups_without_channels"] == []
  d, t = 32, 16  # d_model, context: the MLP's MACs per sequence fall by 2 * d * 32 per token
  assert results["macs_dense"] - results["macs_narrow"] == t * 2 * d * 32
  params = checkpoints.load_model(os.path.join(workdir, "final_model"))["params"]
  mlp = params["blocks"]["0"]["mlp"] if "0" in params["blocks"] else params["blocks"][0]["mlp"]
  live_in = np.any(np.asarray(mlp["fc1"]["kernel"]) != 0, axis=0)
  live_out = np.any(np.asarray(mlp["fc2"]["kernel"]) != 0, axis=1)
  assert live_in.sum() == 32 and np.array_equal(live_in, live_out)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    row = [json.loads(line) for line in f][-1]
  assert row["keep_channels"] == 32 and row["active_channels"] >= 32


@pytest.mark.parametrize(
  "method",
  [
    "filter_l1",
    pytest.param("gsm_channels", marks=pytest.mark.slow),
  ],
)
def test_vit_heads_with_sgd_keep_exactly_half_the_heads(data_dir, tmp_path, method):  # noqa: F811
  """ViT tiny (two blocks of 4 heads): C = 2 keeps 4 of the 8 heads over both blocks."""
  config = tiny_config(data_dir)
  config.model, config.model_size, config.method = "vit", "tiny", method
  config.channels.groups = "heads"
  config.compression, config.skip_dense, config.plots = 2.0, True, False
  config.gsm.epochs, config.gsm.boundaries = 1, ()
  config.finetune.epochs, config.finetune.boundaries = 1, ()
  workdir = str(tmp_path / method)
  train_lib.train_and_evaluate(config, workdir)
  results = _summary(workdir)["method_results"]
  assert (results["channels_total"], results["channels_kept"]) == (8, 4)
  kept = results["channels_kept_per_group"]
  assert set(kept) == {"blocks/0/attn", "blocks/1/attn"} and sum(kept.values()) == 4
  assert results["groups_without_channels"] == [g for g, k in kept.items() if k == 0]
  assert results["macs_narrow"] < results["macs_dense"]
  params = checkpoints.load_model(os.path.join(workdir, "final_model"))["params"]
  for i, block in enumerate(params["blocks"].values()):
    out_rows = np.any(np.asarray(block["attn"]["out"]["kernel"]) != 0, axis=1).reshape(4, 16)
    assert out_rows.all(axis=1).sum() == kept[f"blocks/{i}/attn"]


def test_bench_export_gpt_rows_cut_half_the_neurons_and_half_the_heads():
  neurons, heads = (bench_export.gpt_masked(kind) for kind in bench_export.GPT_KINDS)
  widths = [bench_export.gpt_widths(narrow(m)) for m in (neurons, heads)]
  assert [h for h, _ in widths[0]] == [4, 4] and sum(n for _, n in widths[0]) == 512
  assert [n for _, n in widths[1]] == [512, 512] and sum(h for h, _ in widths[1]) == 4
