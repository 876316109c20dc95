"""Step time of the training program's GSM train step on 1, 2, 4 and 8 devices.

The train step is the program's own (``training.steps.make_phase`` with
``training.stages.gsm_optimizer``, compiled for the ``("data", "fsdp")`` mesh of
``training.distributed``): ResNet-56, C = 10, CIFAR-10-shaped random batches of
a fixed global size, in two layouts:

  * ``data``: ``mesh.fsdp = 1``, the state replicated, the batch split;
  * ``fsdp``: ``mesh.fsdp = devices``, the params and optimizer state split too.

Timed as the training loop runs: ``--steps`` steps dispatched back to back (the
step and the metric accumulation), one ``jax.block_until_ready`` at the end,
after a compile and a warm-up; the median over ``--repeats`` such runs. The
compiled HLO of every configuration is searched for all-gathers whose result
is at least as large as the smallest pooled kernel (``all_gathers``).

The device count is fixed when JAX starts, so each count runs in a child
process. On a CPU-only machine the children get
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and
``JAX_PLATFORMS=cpu``: all those devices share the same cores, so the numbers
show that the program scales without extra copies, not a real speed-up. When
``jax.devices()`` are GPUs or TPUs, the children use the first N of them.

  python benchmarks/bench_devices.py          # full: ResNet-56, batch 64, 1/2/4/8 devices
  python benchmarks/bench_devices.py --quick  # LeNet-300-100, batch 16, 1/2 devices, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any
from typing import NamedTuple

# Repository code (models/, training/, configs/) is not installed: run from the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import machine  # noqa: E402
from training import strict_json  # noqa: E402

LAYOUTS = ("data", "fsdp")
NUM_CLASSES = 10
STEPS_PER_EPOCH = 781  # CIFAR-10 at batch 64: places the learning-rate boundaries only
INPUT_SHAPES = {"resnet56": (32, 32, 3), "lenet_300_100": (28, 28, 1)}
_FORCE_FLAG = "--xla_force_host_platform_device_count"

# ------------------------------------------------------------------- HLO text
# `%name = <result> all-gather(` or `all-gather-done(` (async, GPU/TPU); the
# result is one array or a tuple of arrays (combined gathers). `all-gather-start`
# is skipped: its tuple also holds the operands, and its `-done` gives the result.
_ALL_GATHER = re.compile(r"=\s*(?P<result>\(?[a-z][a-z0-9]*\[.*?)\s+all-gather(?:-done)?\(")
_ARRAY = re.compile(r"\b[a-z][a-z0-9]*\[([0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def all_gather_ops(hlo_text: str) -> list[tuple[tuple[int, ...], str]]:
  """(result shape, JAX op name from the metadata or "") of every all-gather, in order.

  A gather with a tuple result contributes one shape per array; an async pair
  (``all-gather-start`` / ``all-gather-done``) counts once, by its ``-done``.
  """
  ops: list[tuple[tuple[int, ...], str]] = []
  for line in hlo_text.splitlines():
    match = _ALL_GATHER.search(line)
    if match:
      name = _OP_NAME.search(line)
      for dims in _ARRAY.findall(match.group("result")):
        ops.append((tuple(int(d) for d in dims.split(",") if d), name.group(1) if name else ""))
  return ops


def all_gathers(hlo_text: str) -> list[tuple[int, ...]]:
  """The result shapes of the all-gather ops of an HLO module's text, in order."""
  return [shape for shape, _ in all_gather_ops(hlo_text)]


def pass_of(op_name: str) -> str:
  """ "backward" (a transposed op), "forward" (a differentiated op) or "other" (the update)."""
  if "transpose(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "other"


def elements(shape: tuple[int, ...]) -> int:
  """The number of elements of an array of ``shape``."""
  return int(np.prod(shape, dtype=np.int64))


def pool_sized(shapes: list[tuple[int, ...]], smallest: int) -> list[tuple[int, ...]]:
  """The shapes with at least ``smallest`` elements (as large as a pooled kernel)."""
  return [shape for shape in shapes if elements(shape) >= smallest]


def shape_counts(shapes: list[tuple[int, ...]]) -> dict[str, int]:
  """``{"3x3x64x64": count, ...}``, largest first (JSON keys)."""
  counts: dict[str, int] = {}
  for shape in sorted(shapes, key=lambda x: (-elements(x), x)):
    key = "x".join(map(str, shape))
    counts[key] = counts.get(key, 0) + 1
  return counts


