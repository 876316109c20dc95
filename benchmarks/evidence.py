"""Issue 13's experiment: every method at equal post-dense budgets, with seeds and a shared LR sweep.

Usage:
  python benchmarks/evidence.py --plan                  # the cells left and their CPU time
  python benchmarks/evidence.py                         # the sweep, then the grid (hours)
  nohup .venv/bin/python benchmarks/evidence.py --lock /tmp/cpu.lock \
      > /work/evidence_runs.log 2>&1 &                    # the same, in the background
  python benchmarks/evidence.py --only method=gsm,budget=60 --seeds 0
  python benchmarks/evidence.py --max_examples 2000 --epochs 1 --dense_epochs 1 \\
      --workdir_root /tmp/smoke --out /tmp/smoke      # a smoke run

A cell is (model, method, compression C, post-dense epochs, seed): one
``train.py`` run (``configs/evidence_lenet300.py`` plus the cell's fields) in
its own workdir ``<workdir_root>/<cell name>``, started as a subprocess, so a
crash or Ctrl-C loses at most the steps since that cell's last checkpoint and
re-running the same command resumes it (train.py's own resume). A cell whose
``summary.json`` exists (or that diverged) is not run again.

Every method starts from the same dense model per (model, seed): the dense
cell, ``method = "dense"``, trained once and loaded with
``config.dense_checkpoint``. The budget B (epochs after the dense model) is
split per method as issue 13 says:

* ``gsm``: B epochs of GSM, then the global cut with no fine-tuning; the
  reference code's 5-epoch warm-up from 0 (at most B / 4), x0.1 at 0.8 B.
* ``magnitude``: the one-shot global magnitude cut, then B epochs of masked
  fine-tuning, x0.1 at 0.8 B.
* ``gmp``: B // 2 epochs of SGD with gradual magnitude pruning (Zhu & Gupta
  2017 prune over part of training and then train the sparse model: half and
  half), then B - B // 2 epochs of masked fine-tuning, x0.1 at 0.8 of it.
* ``admm``: B // 2 epochs of ADMM W-steps (one Z/U update per epoch; per-layer
  targets of the global magnitude cut), then B - B // 2 epochs of masked
  retraining (Zhang et al. 2018: ADMM, hard prune, retrain), x0.1 at 0.8 of it.
* ``gsm_gradual`` (a GSM variant beyond the paper, train.py's ``gsm`` method):
  as ``gsm``, but C rises from 1 over the first B / 4 epochs (``gsm.ramp_epochs``,
  Zhu & Gupta's cubic), leaving 3/4 of the budget for the passive weights to decay.

The sweep comes first: every method, the same ``SWEEP_RATES``, at C = 60,
B = 60, the first seed; each method's rate with the best validation accuracy
(``config.validation_examples`` held-out training examples, never the test
set; ties to the smaller rate) is written to ``<out>/evidence_lr.json`` and
serves every cell of the grid. After each cell the runner rewrites
``<out>/evidence_raw.json`` (one record per cell and seed, with its command),
``<out>/evidence.md`` (mean +- sample std over seeds per cell) and
``<out>/evidence.png`` (the same with error bars).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

CONFIG = os.path.join(ROOT, "configs", "evidence_lenet300.py")
METHODS = ("gsm", "gsm_gradual", "magnitude", "gmp", "admm")
TRAIN_METHOD = {"gsm_gradual": "gsm"}  # the runner's variants: train.py's method
GRADUAL_RAMP = 0.25  # gsm_gradual: C reaches its target after this fraction of the budget
SWEEP_RATES = (0.01, 0.03, 0.1, 0.3)  # 0.3: three methods chose 0.1, the edge of the first sweep
SWEEP_COMPRESSION, SWEEP_BUDGET = 60.0, 60
TRAIN_EXAMPLES = 60000  # Fashion-MNIST
# Measured on 2 CPU cores, LeNet-300-100, 55,000 training examples (a 2-epoch dense cell and
# 4-epoch cells of each method at C = 60): a steady epoch takes 0.8 s (dense, fine-tuning),
# 1.05 s (GSM), 0.9 s (GMP, ADMM); a run adds 16-18 s (start, compiles, load, report).
EPOCH_SECONDS = 1.05
RUN_OVERHEAD_SECONDS = 18.0
EXIT_DIVERGED = 3


@dataclasses.dataclass(frozen=True)
class Cell:
  """One train.py run: a dense model, a sweep point or a grid cell."""

  stage: str  # "dense", "sweep" or "grid"
  method: str
  compression: float
  budget: int  # epochs after the dense model (dense: the dense epochs)
  seed: int
  learning_rate: float | None = None  # sweep cells; grid cells take the sweep's choice
  model: str = "lenet_300_100"

  @property
  def name(self) -> str:
    """The workdir below the root, and the record's key."""
    if self.stage == "dense":
      return f"{self.model}/dense/seed{self.seed}"
    cell = f"{self.method}_c{self.compression:g}_e{self.budget}"
    if self.stage == "sweep":
      cell += f"_lr{self.learning_rate:g}"
    return f"{self.model}/{self.stage}/{cell}/seed{self.seed}"

  @property
  def group(self) -> tuple[str, str, float, int]:
    """The cell without its seed: what the aggregate averages over."""
    return (self.model, self.method, self.compression, self.budget)


