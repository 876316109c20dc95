"""Pruned models that are really smaller: narrow LeNet-5 and GPT, BCOO LeNet-300-100, N:M storage.

On random-init weights cut with the library's final cuts (no training; the
sizes and speeds do not depend on the values):

  * LeNet-5, `gsm_optax.prune_channels` at C = 2 on conv1, conv2 and fc1 (one cut
    per layer: half of each layer's channels): parameters, MACs and jitted CPU
    inference latency of the masked model vs `models.narrow.narrow_lenet5`;
  * LeNet-5 as the structured experiment's conv2-only results (issue 14): conv2
    keeps its first 21 or 7 of 50 output channels (2.02x, 4.00x fewer MACs), conv1
    and fc1 full; the same measures and bytes of an `np.savez` of the params;
  * CIFAR ResNet-56 in eval mode, the inner conv (conv1) of every basic block keeping
    its first half of output channels: the same measures, masked vs
    `models.narrow.narrow_resnet` (few repeats: `--resnet_repeats`);
  * LeNet-300-100, `gsm_optax.prune` at densities 1/60, 1/10, 1/2: jitted forward
    with BCOO kernels (`gsm_optax.to_bcoo`) vs dense masked kernels, and bytes on
    disk of `gsm_optax.save_sparse` vs `np.savez` of the dense params;
  * LeNet-300-100 kernels at 2:4 (`gsm_optax.prune_nm`): `nm_compress` bytes vs dense;
  * the tiny GPT (2 blocks, d 128, 4 heads, MLP 512, context 128), cut with
    `gsm_optax.prune_channel_groups` at C = 2 over its MLP neurons, and at C = 2 over its
    attention heads (one ranking over both blocks): parameters, MACs per token, bytes and
    CPU latency per token (forwards of GPT_BATCHES sequences of the full context), masked vs
    `models.narrow.narrow_transformer`, their logits checked equal.

Latency: median over interleaved samples of CHAIN forwards dispatched back to
back (bench_update.time_interleaved). Writes benchmarks/results/bench_export.{json,md};
``--only gpt`` runs the GPT rows alone and writes bench_export_gpt.{json,md} (a quick check:
``--only gpt --repeats 2 --out /tmp/bench``).

  python benchmarks/bench_export.py [--repeats 15] [--resnet_repeats 3] [--only all|gpt]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
from typing import Any
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bench_update  # noqa: E402
from benchmarks import machine  # noqa: E402
import gsm_optax  # noqa: E402
from gsm_optax import export  # noqa: E402
from models import count_params  # noqa: E402
from models.gpt import GPT  # noqa: E402
from models.lenet import LeNet5  # noqa: E402
from models.narrow import count_macs  # noqa: E402
from models.narrow import narrow_lenet5  # noqa: E402
from models.narrow import narrow_resnet  # noqa: E402
from models.narrow import narrow_transformer  # noqa: E402
from models.resnet_cifar import ResNet56  # noqa: E402
from models.transformer import channel_groups  # noqa: E402

CHAIN = 10
BATCHES = (1, 256)
CONV2_KEEP = (21, 7)  # of conv2's 50 output channels
LENET5_INPUT = (28, 28, 1)
RESNET_INPUT = (32, 32, 3)
GPT_BATCHES = (1, 8)  # sequences of the tiny GPT's full context (128 tokens) per forward
GPT_KINDS = ("neurons", "heads")  # each cut to C = 2: half the MLP neurons, half the heads
EQUAL_ATOL = 1e-4  # the narrow GPT's logits must equal the masked one's to this


def random_model(build, seed: int, bias_scale: float = 0.1) -> nnx.Module:
  """`build()`'s module with NumPy-drawn kernels, non-zero biases (and other params; std
  `bias_scale`) and BatchNorm statistics, so that cut channels output constants."""
  rng = np.random.default_rng(seed)
  model = nnx.eval_shape(build)
  for path, variable in nnx.iter_graph(model):
    if not isinstance(variable, (nnx.Param, nnx.BatchStat)):
      continue
    shape = variable.get_value().shape
    if path[-1] == "var":
      value = rng.uniform(0.5, 2.0, shape)
    else:
      scale = 1 / np.sqrt(np.prod(shape[:-1])) if path[-1] == "kernel" else bias_scale
      value = scale * rng.standard_normal(shape)
    variable.set_value(jnp.asarray(value, jnp.float32))
  return model


def channel_prune(model: nnx.Module, compression: float, layers: list[str]) -> None:
  """`gsm_optax.prune_channels` of the kernel of each layer (a key path such as
  "['conv1']" or "['blocks'][0]['conv1']"), one cut per layer (a global cut by sum |w|
  favours the layers of greatest fan-in)."""
  params = nnx.state(model, nnx.Param)
  for layer in layers:

    def pool(tree, layer=layer):
      paths = jax.tree_util.tree_flatten_with_path(tree)[0]
      flags = [jax.tree_util.keystr(p).startswith(layer + "['kernel']") for p, _ in paths]
      return jax.tree.unflatten(jax.tree.structure(tree), flags)

    params = gsm_optax.prune_channels(params, compression, pool=pool)
  nnx.update(model, params)


def forward_step(model: nnx.Module, x: jax.Array):
  """A `step(state, i)` for time_interleaved: one jitted forward of `model` on `x`."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return lambda _, i: forward(state, x)


