"""Whole train steps with GSM against the same step with its plain optimizer, as training runs them.

Meant for an accelerator (it runs anywhere). For each model it builds the
training program's own jitted train step (``training.steps.make_phase``: forward,
backward, optimizer update, in the compute dtype of ``config.compute_dtype``)
twice, once with the plain optimizer of its phase and once with GSM, and times
them interleaved, ``--chain`` steps dispatched back to back with one block at
the end, as a training loop runs them:

  * LeNet-5 at batch 256 (28x28x1), ResNet-56 at batch 128 (32x32x3), ResNet-50
    at batch 256 (224x224x3): momentum SGD against ``gsm_optax.gsm`` (the paper's
    rule), C as in the paper's tables;
  * the byte-level GPT (``small``, context 256, batch 64): AdamW against
    ``gsm_optax.gsm_adamw``, C = 10 over its attention and MLP kernels;

each in float32 and in bfloat16 compute. ``--train_py`` also runs train.py on
ResNet-56 with ``--config.dataset=synthetic`` (two dense and two GSM epochs)
and reports the examples per second of each phase's second epoch (compiled,
its test evaluation included). Writes JSON and a Markdown table with the device,
the versions, the command and the machine's load before and after.

  python benchmarks/bench_gpu.py --out benchmarks/results          # on the accelerator
  python benchmarks/bench_gpu.py --quick                           # small shapes, any machine
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bench_update  # noqa: E402
from benchmarks import machine  # noqa: E402
from configs import austen_gpt  # noqa: E402
from configs import default  # noqa: E402
from training import stages  # noqa: E402
from training import steps  # noqa: E402
from training import strict_json  # noqa: E402


class Case(dict):
  """One timed model: name, model, size options, batch, input shape, classes, C, optimizer."""


CASES = (
  Case(name="lenet5", model="lenet5", batch=256, shape=(28, 28, 1), classes=10, c=125.0),
  Case(name="resnet56", model="resnet56", batch=128, shape=(32, 32, 3), classes=10, c=10.0),
  Case(name="resnet50", model="resnet50", batch=256, shape=(224, 224, 3), classes=1000, c=5.0),
  Case(name="gpt_small", model="gpt", batch=64, shape=(256,), classes=256, c=10.0, size="small"),
)
QUICK = {  # the same models at sizes a CPU times in seconds
  "lenet5": {"batch": 32},
  "resnet56": {"batch": 8},
  "resnet50": {"batch": 2, "shape": (64, 64, 3)},
  "gpt_small": {"batch": 4, "shape": (32,), "size": "nano"},
}


def sections(case: Case) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict, Any]:
  """(plain section, GSM section, pool spec): SGD and the paper's GSM, or AdamW and gsm_adamw."""
  if case["model"] == "gpt":
    plain = austen_gpt.adamw_section(epochs=1)
    gsm = austen_gpt.gsm_section(epochs=1)
    spec = stages.pool_spec(ml_collections.ConfigDict({"model": "gpt"}))
    return plain, gsm, spec
  config = default.get_config()
  return config.dense, config.gsm, None


def batch_for(case: Case, key: int) -> tuple[jax.Array, jax.Array]:
  """A random batch of the case's inputs and labels (tokens for the GPT)."""
  rng = np.random.default_rng(key)
  if case["model"] == "gpt":
    tokens = rng.integers(0, 256, (case["batch"], *case["shape"]), dtype=np.int32)
    return jnp.asarray(tokens), jnp.asarray(np.roll(tokens, -1, axis=1))
  images = rng.normal(size=(case["batch"], *case["shape"])).astype(np.float32)
  labels = rng.integers(0, case["classes"], case["batch"]).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def phases(case: Case, dtype: str | None, steps_per_epoch: int):
  """{"plain": phase, "gsm": phase} and the initial state, built as train.py builds them."""
  options = (("size", case["size"]),) if "size" in case else ()
  if case["model"] == "gpt":
    options += (("context", case["shape"][0]),)
  graphdef, _, params, batch_stats = steps.init_model(case["model"], case["classes"], 0, options)
  plain_cfg, gsm_cfg, spec = sections(case)
  built = {
    "plain": steps.make_phase(
      "dense", steps.optimizer, plain_cfg, steps_per_epoch, graphdef, dtype=dtype
    ),
    "gsm": steps.make_phase(
      "gsm",
      stages.gsm_optimizer,
      gsm_cfg,
      steps_per_epoch,
      graphdef,
      case["c"],
      spec,
      dtype=dtype,
    ),
  }
  fresh = steps.new_train_state(params, batch_stats, 0)
  states = {name: fresh._replace(opt_state=p.tx.init(params)) for name, p in built.items()}
  return built, states