# --------------------------------------------------------------------------- #
# The cells
# --------------------------------------------------------------------------- #


def grid_groups() -> list[tuple[str, float, int]]:
  """(method, C, B) of issue 13: 4 C at B = 60, 2 C at B = 120, a budget curve at 60x."""
  groups = [(m, c, 60) for c in (10.0, 30.0, 60.0, 120.0) for m in METHODS]
  groups += [(m, c, 120) for c in (60.0, 120.0) for m in METHODS]
  groups += [(m, 60.0, b) for b in (15, 30) for m in ("gsm", "gmp")]
  return groups


def all_cells(seeds: Sequence[int], dense_epochs: int, epochs: int | None) -> list[Cell]:
  """The dense cells, the sweep (first seed) and the grid, in the order they run."""
  budget = lambda b: b if epochs is None else epochs  # noqa: E731
  cells = [Cell("dense", "dense", 1.0, dense_epochs, s) for s in seeds]
  cells += [
    Cell("sweep", m, SWEEP_COMPRESSION, budget(SWEEP_BUDGET), seeds[0], lr)
    for m in METHODS
    for lr in SWEEP_RATES
  ]
  groups = dict.fromkeys((m, c, budget(b)) for m, c, b in grid_groups())
  cells += [Cell("grid", m, c, b, s) for (m, c, b) in groups for s in seeds]
  return cells


def matches(cell: Cell, only: dict[str, str]) -> bool:
  """Whether every ``field=value`` of ``--only`` holds (numbers compared as numbers)."""
  for key, value in only.items():
    field = getattr(cell, key)
    if isinstance(field, (int, float)) and not isinstance(field, bool):
      if field is None or not math.isclose(float(field), float(value)):
        return False
    elif str(field) != value:
      return False
  return True


def select(cells: list[Cell], only: dict[str, str], stage: str) -> list[Cell]:
  """The cells ``--only`` and ``--stage`` pick, with the dense cells they start from."""
  picked = [
    c for c in cells if c.stage != "dense" and matches(c, only) and stage in ("all", c.stage)
  ]
  seeds = {c.seed for c in picked} | {
    c.seed for c in cells if c.stage == "dense" and matches(c, only)
  }
  dense = [c for c in cells if c.stage == "dense" and c.seed in seeds]
  return dense + picked


# --------------------------------------------------------------------------- #
# One cell: its config fields and its train.py command
# --------------------------------------------------------------------------- #


def _sgd(section: str, epochs: int, lr: float, decay: bool = True) -> dict[str, Any]:
  boundaries = (0.8 * epochs,) if decay and epochs > 0 else ()
  return {
    f"{section}.epochs": epochs,
    f"{section}.learning_rate": lr,
    f"{section}.boundaries": boundaries,
  }