# -------------------------------------------------------------- child process
class Model(NamedTuple):
  """A freshly built model: its train graph, variables and pool."""

  graphdef: Any
  params: Any
  batch_stats: Any
  pool: Any  # bool pytree: the pooled (prunable) leaves of params

  def pooled_sizes(self) -> list[int]:
    """The element counts of the pooled kernels."""
    import jax  # pylint: disable=g-import-not-at-top

    leaves = zip(jax.tree.leaves(self.params), jax.tree.leaves(self.pool))
    return [elements(np.shape(leaf)) for leaf, pooled in leaves if pooled]

  def split_kernels(self, mesh) -> list[tuple[int, ...]]:
    """The shapes of the pooled kernels that ``training.distributed`` splits over ``mesh``."""
    import jax  # pylint: disable=g-import-not-at-top

    from training import distributed  # pylint: disable=g-import-not-at-top

    leaves = jax.tree.leaves(self.params)
    shardings = jax.tree.leaves(distributed.state_shardings(self.params, mesh))
    pooled = jax.tree.leaves(self.pool)
    return [
      tuple(np.shape(leaf))
      for leaf, sharding, p in zip(leaves, shardings, pooled)
      if p and any(sharding.spec)
    ]


def bench_config(model: str, batch_size: int, fsdp: int):
  """The ResNet-56 / C = 10 config of the program with this model, batch and mesh."""
  from configs import resnet56_c10  # pylint: disable=g-import-not-at-top

  config = resnet56_c10.get_config()
  config.model = model
  config.batch_size = batch_size
  config.mesh.fsdp = fsdp
  return config