def bench_case(case: Case, dtype_name: str, chain: int, repeats: int) -> dict[str, Any]:
  """Milliseconds per chained step of the plain and the GSM train step, and their ratio."""
  dtype = None if dtype_name == "float32" else dtype_name
  built, states = phases(case, dtype, steps_per_epoch=1000)
  batches = [batch_for(case, k) for k in range(2)]

  def stepper(phase):
    return lambda state, i: phase.train_step(state, batches[i % 2])[0]

  timed = {name: stepper(phase) for name, phase in built.items()}
  ms, _ = bench_update.time_interleaved(timed, states, {name: repeats for name in timed}, chain)
  row = {key: case[key] for key in ("name", "model", "batch", "c")}
  row.update(
    input_shape=list(case["shape"]),
    size=case.get("size"),
    compute_dtype=dtype_name,
    plain_ms=ms["plain"],
    gsm_ms=ms["gsm"],
    ratio=ms["gsm"] / ms["plain"],
    examples_per_s_gsm=case["batch"] / (ms["gsm"] / 1e3),
  )
  return row


def train_py_throughput(quick: bool) -> dict[str, Any]:
  """train.py on ResNet-56 with synthetic data: examples / s of each phase's second epoch."""
  train = min(2_560, 50_000) if quick else 50_000
  batch = 32 if quick else 128
  with tempfile.TemporaryDirectory() as workdir:
    command = [
      sys.executable,
      os.path.join(ROOT, "train.py"),
      "--config",
      os.path.join(ROOT, "configs", "resnet56_c10.py"),
      f"--workdir={workdir}/run",
      "--config.dataset=synthetic",
      f"--config.max_train_examples={train}",
      "--config.max_test_examples=1000",
      f"--config.batch_size={batch}",
      "--config.dense.epochs=2",
      "--config.gsm.epochs=2",
      "--config.progress_bar=False",
      "--config.plots=False",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    with open(os.path.join(workdir, "run", "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  out = {"command": " ".join(command[1:]), "examples_per_epoch": (train // batch) * batch}
  for phase in ("dense", "gsm"):
    first, second = [row for row in rows if row["phase"] == phase][:2]
    seconds = second["wall_time_s"] - first["wall_time_s"]
    out[f"{phase}_epoch_s"] = seconds
    out[f"{phase}_examples_per_s"] = out["examples_per_epoch"] / seconds
  out["ratio"] = out["gsm_epoch_s"] / out["dense_epoch_s"]
  return out


def versions() -> dict[str, Any]:
  """The device and the library versions the numbers belong to."""
  device = jax.devices()[0]
  info = {
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "num_devices": jax.device_count(),
    "jax": jax.__version__,
    "python": platform.python_version(),
    "machine": platform.processor() or platform.machine(),
  }
  try:
    import torch  # pylint: disable=g-import-not-at-top

    info["torch"] = torch.__version__
  except ImportError:
    info["torch"] = None
  return info


def markdown(results: dict[str, Any]) -> str:
  """The Markdown table of the results."""
  lines = [
    "| model | batch | compute | plain ms | GSM ms | **GSM / plain** |",
    "|---|---:|---|---:|---:|---:|",
  ]
  for row in results["rows"]:
    lines.append(
      f"| {row['name']} | {row['batch']} | {row['compute_dtype']} | {row['plain_ms']:.2f} | "
      f"{row['gsm_ms']:.2f} | **{row['ratio']:.3f}x** |"
    )
  info = results["device"]
  lines += [
    "",
    f"{info['device_kind']} ({info['backend']}), jax {info['jax']}, torch {info['torch']}; "
    f"{results['chain']} steps chained per sample, median of {results['repeats']} samples, "
    f"interleaved. {results['date']}. Command: `{results['command']}`.",
  ]
  if results.get("train_py"):
    t = results["train_py"]
    lines += [
      "",
      f"train.py, ResNet-56 on synthetic data: dense {t['dense_examples_per_s']:.0f} examples/s, "
      f"GSM {t['gsm_examples_per_s']:.0f} examples/s ({t['ratio']:.3f}x the dense epoch's time; "
      f"second epoch of each phase, its evaluation included). Command: `{t['command']}`.",
    ]
  return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small shapes (any machine, seconds)")
  parser.add_argument("--models", default=",".join(case["name"] for case in CASES))
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--chain", type=int, default=20, help="steps per timed sample")
  parser.add_argument("--repeats", type=int, default=7, help="timed samples per step")
  parser.add_argument("--train_py", action="store_true", help="also time train.py on ResNet-56")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  parser.add_argument("--stem", default=None, help="file name (default: bench_gpu_<backend>)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  names = [name for name in args.models.split(",") if name]
  known = {case["name"]: case for case in CASES}
  unknown = [name for name in names if name not in known]
  if unknown:
    raise SystemExit(f"bench_gpu.py: unknown models {unknown}; choose from {sorted(known)}")
  load = machine.LoadWatch()
  rows = []
  for name in names:
    case = Case(known[name], **(QUICK[name] if args.quick else {}))
    for dtype_name in args.dtypes.split(","):
      rows.append(bench_case(case, dtype_name, args.chain, args.repeats))
      print(strict_json.dumps(rows[-1]))
  results = {
    "rows": rows,
    "train_py": train_py_throughput(args.quick) if args.train_py else None,
    "device": versions(),
    "chain": args.chain,
    "repeats": args.repeats,
    "quick": args.quick,
    "date": datetime.date.today().isoformat(),
    "command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
  }
  stem = args.stem or f"bench_gpu_{results['device']['backend']}"
  bench_update.write_results(args.out, stem, results, markdown(results), load)
  return results


if __name__ == "__main__":
  main()