def times(steps: dict[str, Any], repeats: int) -> dict[str, float]:
  ms, _ = bench_update.time_interleaved(
    steps, {k: None for k in steps}, {k: repeats for k in steps}, chain=CHAIN
  )
  return ms


def lenet5_widths(narrow: LeNet5) -> list[int]:
  """Output widths of a LeNet-5's conv1, conv2 and fc1."""
  return [layer.kernel.shape[-1] for layer in (narrow.conv1, narrow.conv2, narrow.fc1)]


def compare_narrow(
  masked: nnx.Module,
  repeats: int,
  narrow_fn: Callable[[Any], nnx.Module] = narrow_lenet5,
  widths: Callable[[Any], list[int]] = lenet5_widths,
  input_shape: tuple[int, ...] = LENET5_INPUT,
) -> dict[str, Any]:
  """Sizes, MACs, savez bytes, latencies and max |diff| of the logits of `masked` vs
  `narrow_fn(masked)` (LeNet-5 by default); `widths` of the narrow model recorded."""
  narrow = narrow_fn(masked)
  models = dict(masked=masked, narrow=narrow)
  out: dict[str, Any] = dict(
    widths=widths(narrow),
    params={k: count_params(m) for k, m in models.items()},
    macs={k: count_macs(m, input_shape) for k, m in models.items()},
    bytes={k: model_bytes(m) for k, m in models.items()},
    latency_ms={},
  )
  x_all = np.random.default_rng(1).standard_normal((max(BATCHES), *input_shape))
  for batch in BATCHES:
    x = jnp.asarray(x_all[:batch], jnp.float32)
    steps = {k: forward_step(m, x) for k, m in models.items()}
    diff = jnp.max(jnp.abs(steps["narrow"](None, 0) - steps["masked"](None, 0)))
    out["latency_ms"][str(batch)] = times(steps, repeats)
    out[f"max_abs_diff_batch_{batch}"] = float(diff)
  return out


def bench_lenet5(repeats: int) -> dict[str, Any]:
  """Half of the channels of conv1, conv2 and fc1 cut, masked vs narrow."""
  masked = random_model(lambda: LeNet5(rngs=nnx.Rngs(0)), 0)
  channel_prune(masked, 2.0, ["['conv1']", "['conv2']", "['fc1']"])
  return compare_narrow(masked, repeats)


def conv2_masked(keep: int, seed: int = 0) -> LeNet5:
  """A random LeNet-5 whose conv2 kernel is zero but for its first `keep` output channels."""
  model = random_model(lambda: LeNet5(rngs=nnx.Rngs(0)), seed)
  kernel = model.conv2.kernel
  kernel.set_value(kernel.get_value().at[..., keep:].set(0.0))
  return model


def bench_lenet5_conv2(repeats: int) -> list[dict[str, Any]]:
  """The conv2-only channel-pruned LeNet-5s (CONV2_KEEP), masked vs narrow."""
  return [dict(keep=k, **compare_narrow(conv2_masked(k), repeats)) for k in CONV2_KEEP]