def topology_for(config: Any, count: int):
  """The program's topology on all devices; on the first ``count`` when there are more."""
  import jax  # pylint: disable=g-import-not-at-top

  from training import distributed  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  if count == len(devices):
    return distributed.make_topology(config)
  fsdp = config.mesh.fsdp
  mesh = jax.make_mesh(
    (count // fsdp, fsdp),
    distributed.AXES,
    devices=devices[:count],
    axis_types=(jax.sharding.AxisType.Auto,) * len(distributed.AXES),
  )
  return distributed.Topology(mesh, jax.process_index(), jax.process_count())


def random_batches(model: str, batch_size: int, count: int, topology) -> list[Any]:
  """``count`` random (images, labels) global batches, already on the devices."""
  from training import distributed  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  shape = (batch_size, *INPUT_SHAPES[model])
  return [
    distributed.global_batch(
      (
        rng.standard_normal(shape).astype(np.float32),
        rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
      ),
      topology,
    )
    for _ in range(count)
  ]


def run_steps(train_step, state, batches, num_steps: int) -> tuple[Any, float]:
  """``num_steps`` steps dispatched back to back, one block at the end; (state, seconds)."""
  import jax  # pylint: disable=g-import-not-at-top

  from training import steps  # pylint: disable=g-import-not-at-top

  totals = steps.totals_to_device(steps.zero_totals())
  start = time.perf_counter()
  for i in range(num_steps):
    state, metrics = train_step(state, batches[i % len(batches)])
    totals = steps.accumulate(totals, metrics)
  jax.block_until_ready((state, totals))
  return state, time.perf_counter() - start


def bench_layout(args: argparse.Namespace, model: Model, fsdp: int) -> dict[str, Any]:
  """Compile, HLO all-gathers and step times of one mesh (``args.devices`` devices)."""
  from training import distributed  # pylint: disable=g-import-not-at-top
  from training import stages  # pylint: disable=g-import-not-at-top
  from training import steps  # pylint: disable=g-import-not-at-top

  config = bench_config(args.model, args.batch_size, fsdp)
  topology = topology_for(config, args.devices)
  mesh = topology.mesh
  phase = steps.make_phase(
    "gsm",
    stages.gsm_optimizer,
    config.gsm,
    STEPS_PER_EPOCH,
    model.graphdef,
    config.compression,
    mesh=mesh,
  )
  fresh = steps.new_train_state(model.params, model.batch_stats, config.seed)
  fresh = distributed.place(fresh, mesh)
  state = distributed.place(fresh._replace(opt_state=phase.tx.init(fresh.params)), mesh)
  batches = random_batches(args.model, args.batch_size, 2, topology)

  start = time.perf_counter()
  hlo = phase.train_step.lower(state, batches[0]).compile().as_text()
  compile_s = time.perf_counter() - start
  ops = all_gather_ops(hlo)
  smallest = min(model.pooled_sizes())
  big = pool_sized([shape for shape, _ in ops], smallest)
  by_pass = {"forward": 0, "backward": 0, "other": 0}
  for shape, name in ops:
    if elements(shape) >= smallest:
      by_pass[pass_of(name)] += 1

  state, warmup_s = run_steps(phase.train_step, state, batches, args.steps)
  times = []
  for _ in range(args.repeats):
    state, seconds = run_steps(phase.train_step, state, batches, args.steps)
    times.append(seconds)
  median = statistics.median(times)
  largest = max(big, key=elements) if big else None
  split = set(model.split_kernels(mesh))
  return {
    "devices": args.devices,
    "mesh_shape": dict(mesh.shape),
    "split_pooled_kernels": len(model.split_kernels(mesh)),
    "pool_sized_all_gathers_by_pass": by_pass,
    "pool_sized_all_gather_shapes": shape_counts(big),
    "pool_sized_all_gathers_shaped_like_split_kernels": sum(shape in split for shape in big),
    "compile_s": compile_s,
    "warmup_s": warmup_s,
    "run_times_s": times,
    "ms_per_step": 1e3 * median / args.steps,
    "examples_per_s": args.batch_size * args.steps / median,
    "all_gathers": len(ops),
    "pool_sized_all_gathers": len(big),
    "largest_all_gather": list(largest) if largest else None,
    "largest_all_gather_elements": elements(largest) if largest else 0,
  }


def child_main(args: argparse.Namespace) -> dict[str, Any]:
  """One device count, both layouts (one run when they are the same mesh)."""
  import jax  # pylint: disable=g-import-not-at-top

  import gsm_optax  # pylint: disable=g-import-not-at-top
  from training import steps  # pylint: disable=g-import-not-at-top

  graphdef, _, params, batch_stats = steps.init_model(args.model, NUM_CLASSES, 0)
  model = Model(graphdef, params, batch_stats, gsm_optax.resolve_pool(params, None))
  sizes = model.pooled_sizes()
  rows, by_fsdp = [], {}
  for layout in LAYOUTS:
    fsdp = 1 if layout == "data" else args.devices
    if fsdp in by_fsdp:  # one device: the fsdp layout is the data layout
      row = dict(by_fsdp[fsdp], same_run_as=by_fsdp[fsdp]["layout"])
    else:
      row = by_fsdp[fsdp] = dict(layout=layout, **bench_layout(args, model, fsdp))
    rows.append(dict(row, layout=layout))
    print(strict_json.dumps(rows[-1]), file=sys.stderr, flush=True)
  device = jax.devices()[0]
  return {
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "visible_devices": len(jax.devices()),
    "jax": jax.__version__,
    "pool_size": sum(sizes),
    "pooled_kernels": len(sizes),
    "smallest_pooled_kernel": min(sizes),
    "rows": rows,
  }


def probe_main() -> dict[str, Any]:
  """The backend and devices a child would see without forced CPU devices."""
  import jax  # pylint: disable=g-import-not-at-top

  return {"backend": jax.default_backend(), "device_count": len(jax.devices())}


# ------------------------------------------------------------- parent process
def child_env(forced: int | None) -> dict[str, str]:
  """The environment of a child; ``forced`` CPU devices, or the real ones when None."""
  env = dict(os.environ)
  if forced is not None:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_FORCE_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{_FORCE_FLAG}={forced}"])
    env["JAX_PLATFORMS"] = "cpu"
  return env


def run_child(argv: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
  """Runs this script with ``argv`` in a child process; returns the JSON it writes."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "result.json")
    command = [sys.executable, os.path.abspath(__file__), *argv, "--result", path]
    done = subprocess.run(
      command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0 or not os.path.exists(path):
      raise RuntimeError(f"{shlex.join(argv)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    with open(path) as f:
      return json.load(f)


def device_plan(args: argparse.Namespace) -> tuple[list[int], bool, dict[str, Any]]:
  """(device counts, whether CPU devices are forced, the probe's answer)."""
  probe = {"backend": "cpu", "device_count": 1}
  if not args.force_cpu:
    probe = run_child(["--probe"], child_env(None), args.timeout)
  if probe["backend"] == "cpu":
    return list(args.devices_list), True, probe
  counts = [n for n in args.devices_list if n <= probe["device_count"]]
  return counts, False, probe


def add_speedups(rows: list[dict[str, Any]]) -> None:
  """Adds ``speedup``: examples/s over those of one device in the same layout."""
  base = {r["layout"]: r["examples_per_s"] for r in rows if r["devices"] == 1}
  for row in rows:
    one = base.get(row["layout"])
    row["speedup"] = row["examples_per_s"] / one if one else None


def parent_main(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
  """Runs every device count in its own process; the results of all."""
  start = time.perf_counter()
  counts, forced, probe = device_plan(args)
  common = ["--model", args.model, "--batch-size", str(args.batch_size)]
  common += ["--steps", str(args.steps), "--repeats", str(args.repeats)]
  rows, child = [], {}
  for count in counts:
    print(f"{count} device(s)...", file=sys.stderr, flush=True)
    env = child_env(count if forced else None)
    child = run_child(["--child", "--devices", str(count), *common], env, args.timeout)
    rows += child["rows"]
  rows.sort(key=lambda r: (LAYOUTS.index(r["layout"]), r["devices"]))
  add_speedups(rows)
  return {
    "command": shlex.join(["python", "benchmarks/bench_devices.py", *argv]),
    "machine": {
      "platform": platform.platform(),
      "processor": platform.machine(),
      "cpu_count": os.cpu_count(),
      "backend": child.get("backend", probe["backend"]),
      "device_kind": child.get("device_kind"),
      "forced_cpu_devices": forced,
    },
    "jax": child.get("jax"),
    "model": args.model,
    "compression": float(bench_config(args.model, args.batch_size, 1).compression),
    "batch_size": args.batch_size,
    "steps": args.steps,
    "repeats": args.repeats,
    "pool_size": child.get("pool_size"),
    "smallest_pooled_kernel": child.get("smallest_pooled_kernel"),
    "rows": rows,
    "elapsed_s": time.perf_counter() - start,
  }


# ------------------------------------------------------------------ Markdown
def markdown(results: dict[str, Any]) -> str:
  """The results as a Markdown page: the table, the all-gathers, the command, the machine."""
  machine = results["machine"]
  smallest = results["smallest_pooled_kernel"]
  lines = [
    f"# GSM train step on 1-{max(r['devices'] for r in results['rows'])} devices",
    "",
    f"{results['model']}, C = {results['compression']:g}, global batch {results['batch_size']} "
    f"of random {'x'.join(map(str, INPUT_SHAPES[results['model']]))} images, the program's "
    "`make_phase` / `make_train_step` "
    f"with the mesh; {results['steps']} steps dispatched back to back with one block at the "
    f"end, median of {results['repeats']} runs after compile and warm-up.",
    "",
    "| layout | devices | mesh (data x fsdp) | ms/step | examples/s | speed-up vs 1 device "
    f"| pool-sized all-gathers (>= {smallest:,} elements) | largest |",
    "|---|---:|---|---:|---:|---:|---:|---|",
  ]
  for r in results["rows"]:
    mesh = f"{r['mesh_shape']['data']} x {r['mesh_shape']['fsdp']}"
    if r.get("same_run_as"):
      mesh += f" (the {r['same_run_as']} run)"
    largest = r["largest_all_gather"]
    largest_text = f"{tuple(largest)} = {r['largest_all_gather_elements']:,}" if largest else "-"
    speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
    lines.append(
      f"| {r['layout']} | {r['devices']} | {mesh} | {r['ms_per_step']:.1f} | "
      f"{r['examples_per_s']:.1f} | {speedup} | {r['pool_sized_all_gathers']} | {largest_text} |"
    )
  lines += ["", *findings(results), ""]
  if machine["forced_cpu_devices"]:
    lines += [
      f"The devices are forced CPU devices (`XLA_FLAGS={_FORCE_FLAG}=N`, `JAX_PLATFORMS=cpu`): "
      f"all N share the same {machine['cpu_count']} CPU cores. The numbers only show that the "
      "program scales without extra copies or collectives that cost more than the step; they "
      "are no measure of a real multi-device speed-up. What speed-up there is comes from "
      "running the devices' parts of the batch side by side on those cores, which one CPU "
      "device does not keep fully busy.",
      "",
    ]
  lines += [
    f"Command: `{results['command']}` ({results['elapsed_s'] / 60:.1f} minutes).",
    "",
    f"Machine: {machine['platform']}, {machine['processor']}, {machine['cpu_count']} CPU cores; "
    f"backend {machine['backend']} ({machine['device_kind']}); jax {results['jax']}.",
  ]
  return "\n".join(lines)


def findings(results: dict[str, Any]) -> list[str]:
  """One sentence per layout on the pool-sized all-gathers of its compiled step."""
  lines = []
  for layout in LAYOUTS:
    rows = [r for r in results["rows"] if r["layout"] == layout and r["devices"] > 1]
    if not rows:
      continue
    counts = ", ".join(f"{r['pool_sized_all_gathers']} on {r['devices']}" for r in rows)
    if layout == "data":
      total = sum(r["all_gathers"] for r in rows)
      verdict = (
        "none; the replicated params and optimizer state are never gathered, and neither is "
        "the GSM selection's input"
        + (" (no all-gather of any size in the compiled step)" if not total else "")
        if not any(r["pool_sized_all_gathers"] for r in rows)
        else "some, unexpected for replicated params (see the JSON)"
      )
    else:
      verdict = fsdp_verdict(rows)
    lines.append(f"- `{layout}` layout, pool-sized all-gathers ({counts} devices): {verdict}.")
  return lines


def fsdp_verdict(rows: list[dict[str, Any]]) -> str:
  """What the pool-sized all-gathers of the ``fsdp`` layout are, from their op names."""
  parts: dict[str, list[int]] = {}  # description -> device counts
  for r in rows:
    passes = r["pool_sized_all_gathers_by_pass"]
    part = (
      f"{passes['forward']} in the forward pass, {passes['backward']} in the backward pass, "
      f"{passes['other']} in the update; "
      f"{r['pool_sized_all_gathers_shaped_like_split_kernels']} shaped like one of the "
      f"{r['split_pooled_kernels']} kernels split over `fsdp`"
    )
    parts.setdefault(part, []).append(r["devices"])
  text = "; ".join(
    f"{'/'.join(map(str, counts))} devices: {part}" for part, counts in parts.items()
  )
  if all(r["pool_sized_all_gathers_by_pass"]["other"] == 0 for r in rows):
    return (
      f"{text}. The split weights are gathered for the convolutions and matmuls of the "
      "forward pass and again for the backward pass (their transposes), which is what FSDP "
      "does; the optimizer update (momentum, GSM scores and selection) gathers nothing as "
      "large as a kernel"
    )
  return f"{text}. The update gathers arrays as large as a kernel (see the JSON)"


# ----------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="LeNet-300-100, batch 16, 1/2 devices")
  parser.add_argument("--model", default=None, choices=sorted(INPUT_SHAPES))
  parser.add_argument("--batch-size", type=int, default=None, help="global batch (default 64)")
  parser.add_argument("--devices", default=None, help="comma-separated counts (default 1,2,4,8)")
  parser.add_argument("--steps", type=int, default=None, help="steps per timed run")
  parser.add_argument("--repeats", type=int, default=None, help="timed runs (median)")
  parser.add_argument("--force-cpu", action="store_true", help="forced CPU devices even on GPU")
  parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  quick = args.quick
  args.model = args.model or ("lenet_300_100" if quick else "resnet56")
  args.batch_size = args.batch_size or (16 if quick else 64)
  args.steps = args.steps or (2 if quick else 4)
  args.repeats = args.repeats or (1 if quick else 3)
  if args.child:
    args.devices = int(args.devices)
  else:
    args.devices_list = [
      int(n) for n in (args.devices or ("1,2" if quick else "1,2,4,8")).split(",")
    ]
    if any(args.batch_size % n for n in args.devices_list):
      parser.error(f"--batch-size {args.batch_size} must divide over every device count")
  return args


def write(
  results: dict[str, Any], out: str, quick: bool, load: machine.LoadWatch
) -> tuple[str, str]:
  """Writes bench_devices[_quick].{json,md} under ``out``, with the machine's load; returns
  their paths."""
  results.update(load.record())
  os.makedirs(out, exist_ok=True)
  stem = os.path.join(out, "bench_devices" + ("_quick" if quick else ""))
  strict_json.write_json(stem + ".json", results)
  with open(stem + ".md", "w") as f:
    f.write(f"{markdown(results)}\n\n{load.note(results)}\n")
  return stem + ".json", stem + ".md"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.probe or args.child:
    result = probe_main() if args.probe else child_main(args)
    strict_json.write_json(args.result, result)
    return 0
  load = machine.LoadWatch()
  results = parent_main(args, argv)
  paths = write(results, args.out, args.quick, load)
  print(markdown(results))
  print("wrote " + ", ".join(paths), file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