def cell_fields(cell: Cell, lr: float | None, args: argparse.Namespace) -> dict[str, Any]:
  """The fields ``cell`` sets on top of ``configs/evidence_lenet300.py``."""
  fields: dict[str, Any] = {"seed": cell.seed, "method": TRAIN_METHOD.get(cell.method, cell.method)}
  fields.update(data_fields(args))
  d = args.dense_epochs
  fields.update({"dense.epochs": d, "dense.boundaries": tuple(b for b in (0.5 * d, 0.77 * d) if b)})
  fields["dense.warmup_epochs"] = min(2.0, 0.5 * d)
  if cell.stage == "dense":
    return fields
  b, half = cell.budget, max(1, cell.budget // 2)
  fields["compression"] = cell.compression
  fields["dense_checkpoint"] = os.path.join(args.workdir_root, dense_name(cell))
  steps = max(1, (args.max_examples or TRAIN_EXAMPLES) - fields["validation_examples"]) // 256
  if cell.method in ("gsm", "gsm_gradual"):
    fields.update(_sgd("gsm", b, lr))
    fields["gsm.warmup_epochs"] = min(5.0, b / 4)
    if cell.method == "gsm_gradual":
      fields["gsm.ramp_epochs"] = GRADUAL_RAMP * b
  elif cell.method == "magnitude":
    fields.update(_sgd("finetune", b, lr))
  else:
    fields.update(_sgd(cell.method, half, lr, decay=False))
    fields.update(_sgd("finetune", b - half, lr))
    if cell.method == "gmp":
      fields["gmp.update_every_steps"] = max(1, steps // 4)
    else:
      fields["admm.steps_per_iteration"] = max(1, steps)
  return fields


def data_fields(args: argparse.Namespace) -> dict[str, Any]:
  """Where the data are, and the subset: all of it, or ``--max_examples`` with a fifth held out."""
  where = {"data_dir": args.data_dir} if args.data_dir else {}
  if args.max_examples is None:
    return where | {"validation_examples": args.validation_examples or 5000}
  return where | {
    "max_train_examples": args.max_examples,
    "max_test_examples": args.max_examples,
    "validation_examples": args.validation_examples or args.max_examples // 5,
  }


def dense_name(cell: Cell) -> str:
  return Cell("dense", "dense", 1.0, 0, cell.seed, model=cell.model).name


def command(cell: Cell, fields: dict[str, Any], workdir: str) -> list[str]:
  """The train.py command line of one cell."""
  flags = [f"--config.{key}={_flag(value)}" for key, value in fields.items()]
  return [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    f"--config={CONFIG}",
    f"--workdir={workdir}",
    *flags,
  ]


def _flag(value: Any) -> str:
  if isinstance(value, tuple):
    return "(" + "".join(f"{v!r}," for v in value) + ")"
  return str(value)


# --------------------------------------------------------------------------- #
# Running
# --------------------------------------------------------------------------- #


def run_cell(argv: list[str], workdir: str, lock: str | None = None) -> int:
  """train.py as a subprocess, its output appended to ``workdir/train.log``; its exit code.

  With ``lock`` the run holds ``flock(lock)`` (others sharing the CPUs wait for
  the cell, not the whole experiment). Ctrl-C reaches the child too (same
  process group): the runner waits while it checkpoints, then stops.
  """
  os.makedirs(workdir, exist_ok=True)
  with contextlib.ExitStack() as stack:
    log = stack.enter_context(open(os.path.join(workdir, "train.log"), "a"))
    if lock:
      fcntl.flock(stack.enter_context(open(lock, "a")), fcntl.LOCK_EX)
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    while True:
      try:
        return process.wait()
      except KeyboardInterrupt:
        continue


def record(cell: Cell, lr: float | None, argv: list[str], workdir: str, status: str) -> dict:
  """One raw record: the cell, its command, its status and the summary's accuracies."""
  rec = dataclasses.asdict(cell) | {"name": cell.name, "learning_rate": lr, "status": status}
  config = f"--config={os.path.relpath(CONFIG, ROOT)}"  # from the repository root
  rec["command"] = shlex.join(["python", "train.py", config, *argv[3:]])
  path = os.path.join(workdir, "summary.json")
  if status == "done":
    with open(path) as f:
      summary = json.load(f)
    keys = (
      "dense_accuracy",
      "dense_validation_accuracy",
      "accuracy_before_prune",
      "accuracy_after_prune",
      "accuracy_final",
      "validation_accuracy_final",
      "num_train",
      "num_validation",
      "num_test",
      "keep",
      "nonzeros",
      "compression_reached",
      "epochs",
      "wall_time_s",
    )
    rec.update({key: summary[key] for key in keys})
  return rec


def read_json(path: str, empty: Any) -> Any:
  if not os.path.exists(path):
    return empty
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Any) -> None:
  """Atomically (a temporary file, then a rename)."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
    f.write("\n")
  os.replace(path + ".tmp", path)


def chosen_rates(records: list[dict]) -> dict[str, float]:
  """Per method whose sweep is complete: the rate of best validation accuracy (ties: smaller)."""
  chosen = {}
  for method in METHODS:
    mine = [r for r in records if r["method"] == method]
    if len(mine) < len(SWEEP_RATES):
      continue
    done = [r for r in mine if r["status"] == "done"]
    if done:
      best = max(done, key=lambda r: (r["validation_accuracy_final"], -r["learning_rate"]))
      chosen[method] = best["learning_rate"]
  return chosen


# --------------------------------------------------------------------------- #
# The aggregate: Markdown table and plot
# --------------------------------------------------------------------------- #


def aggregate(records: list[dict]) -> list[dict[str, Any]]:
  """Per (model, method, C, B): seeds, mean and sample std (ddof 1; 0 for one seed)."""
  groups: dict[tuple, list[dict]] = {}
  for r in records:
    if r["stage"] == "grid" and r["status"] == "done":
      groups.setdefault((r["model"], r["method"], r["compression"], r["budget"]), []).append(r)
  rows = []
  for (model, method, c, b), rs in sorted(groups.items()):
    row = {"model": model, "method": method, "compression": c, "budget": b, "seeds": len(rs)}
    row["learning_rate"] = rs[0]["learning_rate"]
    for key in ("accuracy_final", "validation_accuracy_final", "dense_accuracy"):
      values = np.array([r[key] for r in rs], np.float64)
      row[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    rows.append(row)
  return rows


def markdown(rows: list[dict[str, Any]], rates: dict[str, float]) -> str:
  """The aggregate table (accuracies in %, mean +- std over seeds)."""
  lines = [
    "# Issue 13 evidence: equal post-dense budgets, mean +- std over seeds",
    "",
    "Generated by `python benchmarks/evidence.py`; raw per-seed records with their "
    "commands: `evidence_raw.json`; learning rates chosen on the validation split: "
    f"{', '.join(f'{m} {lr:g}' for m, lr in rates.items()) or 'none yet'}.",
    "",
    "| model | C | epochs | method | lr | seeds | test accuracy % | validation accuracy % "
    "| dense test accuracy % |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    cells = [f"{100 * r[k][0]:.2f} ± {100 * r[k][1]:.2f}" for k in _ACCURACIES]
    lines.append(
      f"| {r['model']} | {r['compression']:g} | {r['budget']} | {r['method']} | "
      f"{r['learning_rate']:g} | {r['seeds']} | {' | '.join(cells)} |"
    )
  return "\n".join(lines) + "\n"


_ACCURACIES = ("accuracy_final", "validation_accuracy_final", "dense_accuracy")


def plot(rows: list[dict[str, Any]], path: str) -> None:
  """Test accuracy vs C (one line per method and budget) and vs budget at each C, error bars."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, x, line in ((axes[0], "compression", "budget"), (axes[1], "budget", "compression")):
    keys = sorted({(r["method"], r[line]) for r in rows})
    for method, value in keys:
      rs = sorted(
        (r for r in rows if (r["method"], r[line]) == (method, value)), key=lambda r: r[x]
      )
      if len(rs) < 2 and ax is axes[1]:
        continue
      ax.errorbar(
        [r[x] for r in rs],
        [100 * r["accuracy_final"][0] for r in rs],
        yerr=[100 * r["accuracy_final"][1] for r in rs],
        marker="o",
        capsize=3,
        label=f"{method}, {line} {value:g}",
      )
    ax.set_xscale("log")
    ax.set_xlabel({"compression": "compression C", "budget": "epochs after the dense model"}[x])
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    if ax.lines:
      ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(out: str, records: list[dict], rates: dict[str, float]) -> None:
  """evidence_raw.json, evidence.md and evidence.png from the records so far."""
  write_json(os.path.join(out, "evidence_raw.json"), {"records": records})
  rows = aggregate(records)
  with open(os.path.join(out, "evidence.md"), "w") as f:
    f.write(markdown(rows, rates))
  if rows:
    plot(rows, os.path.join(out, "evidence.png"))


# --------------------------------------------------------------------------- #
# Plan and main
# --------------------------------------------------------------------------- #


def cell_seconds(cell: Cell, args: argparse.Namespace) -> float:
  """Estimated CPU wall time: epochs x the measured epoch time (scaled by examples) + overhead."""
  examples = args.max_examples or TRAIN_EXAMPLES
  return cell.budget * args.epoch_seconds * examples / TRAIN_EXAMPLES + RUN_OVERHEAD_SECONDS


def is_done(cell: Cell, args: argparse.Namespace, known: dict[str, dict]) -> bool:
  workdir = os.path.join(args.workdir_root, cell.name)
  diverged = known.get(cell.name, {}).get("status") == "diverged"
  return diverged or os.path.exists(os.path.join(workdir, "summary.json"))


def print_plan(cells: list[Cell], args: argparse.Namespace, known: dict[str, dict]) -> None:
  todo = [c for c in cells if not is_done(c, args, known)]
  for c in todo:
    print(f"{c.name}  ~{cell_seconds(c, args) / 60:.1f} min")
  total = sum(cell_seconds(c, args) for c in todo)
  print(
    f"{len(todo)} of {len(cells)} cells to run, {sum(c.budget for c in todo)} epochs: "
    f"~{total / 3600:.1f} h at {args.epoch_seconds:g} s per full epoch "
    f"+ {RUN_OVERHEAD_SECONDS:g} s per run"
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir_root", default="/work/evidence_runs")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  p.add_argument("--stage", choices=("all", "sweep", "grid"), default="all")
  p.add_argument("--only", default="", help="field=value,... over the cell fields")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--plan", action="store_true", help="print the cells left and the time")
  p.add_argument("--data_dir", default=None, help="config.data_dir (None: the default places)")
  p.add_argument("--max_examples", type=int, default=None, help="smoke runs: a data subset")
  p.add_argument("--validation_examples", type=int, default=None)
  p.add_argument("--epochs", type=int, default=None, help="smoke runs: every budget")
  p.add_argument("--dense_epochs", type=int, default=30)
  p.add_argument("--learning_rate", type=float, default=None, help="smoke runs: skip the sweep")
  p.add_argument("--lock", default=None, help="a file each cell holds flock on (shared CPUs)")
  p.add_argument("--epoch_seconds", type=float, default=EPOCH_SECONDS)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  args.workdir_root = os.path.abspath(args.workdir_root)
  only = dict(item.split("=", 1) for item in args.only.split(",") if item)
  seeds = [int(s) for s in args.seeds.split(",")]
  cells = select(all_cells(seeds, args.dense_epochs, args.epochs), only, args.stage)
  os.makedirs(args.out, exist_ok=True)
  raw_path, lr_path = (os.path.join(args.out, f) for f in ("evidence_raw.json", "evidence_lr.json"))
  records = read_json(raw_path, {"records": []})["records"]
  sweep = read_json(lr_path, {"records": [], "chosen": {}}) | {"rates": list(SWEEP_RATES)}
  sweep["chosen"] = chosen_rates(sweep["records"])  # the rates may have grown since
  known = {r["name"]: r for r in records + sweep["records"]}
  if args.plan:
    print_plan(cells, args, known)
    return 0
  for cell in cells:
    if is_done(cell, args, known) and cell.name in known:
      continue
    lr = cell.learning_rate
    if cell.stage == "grid":
      lr = args.learning_rate or sweep["chosen"].get(cell.method)
      if lr is None:
        print(f"{cell.name}: no learning rate chosen for {cell.method} yet: run the sweep first")
        continue
    workdir = os.path.join(args.workdir_root, cell.name)
    argv_ = command(cell, cell_fields(cell, lr, args), workdir)
    if not os.path.exists(os.path.join(workdir, "summary.json")):
      print(f"{time.strftime('%H:%M:%S')} {cell.name}", flush=True)
      code = run_cell(argv_, workdir, args.lock)
      if code in (130, 143):
        print(f"stopped by a signal in {cell.name}; run the same command again to resume")
        return code
      if code not in (0, EXIT_DIVERGED):
        print(f"{cell.name}: train.py exited {code}; see {workdir}/train.log")
        continue
    status = "diverged" if not os.path.exists(os.path.join(workdir, "summary.json")) else "done"
    rec = record(cell, lr, argv_, workdir, status)
    known[cell.name] = rec
    if cell.stage == "sweep":
      sweep["records"] = sorted(
        [r for r in sweep["records"] if r["name"] != cell.name] + [rec], key=lambda r: r["name"]
      )
      sweep["chosen"] = chosen_rates(sweep["records"])
      write_json(lr_path, sweep)
    else:
      records = sorted(
        [r for r in records if r["name"] != cell.name] + [rec], key=lambda r: r["name"]
      )
    write_outputs(args.out, records, sweep["chosen"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