def resnet56_masked(seed: int = 4) -> ResNet56:
  """A random ResNet-56 in eval mode whose blocks' conv1 kernels are zero but for
  their first half of output channels (what `narrow_resnet` removes)."""
  model = random_model(lambda: ResNet56(rngs=nnx.Rngs(0)), seed)
  for block in model.blocks:
    kernel = block.conv1.kernel
    value = kernel.get_value()
    kernel.set_value(value.at[..., value.shape[-1] // 2 :].set(0.0))
  model.eval()
  return model


def resnet_widths(narrow: nnx.Module) -> list[int]:
  """Inner (conv1) width of every basic block."""
  return [block.conv1.kernel.shape[-1] for block in narrow.blocks]


def bench_resnet56(repeats: int) -> dict[str, Any]:
  """ResNet-56, half of every block's inner channels cut, masked vs `narrow_resnet`."""
  return compare_narrow(resnet56_masked(), repeats, narrow_resnet, resnet_widths, RESNET_INPUT)


def gpt_masked(kind: str, seed: int = 6) -> GPT:
  """A random tiny GPT cut by `gsm_optax.prune_channel_groups` at C = 2 over its `kind`
  ("neurons" or "heads"), one ranking over both blocks (their widths may differ)."""
  model = random_model(lambda: GPT(rngs=nnx.Rngs(0), size="tiny"), seed)
  groups = channel_groups(kind, model.blocks[0].attn.head_dim)
  state = nnx.state(model, nnx.Param)
  pruned = gsm_optax.prune_channel_groups(nnx.to_pure_dict(state), 2.0, groups)
  nnx.replace_by_pure_dict(state, pruned)
  nnx.update(model, state)
  return model


def gpt_widths(model: GPT) -> list[list[int]]:
  """[heads, MLP hidden neurons] of every block."""
  return [[block.attn.num_heads, block.mlp.fc1.kernel.shape[1]] for block in model.blocks]


def bench_gpt(kind: str, repeats: int) -> dict[str, Any]:
  """The tiny GPT at half its `kind`: masked vs `narrow_transformer`, per token."""
  masked = gpt_masked(kind)
  narrow = narrow_transformer(masked)
  models = dict(masked=masked, narrow=narrow)
  context = masked.context
  macs = {k: count_macs(m, (context,), jnp.int32) for k, m in models.items()}
  out: dict[str, Any] = dict(
    kind=kind,
    context=context,
    widths=gpt_widths(narrow),
    params={k: count_params(m) for k, m in models.items()},
    macs_per_token={k: v / context for k, v in macs.items()},
    bytes={k: model_bytes(m) for k, m in models.items()},
    latency_ms={},
    latency_us_per_token={},
  )
  tokens = np.random.default_rng(7).integers(0, 256, (max(GPT_BATCHES), context))
  for batch in GPT_BATCHES:
    x = jnp.asarray(tokens[:batch], jnp.int32)
    steps = {k: forward_step(m, x) for k, m in models.items()}
    diff = float(jnp.max(jnp.abs(steps["narrow"](None, 0) - steps["masked"](None, 0))))
    if not diff <= EQUAL_ATOL:
      raise AssertionError(f"the narrow GPT ({kind}) differs from the masked one by {diff:g}")
    ms = times(steps, repeats)
    out["latency_ms"][str(batch)] = ms
    out["latency_us_per_token"][str(batch)] = {
      k: 1e3 * v / (batch * context) for k, v in ms.items()
    }
    out[f"max_abs_diff_batch_{batch}"] = diff
  return out


def gpt_markdown(results: dict[str, Any]) -> list[str]:
  """The tiny GPT's caption and table: masked | narrow | ratio per kind."""
  rows = results["gpt_tiny"]

  def row(label: str, get, fmt: str) -> str:
    cells = []
    for r in rows:
      masked, narrow = get(r)["masked"], get(r)["narrow"]
      cells += [format(masked, fmt), format(narrow, fmt), f"{narrow / masked:.2f}"]
    return f"| {label} | " + " | ".join(cells) + " |"

  widths = "; ".join(
    f"{r['kind']}: [heads, MLP] per block {r['widths']}, max |diff| of the logits "
    f"{max(r[f'max_abs_diff_batch_{b}'] for b in GPT_BATCHES):.1e}"
    for r in rows
  )
  lines = [
    "Tiny GPT (2 blocks, d 128, 4 heads, MLP 512, context 128; random weights), "
    "`prune_channel_groups` at C = 2 over the MLP neurons, and at C = 2 over the attention "
    f"heads (one ranking over both blocks); narrow = `narrow_transformer` ({widths}); MACs and "
    "latency per token of forwards of whole 128-token sequences; savez bytes = `np.savez` "
    f"of the params; latency: median of {results['repeats']} interleaved samples of {CHAIN} "
    "jitted forwards",
    "",
    "| | "
    + " | ".join(f"masked {r['kind']} | narrow {r['kind']} | narrow / masked" for r in rows)
    + " |",
    "|---|" + "---:|---:|---:|" * len(rows),
    row("parameters", lambda r: r["params"], ","),
    row("MACs per token", lambda r: r["macs_per_token"], ",.0f"),
    row("savez bytes", lambda r: r["bytes"], ","),
  ]
  for batch in GPT_BATCHES:
    lines.append(
      row(
        f"latency per token, batch {batch} x 128 (us)",
        lambda r, b=str(batch): r["latency_us_per_token"][b],
        ".2f",
      )
    )
  return lines


def gpt_verdict(results: dict[str, Any]) -> str:
  """The tiny GPT's MAC and time ratios in words."""
  return " ".join(
    f"GPT, half the {r['kind']}: {r['macs_per_token']['narrow'] / r['macs_per_token']['masked']:.2f}x "
    "the MACs, "
    + ", ".join(
      f"{ms['narrow'] / ms['masked']:.2f}x the time at batch {b}"
      for b, ms in r["latency_ms"].items()
    )
    + "."
    for r in results["gpt_tiny"]
  )


def lenet300_params(seed: int = 2) -> dict:
  """LeNet-300-100-shaped kernels (scaled by 1/sqrt(fan-in)) and non-zero biases, NumPy float32."""
  rng = np.random.default_rng(seed)
  shapes = [(784, 300), (300, 100), (100, 10)]
  return {
    f"fc{i + 1}": {
      "kernel": (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32),
      "bias": (0.1 * rng.standard_normal(s[1:])).astype(np.float32),
    }
    for i, s in enumerate(shapes)
  }


def mlp(params: dict, x: jax.Array) -> jax.Array:
  for name in ("fc1", "fc2"):
    x = jax.nn.relu(export.sparse_dense(x, params[name]["kernel"], params[name]["bias"]))
  return export.sparse_dense(x, params["fc3"]["kernel"], params["fc3"]["bias"])


def npz_bytes(arrays: dict[str, np.ndarray]) -> int:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getbuffer().nbytes


def model_bytes(model: nnx.Module) -> int:
  """Bytes of an `np.savez` of the model's variables (parameters, BatchNorm statistics,
  folded constants; no RNG state), keyed by their "/"-joined paths."""
  state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState)))
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return npz_bytes(
    {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in leaves}
  )


