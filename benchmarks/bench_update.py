"""Times one GSM update against plain momentum SGD and the naive top_k way.

For pools shaped like LeNet-300-100, LeNet-5, ResNet-56 and ResNet-50, in one
process and one run (ratios are measured side by side, as the machine is
noisy), it times the jitted update of

  * ``optax.sgd(lr, momentum)``,
  * ``gsm_optax.gsm`` (exact histogram selection),
  * a naive GSM: concatenate the pool's scores and ``jax.lax.top_k``,

and one full jitted LeNet-300-100 train step (batch 256) with each optimizer.
Every time is reported two ways: chained (20 steps dispatched back to back, one
block at the end: what a training loop sees) and blocked (one call, then a
block: per-call overheads hide behind the wait, so this understates the cost of
the selection). Writes JSON and a Markdown table (default: benchmarks/results/).

  python benchmarks/bench_update.py            # full (the 25.6M naive run takes minutes)
  python benchmarks/bench_update.py --quick    # small pools only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any
from typing import Callable

# Repository code (models/) is not installed with gsm_optax: run from the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import machine  # noqa: E402
import gsm_optax  # noqa: E402
from training import strict_json  # noqa: E402

LEARNING_RATE, MOMENTUM = 1e-2, 0.99


# ----------------------------------------------------------------- pool shapes
def lenet_300_100_shapes() -> list[tuple[int, ...]]:
  return [(784, 300), (300,), (300, 100), (100,), (100, 10), (10,)]


def lenet5_shapes() -> list[tuple[int, ...]]:
  return [(5, 5, 1, 20), (20,), (5, 5, 20, 50), (50,), (800, 500), (500,), (500, 10), (10,)]


def resnet56_shapes() -> list[tuple[int, ...]]:
  shapes = [(3, 3, 3, 16), (16,), (16,)]
  cin = 16
  for width in (16, 32, 64):
    for _ in range(9):
      shapes += [(3, 3, cin, width), (width,), (width,), (3, 3, width, width), (width,), (width,)]
      cin = width
  return shapes + [(64, 10), (10,)]


def resnet50_shapes() -> list[tuple[int, ...]]:
  shapes = [(7, 7, 3, 64), (64,), (64,)]
  cin = 64
  for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
    for block in range(blocks):
      for shape in ((1, 1, cin, width), (3, 3, width, width), (1, 1, width, 4 * width)):
        shapes += [shape, (shape[-1],), (shape[-1],)]
      if block == 0:
        shapes += [(1, 1, cin, 4 * width), (4 * width,), (4 * width,)]
      cin = 4 * width
  return shapes + [(2048, 1000), (1000,)]


POOLS: dict[str, tuple[Callable[[], list[tuple[int, ...]]], float]] = {
  "lenet_300_100": (lenet_300_100_shapes, 60.0),
  "lenet5": (lenet5_shapes, 125.0),
  "resnet56": (resnet56_shapes, 10.0),
  "resnet50": (resnet50_shapes, 5.0),
}


def random_tree(shapes, seed: int, scale: float) -> dict[str, jax.Array]:
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {
    f"p{i:03d}": scale * jax.random.normal(k, s, jnp.float32)
    for i, (k, s) in enumerate(zip(keys, shapes))
  }


# --------------------------------------------------------------- naive GSM
def naive_gsm(
  learning_rate: float,
  compression: float,
  *,
  momentum: float = MOMENTUM,
  weight_decay: float = 5e-4,
) -> optax.GradientTransformation:
  """GSM with the obvious selection: concatenate the scores, lax.top_k."""

  def mask_grads(updates, state, params):
    pool = gsm_optax.default_pool(params)
    scores = [
      jnp.abs(g * w).ravel()
      for g, w, m in zip(jax.tree.leaves(updates), jax.tree.leaves(params), jax.tree.leaves(pool))
      if m
    ]
    flat = jnp.concatenate(scores)
    keep = int(flat.size / compression)
    threshold = jax.lax.top_k(flat, keep)[0][-1]
    masked = jax.tree.map(
      lambda g, w, m: jnp.where(jnp.abs(g * w) >= threshold, g, 0) if m else g,
      updates,
      params,
      pool,
    )
    return masked, state

  return optax.chain(
    optax.GradientTransformation(lambda p: optax.EmptyState(), mask_grads),
    optax.add_decayed_weights(weight_decay, mask=gsm_optax.default_pool),
    optax.trace(decay=momentum),
    optax.scale_by_learning_rate(learning_rate),
  )


# ------------------------------------------------------------------ timing
CHAIN = 20  # steps dispatched back to back per timed sample in the "chained" mode


def time_interleaved(
  steps: dict[str, Callable[[Any, int], Any]],
  states: dict[str, Any],
  repeats: dict[str, int],
  chain: int = 1,
) -> tuple[dict[str, float], dict[str, Any]]:
  """Median milliseconds per step of `state = step(state, i)` for each step function.

  Each timed sample dispatches `chain` steps back to back and blocks once at
  the end, as a training loop runs them (`chain = 1`: one call at a time, a
  block after each, which hides the per-call overheads behind the wait). The
  samples are interleaved round-robin, so that the machine's load drifts the
  same way for every optimizer; one warm-up call each first.
  """
  states = {name: jax.block_until_ready(step(states[name], 0)) for name, step in steps.items()}
  times: dict[str, list[float]] = {name: [] for name in steps}
  for i in range(1, max(repeats.values()) + 1):
    for name, step in steps.items():
      if i > repeats[name]:
        continue
      start = time.perf_counter()
      state = states[name]
      for j in range(chain):
        state = step(state, i * chain + j)
      states[name] = jax.block_until_ready(state)
      times[name].append((time.perf_counter() - start) / chain)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}, states


def chained_times(steps, states, repeats: int) -> dict[str, float]:
  """sgd and gsm timed chained (CHAIN steps, one block), from the given states."""
  fast = {label: steps[label] for label in ("sgd_momentum", "gsm")}
  chained, _ = time_interleaved(
    fast, {label: states[label] for label in fast}, {label: repeats for label in fast}, CHAIN
  )
  result = {f"{label}_chained_ms": ms for label, ms in chained.items()}
  result["gsm_chained_ratio"] = chained["gsm"] / chained["sgd_momentum"]
  return result


def bench_pool(name: str, repeats: int, naive_repeats: int) -> dict[str, Any]:
  make_shapes, compression = POOLS[name]
  shapes = make_shapes()
  params = random_tree(shapes, 0, 0.05)
  grad_sets = [random_tree(shapes, s, 0.01) for s in (1, 2, 3, 4)]
  pool_size = gsm_optax.pool_size(params)
  result: dict[str, Any] = dict(
    pool=name, leaves=len(shapes), pool_size=pool_size, compression=compression
  )
  optimizers = {
    "sgd_momentum": optax.sgd(LEARNING_RATE, momentum=MOMENTUM),
    "gsm": gsm_optax.gsm(LEARNING_RATE, compression, momentum=MOMENTUM),
    "naive_topk_gsm": naive_gsm(LEARNING_RATE, compression),
  }
  steps, states = {}, {}
  for label, tx in optimizers.items():
    update = jax.jit(tx.update)

    def step(carry, i, update=update):
      opt_state, _ = carry
      updates, opt_state = update(grad_sets[i % len(grad_sets)], opt_state, params)
      return opt_state, updates

    steps[label], states[label] = step, (tx.init(params), None)
  counts = {label: repeats for label in steps}
  counts["naive_topk_gsm"] = naive_repeats
  times, states = time_interleaved(steps, states, counts)
  for label, ms in times.items():
    result[f"{label}_ms"] = ms
  result.update(chained_times(steps, states, repeats))
  stats = gsm_optax.gsm_stats(states["gsm"][0])
  result["gsm_num_active"] = int(stats["num_active"])
  result["gsm_keep"] = int(stats["keep"])
  result["gsm_sampled_path"] = sampled_path_used(params, grad_sets[0], compression)
  base = result["sgd_momentum_ms"]
  result["gsm_ratio"] = result["gsm_ms"] / base
  result["naive_ratio"] = result["naive_topk_gsm_ms"] / base
  return result


def sampled_path_used(params, grads, compression: float) -> bool:
  """Whether the selection took the one-full-pass sampled path (vs radix)."""
  from gsm_optax import selection  # pylint: disable=g-import-not-at-top

  pool = gsm_optax.default_pool(params)
  scores = [
    jnp.abs(g * w)
    for g, w, m in zip(jax.tree.leaves(grads), jax.tree.leaves(params), jax.tree.leaves(pool))
    if m
  ]
  keep = gsm_optax.keep_count(params, compression)
  return bool(jax.jit(selection.select_score_threshold)(scores, keep).sampled)


def _mlp_logits(params: dict[str, Any], images: jax.Array) -> jax.Array:
  """LeNet-300-100 written in plain JAX: relu(x W1 + b1) -> relu(. W2 + b2) -> . W3 + b3."""
  x = images.reshape(images.shape[0], -1)
  for name in ("fc1", "fc2"):
    x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
  return x @ params["fc3"]["kernel"] + params["fc3"]["bias"]


def bench_lenet_train_step(repeats: int, plain: bool = False) -> dict[str, Any]:
  """Full jitted LeNet-300-100 train step (batch 256): forward, backward, update.

  ``plain=False``: the Flax NNX model (``nnx.merge`` of its params state);
  ``plain=True``: the same network in plain JAX, its params a dict of arrays (the
  same initial values) and the batch an argument, the way a user's own loop is written.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  import models  # pylint: disable=g-import-not-at-top

  model = models.create_model("lenet_300_100", num_classes=10, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  if plain:
    params = nnx.to_pure_dict(params)
  rng = np.random.default_rng(0)
  batches = [
    (
      jnp.asarray(rng.standard_normal((256, 28, 28, 1)), jnp.float32),
      jnp.asarray(rng.integers(0, 10, 256), jnp.int32),
    )
    for _ in range(4)
  ]

  def loss_fn(p, images, labels):
    logits = _mlp_logits(p, images) if plain else nnx.merge(graphdef, p)(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  result: dict[str, Any] = {}
  optimizers = {
    "sgd_momentum": optax.sgd(LEARNING_RATE, momentum=MOMENTUM),
    "gsm": gsm_optax.gsm(LEARNING_RATE, 60.0, momentum=MOMENTUM),
    "naive_topk_gsm": naive_gsm(LEARNING_RATE, 60.0),
  }
  steps, states = {}, {}
  for label, tx in optimizers.items():

    @jax.jit
    def train_step(p, opt_state, images, labels, tx=tx):
      grads = jax.grad(loss_fn)(p, images, labels)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state

    def step(carry, i, train_step=train_step):
      return train_step(*carry, *batches[i % len(batches)])

    steps[label], states[label] = step, (params, tx.init(params))
  times, states = time_interleaved(steps, states, {label: repeats for label in steps})
  for label, ms in times.items():
    result[f"{label}_ms"] = ms
  result.update(chained_times(steps, states, repeats))
  result["gsm_ratio"] = result["gsm_ms"] / result["sgd_momentum_ms"]
  result["naive_ratio"] = result["naive_topk_gsm_ms"] / result["sgd_momentum_ms"]
  return result


def markdown(results: dict[str, Any]) -> str:
  lines = [
    f"Chained: {CHAIN} steps dispatched back to back, one block at the end (as a training loop"
    " runs them); blocked: one call, then a block.",
    "",
    "| pool | pooled weights | C | sgd chained ms | gsm chained ms | **gsm / sgd chained** |"
    " sgd blocked ms | gsm blocked ms | gsm / sgd blocked | naive top_k blocked ms | naive / sgd |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results["updates"]:
    lines.append(
      f"| {r['pool']} | {r['pool_size']:,} | {r['compression']:g} | "
      f"{r['sgd_momentum_chained_ms']:.2f} | {r['gsm_chained_ms']:.2f} | "
      f"**{r['gsm_chained_ratio']:.2f}x** | {r['sgd_momentum_ms']:.2f} | {r['gsm_ms']:.2f} | "
      f"{r['gsm_ratio']:.2f}x | {r['naive_topk_gsm_ms']:.1f} | {r['naive_ratio']:.1f}x |"
    )
  steps_timed = [
    (key, label)
    for key, label in (
      ("lenet_300_100_train_step", "Flax NNX model"),
      ("lenet_300_100_plain_jax_step", "plain JAX (params in a dict)"),
    )
    if results.get(key)
  ]
  if steps_timed:
    lines += [
      "",
      "| LeNet-300-100 train step, batch 256 | sgd chained ms | gsm chained ms |"
      " **gsm / sgd chained** | sgd blocked ms | gsm blocked ms | gsm / sgd blocked |"
      " naive top_k blocked ms | naive / sgd |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in steps_timed:
      t = results[key]
      lines.append(
        f"| {label} | {t['sgd_momentum_chained_ms']:.2f} | "
        f"{t['gsm_chained_ms']:.2f} | **{t['gsm_chained_ratio']:.2f}x** | "
        f"{t['sgd_momentum_ms']:.2f} | {t['gsm_ms']:.2f} | {t['gsm_ratio']:.2f}x | "
        f"{t['naive_topk_gsm_ms']:.2f} | {t['naive_ratio']:.1f}x |"
      )
  lines += [
    "",
    f"{results['machine']}; jax {results['jax']}, optax {results['optax']}; "
    f"median of {results['repeats']} samples, interleaved round-robin. "
    f"Command: `{results['command']}`.",
  ]
  return "\n".join(lines)


def write_results(
  out: str,
  stem: str,
  results: dict[str, Any],
  table: str,
  load: machine.LoadWatch | None = None,
) -> None:
  """Writes ``out/stem.json`` and ``out/stem.md`` (the table), and prints the table; with
  ``load`` (taken when the benchmark started) both say the machine's load, and a busy run
  is marked as not a result."""
  if load is not None:
    results.update(load.record())
    table = f"{table}\n\n{load.note(results)}"
  os.makedirs(out, exist_ok=True)
  strict_json.write_json(os.path.join(out, f"{stem}.json"), results)
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write(table + "\n")
  print(table)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small pools only, few repeats")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  load = machine.LoadWatch()
  repeats = args.repeats or (5 if args.quick else 20)
  pools = ["lenet_300_100", "lenet5"] if args.quick else list(POOLS)
  results: dict[str, Any] = dict(
    machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}"
    f" ({jax.devices()[0].device_kind})",
    jax=jax.__version__,
    optax=optax.__version__,
    repeats=repeats,
    command="python benchmarks/bench_update.py" + (" --quick" if args.quick else ""),
    updates=[],
  )
  for name in pools:
    naive_repeats = 2 if name == "resnet50" else repeats
    results["updates"].append(bench_pool(name, repeats, naive_repeats))
    print(strict_json.dumps(results["updates"][-1]), flush=True)
  results["lenet_300_100_train_step"] = bench_lenet_train_step(repeats * 5)
  results["lenet_300_100_plain_jax_step"] = bench_lenet_train_step(repeats * 5, plain=True)
  stem = "bench_update" + ("_quick" if args.quick else "")
  write_results(args.out, stem, results, markdown(results), load)


if __name__ == "__main__":
  main()
