"""Times a train.py dense epoch against the same number of bare jitted train steps.

The program's epoch: ``training.train_lib.train_and_evaluate`` with ``method =
"dense"`` and two dense epochs of LeNet-300-100 on the full Fashion-MNIST
training set (60,000 images, batch 256: 234 steps) in a fresh workdir, progress
bar on (to /dev/null), as a user runs it; an epoch's time is its step in the
``wall_time_s`` of metrics.jsonl: the batch loop, then the test evaluation. The
second epoch is the one compared (a run's first epoch also pays for the first
calls after its setup; it is reported too). The reference: the program's own
compiled train step (``training.steps.make_phase``) called 234 times back to
back on one batch already on the device, then one block. The headline ratio is
the epoch without its test evaluation (timed alone) over the bare steps; the
samples are interleaved (each round in a rotated order), and the medians kept.

Where the time goes: the parts of the epoch timed alone, one epoch's worth
each: the numpy batches (``Dataset.train_batches``), their ``device_put``
(``distributed.global_batch``), the separate metric accumulation, the tqdm bar,
the steps fed by host batches, the steps drawing their batches from the
training set on the device (``training.device_data``, when present), the test
evaluation, one checkpoint and the upload of the training set.

  python benchmarks/bench_epoch.py               # 9 samples
  python benchmarks/bench_epoch.py --repeats 3   # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any
from typing import Callable

# Repository code (models/, training/, configs/) is not installed: run from the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import flax  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import bench_update  # noqa: E402
from benchmarks import machine  # noqa: E402
from configs import default  # noqa: E402
from training import checkpoints  # noqa: E402
from training import data  # noqa: E402
from training import distributed  # noqa: E402
from training import steps  # noqa: E402
from training import train_lib  # noqa: E402

HAS_DEVICE_DATA = importlib.util.find_spec("training.device_data") is not None


def epoch_config(data_dir: str | None) -> ml_collections.ConfigDict:
  """The default config, reduced to one dense epoch of the full training set."""
  config = default.get_config()
  config.method = "dense"
  config.dense.epochs = 2
  config.plots = False
  config.data_dir = data_dir
  return config


def program_epochs(config: ml_collections.ConfigDict) -> list[float]:
  """One run of the program in a fresh workdir (stdout, stderr muted); seconds per epoch."""
  with tempfile.TemporaryDirectory() as workdir, open(os.devnull, "w") as null:
    with contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
      train_lib.train_and_evaluate(config, os.path.join(workdir, "run"))
    with open(os.path.join(workdir, "run", "metrics.jsonl")) as f:
      walls = [json.loads(line)["wall_time_s"] for line in f]
  return [later - earlier for earlier, later in zip([0.0, *walls], walls)]


class Parts:
  """The program's pieces for one epoch, built as ``train_and_evaluate`` builds them."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.topology = distributed.make_topology(config)
    self.dataset = data.load_dataset(config.dataset, data_dir=config.data_dir)
    self.num_steps = self.dataset.steps_per_epoch(config.batch_size)
    graphdef, eval_graphdef, params, batch_stats = steps.init_model(
      config.model, self.dataset.num_classes, config.seed
    )
    self.phase = steps.make_phase(
      "dense", steps.optimizer, config.dense, self.num_steps, graphdef, mesh=self.topology.mesh
    )
    self.eval_step = steps.make_eval_step(eval_graphdef)
    fresh = steps.new_train_state(params, batch_stats, config.seed)
    self.state = distributed.place(
      fresh._replace(opt_state=self.phase.tx.init(params)), self.topology.mesh
    )
    self.host = list(self.batches())
    self.batch = distributed.global_batch(self.host[0], self.topology)
    self.train_set = None
    if HAS_DEVICE_DATA:
      from training import device_data  # pylint: disable=g-import-not-at-top

      self.train_set = device_data.upload(self.dataset, self.topology)
      self.order = device_data.epoch_order(
        self.dataset,
        config.batch_size,
        epoch=0,
        seed=config.seed,
        start=0,
        step=int(self.state.step),
        topology=self.topology,
      )
      self.draw = device_data.drawing(self.phase.train_step, self.topology.mesh)

  def batches(self):
    return self.dataset.train_batches(self.config.batch_size, epoch=0, seed=self.config.seed)

  def bare_steps(self) -> None:
    """The reference: the compiled step on one device batch, back to back, one block."""
    state, metrics = self.state, None
    for _ in range(self.num_steps):
      state, metrics = self.phase.train_step(state, self.batch)
    jax.block_until_ready((state, metrics))

  def host_batches(self) -> None:
    for _ in self.batches():
      pass

  def device_put(self) -> None:
    jax.block_until_ready([distributed.global_batch(b, self.topology) for b in self.host])

  def accumulate(self) -> None:
    _, metrics = self.phase.train_step(self.state, self.batch)
    totals = steps.totals_to_device(steps.zero_totals())
    for _ in range(self.num_steps):
      totals = steps.accumulate(totals, metrics)
    jax.block_until_ready(totals)

  def progress_bar(self) -> None:
    with open(os.devnull, "w") as null:
      bar = tqdm(total=self.num_steps, file=null, dynamic_ncols=True)
      for i in range(self.num_steps):
        bar.update(1)
        if (i + 1) % self.config.log_every_steps == 0:
          bar.set_postfix({"loss": "0.1234", "acc": "0.5678"}, refresh=False)
      bar.close()

  def host_fed_steps(self) -> None:
    """The steps fed as the host-batch loop feeds them: numpy batch, device_put, step."""
    state, metrics = self.state, None
    for batch in self.batches():
      state, metrics = self.phase.train_step(state, distributed.global_batch(batch, self.topology))
    jax.block_until_ready((state, metrics))

  def device_fed_steps(self) -> None:
    """The steps drawing their batches from the training set on the device."""
    state, totals = self.state, steps.totals_to_device(steps.zero_totals())
    for _ in range(self.num_steps):
      state, metrics = self.draw(state, self.train_set, self.order)
      totals = steps.accumulate(totals, metrics)
    jax.block_until_ready((state, totals))

  def upload(self) -> None:
    from training import device_data  # pylint: disable=g-import-not-at-top

    device_data.upload(self.dataset, self.topology)

  def evaluate(self) -> None:
    steps.evaluate(
      self.eval_step,
      self.state.params,
      self.state.batch_stats,
      self.dataset,
      self.config.eval_batch_size,
      self.topology,
    )

  def checkpoint(self) -> None:
    with tempfile.TemporaryDirectory() as directory:
      saver = checkpoints.Checkpointer(directory, log=lambda _: None)
      saver.save(self.num_steps, self.state, {"phase": "dense"})
      saver.close()


def timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def measure(config: ml_collections.ConfigDict, repeats: int) -> dict[str, Any]:
  """Median seconds of every part, sampled round-robin (each round in a rotated order)."""
  parts = Parts(config)
  pieces: dict[str, Callable[[], Any]] = {
    "bare_steps": parts.bare_steps,
    "evaluate": parts.evaluate,
    "host_batches": parts.host_batches,
    "device_put": parts.device_put,
    "accumulate": parts.accumulate,
    "progress_bar": parts.progress_bar,
    "host_fed_steps": parts.host_fed_steps,
    "checkpoint": parts.checkpoint,
  }
  if parts.train_set is not None:
    pieces["device_fed_steps"] = parts.device_fed_steps
    pieces["upload"] = parts.upload
  names = ("epoch", "epoch_loop", "first_epoch", *pieces)
  samples: dict[str, list[float]] = {name: [] for name in names}
  order = ["program", *pieces]
  for round_ in range(repeats + 1):
    times, epochs = {}, []
    for name in order[round_ % len(order) :] + order[: round_ % len(order)]:  # rotated
      if name == "program":
        epochs = program_epochs(config)
      else:
        times[name] = timed(pieces[name])
    if round_ == 0:
      continue  # warm-up: compiles, caches
    first, epoch = epochs
    samples["epoch"].append(epoch)
    samples["epoch_loop"].append(epoch - times["evaluate"])
    samples["first_epoch"].append(first)
    for name, seconds in times.items():
      samples[name].append(seconds)
    print(f"sample {round_}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in samples.items()))
  medians = {name: statistics.median(values) for name, values in samples.items()}
  return {
    "steps": parts.num_steps,
    "batch_size": config.batch_size,
    "num_train": parts.dataset.num_train,
    "data_source": parts.dataset.source,
    "median_s": medians,
    "samples_s": samples,
    "ratio_loop_over_bare": medians["epoch_loop"] / medians["bare_steps"],
    "ratio_epoch_over_bare": medians["epoch"] / medians["bare_steps"],
  }


DESCRIPTIONS = {
  "epoch": "train.py dense epoch 2 (metrics.jsonl wall_time_s: batch loop + test evaluation)",
  "epoch_loop": "the same without the test evaluation (epoch - evaluate)",
  "first_epoch": "train.py dense epoch 1 (the first calls after the run's setup)",
  "bare_steps": "**reference**: the compiled step, one batch on the device, back to back",
  "evaluate": "test evaluation (10,000 images, batch 1000)",
  "host_batches": "numpy batches: permutation, gather, normalise",
  "device_put": "`distributed.global_batch` of every batch",
  "accumulate": "a separate `accumulate` call per step",
  "progress_bar": "tqdm: one `update` per step",
  "host_fed_steps": "steps fed host batches (numpy + device_put + step)",
  "device_fed_steps": "steps drawing batches from the training set on the device, + accumulate",
  "checkpoint": "one checkpoint (once per epoch, outside wall_time_s)",
  "upload": "the training set put on the device, normalised (once per run, before its epochs)",
}


def markdown(results: dict[str, Any]) -> str:
  r = results["epoch"]
  n = r["steps"]
  lines = [
    f"LeNet-300-100, {r['num_train']:,} Fashion-MNIST training images, batch "
    f"{r['batch_size']}: {n} steps an epoch.",
    "",
    f"**train.py epoch loop / {n} bare jitted steps: {r['ratio_loop_over_bare']:.3f}x** "
    f"(with the test evaluation: {r['ratio_epoch_over_bare']:.3f}x)",
    "",
    f"| what ({n} steps' worth) | median s | / bare steps |",
    "|---|---:|---:|",
  ]
  bare = r["median_s"]["bare_steps"]
  for name, seconds in r["median_s"].items():
    lines.append(f"| {DESCRIPTIONS[name]} | {seconds:.3f} | {seconds / bare:.3f} |")
  lines += [
    "",
    f"{results['machine']}; {results['versions']}; load average at start "
    f"{results['load_average']}; median of {results['repeats']} samples, interleaved "
    f"round-robin, each round in a rotated order, after a warm-up round. Data: {r['data_source']}. Command: "
    f"`{results['command']}`.",
  ]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--data_dir", default=None, help="default: as train.py finds the data")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  load = machine.LoadWatch()
  device = jax.devices()[0]
  results: dict[str, Any] = dict(
    machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {device.platform} "
    f"({device.device_kind}, {jax.device_count()} device(s))",
    versions=f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
    f"numpy {np.__version__}, python {platform.python_version()}",
    load_average=", ".join(f"{x:.2f}" for x in os.getloadavg()),
    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    repeats=args.repeats,
    command="python benchmarks/bench_epoch.py"
    + ("" if args.repeats == 9 else f" --repeats {args.repeats}")
    + ("" if args.data_dir is None else f" --data_dir {args.data_dir}"),
  )
  results["epoch"] = measure(epoch_config(args.data_dir), args.repeats)
  bench_update.write_results(args.out, "bench_epoch", results, markdown(results), load)


if __name__ == "__main__":
  main()