def bench_lenet300(compression: float, repeats: int) -> dict[str, Any]:
  dense = jax.tree.map(np.asarray, gsm_optax.prune(lenet300_params(), compression))
  sparse = export.to_bcoo(dense)
  forward = jax.jit(mlp)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "p.npz")
    export.save_sparse(path, dense)
    sparse_bytes = os.path.getsize(path)
  out: dict[str, Any] = dict(
    compression=compression,
    nonzeros=int(sum(np.count_nonzero(dense[k]["kernel"]) for k in dense)),
    bytes=dict(
      save_sparse=sparse_bytes,
      savez_dense=npz_bytes({"/".join(k): v for k, v in _flat(dense)}),
    ),
    latency_ms={},
  )
  x_all = jnp.asarray(np.random.default_rng(3).standard_normal((256, 784)), jnp.float32)
  for batch in BATCHES:
    x = x_all[:batch]
    ms = times(
      {
        "dense": lambda _, i, x=x: forward(dense, x),
        "bcoo": lambda _, i, x=x: forward(sparse, x),
      },
      repeats,
    )
    out["latency_ms"][str(batch)] = ms
  return out


def _flat(tree: dict) -> list[tuple[tuple[str, str], np.ndarray]]:
  return [((a, b), v) for a, sub in tree.items() for b, v in sub.items()]


def bench_nm() -> dict[str, Any]:
  params = lenet300_params()
  kernels = {k: params[k]["kernel"] for k in params}
  pruned = jax.tree.map(np.asarray, gsm_optax.prune_nm(kernels, 2, 4))
  stored = 0
  for kernel in pruned.values():
    values, indices = export.nm_compress(kernel, 2, 4)
    stored += values.nbytes + indices.nbytes
  return dict(
    dense_bytes=sum(k.nbytes for k in pruned.values()),
    nm_bytes=stored,
    nm_bytes_packed=sum(
      export.nm_storage_bytes(k.shape, k.dtype, 2, 4, packed=True) for k in pruned.values()
    ),
  )


def comparison_rows(comparisons: list[dict[str, Any]]) -> list[str]:
  """Table rows of masked | narrow | narrow / masked, one column triple per comparison."""

  def row(label: str, get, fmt: str) -> str:
    cells = []
    for c in comparisons:
      masked, narrow = get(c)["masked"], get(c)["narrow"]
      cells += [format(masked, fmt), format(narrow, fmt), f"{narrow / masked:.2f}"]
    return f"| {label} | " + " | ".join(cells) + " |"

  lines = [
    row("parameters", lambda c: c["params"], ","),
    row("MACs per image", lambda c: c["macs"], ","),
    row("savez bytes", lambda c: c["bytes"], ","),
  ]
  for batch in comparisons[0]["latency_ms"]:
    lines.append(row(f"latency batch {batch} (ms)", lambda c: c["latency_ms"][batch], ".3f"))
  return lines


def resnet_markdown(results: dict[str, Any]) -> list[str]:
  """The ResNet-56 caption and table."""
  rn = results["resnet56"]
  stages = [rn["widths"][i] for i in range(0, len(rn["widths"]), 9)]
  return [
    "CIFAR ResNet-56 (eval mode, random weights and BN statistics), conv1 of every basic block "
    f"zero but for its first half of output channels (inner widths {stages} in the three "
    "stages, of 16, 32, 64); narrow = `narrow_resnet` (max |diff| of the logits "
    f"{rn['max_abs_diff_batch_256']:.1e}); input 32x32x3; savez bytes = `np.savez` of the "
    "params, BN statistics and (narrow) folded constants; latency: median of "
    f"{results['resnet_repeats']} interleaved samples of {CHAIN} jitted forwards",
    "",
    "| | masked | narrow | narrow / masked |",
    "|---|---:|---:|---:|",
    *comparison_rows([rn]),
  ]


def markdown(results: dict[str, Any]) -> str:
  le = results["lenet5"]
  c2 = results["lenet5_conv2"]
  lines = [
    f"Export benchmark ({results['machine']}, jax {results['jax']}); latency: median of "
    f"{results['repeats']} interleaved samples of {CHAIN} jitted forwards dispatched back to back.",
    "",
    f"LeNet-5, half of the channels of conv1, conv2, fc1 cut (`prune_channels`, C = 2 per "
    f"layer), widths {le['widths']}; narrow = `narrow_lenet5` (max |diff| of the logits "
    f"{le['max_abs_diff_batch_256']:.1e})",
    "",
    "| | masked | narrow | narrow / masked |",
    "|---|---:|---:|---:|",
    *comparison_rows([le]),
    "",
    "LeNet-5, conv2-only channel pruning (the structured experiment's results, issue 14): "
    "conv2 kernel zero but for its first "
    + " or ".join(
      f"{c['keep']} of 50 output channels ({c['macs']['masked'] / c['macs']['narrow']:.2f}x "
      f"fewer MACs, widths {c['widths']}, max |diff| of the logits "
      f"{c['max_abs_diff_batch_256']:.1e})"
      for c in c2
    )
    + "; conv1 and fc1 full; savez bytes = `np.savez` of the params",
    "",
    "| | "
    + " | ".join(f"masked {c['keep']}/50 | narrow {c['keep']}/50 | narrow / masked" for c in c2)
    + " |",
    "|---|" + "---:|---:|---:|" * len(c2),
    *comparison_rows(c2),
    "",
    *resnet_markdown(results),
    "",
    "LeNet-300-100, unstructured global magnitude cut (`prune`): BCOO kernels (`to_bcoo`, "
    "`sparse_dense`) vs the dense masked kernels; bytes of `save_sparse` vs `np.savez` dense",
    "",
    "| density | non-zeros | dense b1 (ms) | BCOO b1 (ms) | dense b256 (ms) | BCOO b256 (ms) "
    "| savez dense (B) | save_sparse (B) | ratio |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results["lenet300"]:
    b1, b256, size = r["latency_ms"]["1"], r["latency_ms"]["256"], r["bytes"]
    lines.append(
      f"| 1/{r['compression']:g} | {r['nonzeros']:,} | {b1['dense']:.3f} | {b1['bcoo']:.3f} | "
      f"{b256['dense']:.3f} | {b256['bcoo']:.3f} | {size['savez_dense']:,} | "
      f"{size['save_sparse']:,} | {size['save_sparse'] / size['savez_dense']:.3f} |"
    )
  nm = results["nm_2_4"]
  lines += [
    "",
    f"2:4 (`prune_nm`, `nm_compress`), LeNet-300-100 kernels: dense {nm['dense_bytes']:,} B, "
    f"values + uint8 indices {nm['nm_bytes']:,} B ({nm['nm_bytes'] / nm['dense_bytes']:.2f}x), "
    f"with 2-bit indices {nm['nm_bytes_packed']:,} B "
    f"({nm['nm_bytes_packed'] / nm['dense_bytes']:.3f}x). Storage only: JAX has no public "
    "2:4 sparse matmul.",
    "",
    *gpt_markdown(results),
    "",
    results["verdict"],
  ]
  return "\n".join(lines)


def verdict(results: dict[str, Any]) -> str:
  """Plain words on where sparse is slower."""
  slower = [
    f"1/{r['compression']:g} batch {b}"
    for r in results["lenet300"]
    for b, ms in r["latency_ms"].items()
    if ms["bcoo"] > ms["dense"]
  ]
  le = results["lenet5"]["latency_ms"]
  narrow_slower = [b for b, ms in le.items() if ms["narrow"] > ms["masked"]]
  text = (
    "BCOO is slower than the dense masked forward at: "
    + (", ".join(slower) if slower else "none of the measured points")
    + ". "
  )
  ratios = {b: ms["narrow"] / ms["masked"] for b, ms in le.items()}
  macs = results["lenet5"]["macs"]
  text += (
    f"The narrow LeNet-5 does {macs['narrow'] / macs['masked']:.2f}x the MACs but takes "
    + ", ".join(f"{r:.2f}x the time at batch {b}" for b, r in ratios.items())
    + ": on this CPU the speed-up is far below the MAC ratio. "
  )
  text += (
    "The narrow LeNet-5 is slower than the masked one at batch " + ", ".join(narrow_slower) + "."
    if narrow_slower
    else "The narrow LeNet-5 is faster than the masked one at every measured batch."
  )
  for c in results["lenet5_conv2"]:
    text += (
      f" Conv2 {c['keep']}/50: {c['macs']['narrow'] / c['macs']['masked']:.2f}x the MACs, "
      + ", ".join(
        f"{ms['narrow'] / ms['masked']:.2f}x the time at batch {b}"
        for b, ms in c["latency_ms"].items()
      )
      + "."
    )
  rn = results["resnet56"]
  text += (
    f" ResNet-56, half of the inner channels: {rn['macs']['narrow'] / rn['macs']['masked']:.2f}x "
    "the MACs, "
    + ", ".join(
      f"{ms['narrow'] / ms['masked']:.2f}x the time at batch {b}"
      for b, ms in rn["latency_ms"].items()
    )
    + "."
  )
  return f"{text} {gpt_verdict(results)}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--resnet_repeats", type=int, default=3, help="samples for ResNet-56")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument(
    "--only", choices=("all", "gpt"), default="all", help="gpt: the GPT rows alone (quick)"
  )
  args = parser.parse_args()
  load = machine.LoadWatch()
  results: dict[str, Any] = dict(
    machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}",
    jax=jax.__version__,
    repeats=args.repeats,
    resnet_repeats=args.resnet_repeats,
    chain=CHAIN,
    command="python benchmarks/bench_export.py"
    + f" --repeats {args.repeats} --resnet_repeats {args.resnet_repeats}"
    + ("" if args.only == "all" else f" --only {args.only}"),
  )
  if args.only == "gpt":
    results["gpt_tiny"] = [bench_gpt(kind, args.repeats) for kind in GPT_KINDS]
    results["verdict"] = gpt_verdict(results)
    table = "\n".join([*gpt_markdown(results), "", results["verdict"]])
    bench_update.write_results(args.out, "bench_export_gpt", results, table, load)
    return
  results["lenet5"] = bench_lenet5(args.repeats)
  results["lenet5_conv2"] = bench_lenet5_conv2(args.repeats)
  results["resnet56"] = bench_resnet56(args.resnet_repeats)
  results["lenet300"] = [bench_lenet300(c, args.repeats) for c in (60.0, 10.0, 2.0)]
  results["nm_2_4"] = bench_nm()
  results["gpt_tiny"] = [bench_gpt(kind, args.repeats) for kind in GPT_KINDS]
  results["verdict"] = verdict(results)
  bench_update.write_results(args.out, "bench_export", results, markdown(results), load)


if __name__ == "__main__":
  main()
