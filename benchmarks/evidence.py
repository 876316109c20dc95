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

The other GSM variants (``VARIANTS``, all train.py's ``gsm`` method) are not
swept: they take gsm's chosen rate (``RATE_OF``), so none is tuned more than
the paper's rule. Their hyperparameters are fixed before any run:

* ``gsm_ema``: the mask from an exponential average of the score,
  ``gsm.score_ema = 0.9`` (snip_momentum's default in Intel Neural Compressor).
* ``gsm_age``: weights passive for a whole epoch decay 5x as fast
  (``gsm.passive_decay_growth = 4``, ``gsm.passive_decay_horizon_epochs = 1``).
* ``gsm_ft``: GSM for B - B // 6 epochs, the cut, then B // 6 epochs of masked
  fine-tuning (``gsm.finetune``) at magnitude's chosen fine-tuning rate. It is
  no longer "no retraining".

``--model lenet5`` runs LeNet-5 (``configs/evidence_lenet5.py``) at 125x and
300x with B = 60 for every method and variant. ``--rates_from`` takes the chosen
rates of an earlier sweep (the LeNet-300-100 one: issue 13 sweeps once) instead
of sweeping. The ticket stage (``--stage ticket``, after the grid) retrains
theta_0 * mask with the dense schedule (the lottery-ticket protocol of the
paper's Table 4): the mask of the dense model's magnitudes
(``ticket_magnitude``) or of the grid's ``gsm`` cell at B = 60 (``ticket_gsm``).

``--model gpt_austen`` (issue 23) runs the byte-level GPT on Jane Austen
(``configs/evidence_gpt.py``: the tiny size, context 64, 100-step epochs, AdamW
with a cosine schedule in every section): one 8-epoch dense model per seed,
then B = 4 epochs (400 steps) for its ``TRANSFORMERS`` methods at 2x, 4x and 10x over the
pooled attention and MLP kernels: ``gsm`` (GSM with AdamW, passive weights
shrinking to exp(-10) over the budget), ``gsm_sgd`` (the paper's momentum SGD,
beta 0.99 Nesterov, wd 5e-4, with the same passive shrink), ``gmp`` (2 + 2
epochs) and ``magnitude`` (4 epochs of fine-tuning). Its sweep is at C = 10 on
the first seed with ``LM_SWEEP_RATES`` per optimizer, chosen on the validation
split's bits per byte (lower is better). ``--grid structured`` with it runs
2:4 GSM against magnitude 2:4 + retraining on every pooled kernel; structured
GSM takes gsm's passive rule (passive weights shrink to exp(-10) over the
budget: ``gsm_optax.gsm_nm_adamw``, ``gsm_channel_groups_adamw``).
``--grid channels`` with it runs channel GSM against L1 + fine-tuning (C = 2)
with a channel an MLP neuron (``gsm_neurons``, ``l1_neurons``) or an attention
head (``gsm_heads``, ``l1_heads``), ranked over every block.
``--model vit_fashion`` runs the tiny ViT on Fashion-MNIST
(``configs/evidence_vit.py``, 5,000 training images held out for the sweep):
GSM with AdamW against GMP at 10x and 30x, 6 epochs after a 6-epoch dense model.
``--grid ramp`` runs gradual GSM on LeNet-300-100 at 60x and 120x with its
ramp ending at B / 4 (``gsm_gradual``), B / 8 and B / 16 (``RAMPS``), all at
gsm_gradual's chosen rate.

``--jobs N`` runs N cells at a time (an accelerator machine with many cores;
cells wait for the dense models, the sweep and the grid cells they start from);
``--deadline S`` starts no cell after S seconds, so a time-limited run returns
its finished cells. ``--tag`` names the outputs (``<tag>_raw.json``, ...).

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
from concurrent import futures
import contextlib
import dataclasses
import fcntl
import functools
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

from training import strict_json  # noqa: E402

CONFIGS = {
  "lenet_300_100": os.path.join(ROOT, "configs", "evidence_lenet300.py"),
  "lenet5": os.path.join(ROOT, "configs", "evidence_lenet5.py"),
  "gpt_austen": os.path.join(ROOT, "configs", "evidence_gpt.py"),
  "vit_fashion": os.path.join(ROOT, "configs", "evidence_vit.py"),
}
# The metric a model's cells are compared on (summary.json's ``<metric>_final`` and twins),
# and whether larger is better.
METRIC = {
  "lenet_300_100": "accuracy",
  "lenet5": "accuracy",
  "gpt_austen": "bits_per_byte",
  "vit_fashion": "accuracy",
}
LARGER_IS_BETTER = {"accuracy": True, "bits_per_byte": False}
METHODS = ("gsm", "gsm_gradual", "magnitude", "gmp", "admm")  # swept
VARIANTS = ("gsm_ema", "gsm_age", "gsm_ft")  # GSM variants, not swept: gsm's rate
TICKETS = ("ticket_magnitude", "ticket_gsm")
STRUCTURED = ("gsm_channels", "filter_l1", "gsm_nm", "magnitude_nm")  # --grid structured
RATE_OF = {v: "gsm" for v in VARIANTS} | {
  "gsm_channels": "gsm",
  "gsm_nm": "gsm",
  "filter_l1": "magnitude",
  "magnitude_nm": "magnitude",
}
# LeNet-5's channel cells prune conv2's 50 channels only, so a C fixes the MACs for every method
# (conv1's 20 channels feed conv2 and carry 13% of the MACs): int(50 / 2.38) = 21 channels,
# 1,133,000 MACs, 2.02x fewer than 2,293,000; int(50 / 7.1) = 7, 573,000 MACs, 4.00x fewer.
CHANNEL_COMPRESSIONS = {"lenet5": (2.38, 7.1), "lenet_300_100": ()}
STRUCTURED_FIELDS = {  # LeNet-5's conv1 has 1 input channel: no group of 4 along it
  "lenet5": {"channels.layers": "conv2", "nm.layers": "conv2,fc1,fc2"},
  "lenet_300_100": {},
}
NM_COMPRESSION = 2.0  # 2:4 keeps half the pool: the C in an N:M cell's name
# Issue 23's lead: gradual GSM whose ramp ends earlier (C reached at B / 8, B / 16), gsm_gradual's rate.
RAMPS = {"gsm_gradual": 0.25, "gsm_ramp8": 0.125, "gsm_ramp16": 0.0625}
RATE_OF |= {"gsm_ramp8": "gsm_gradual", "gsm_ramp16": "gsm_gradual"}


@dataclasses.dataclass(frozen=True)
class TransformerGrid:
  """Issue 23's grid of a transformer (AdamW sections): methods x C at one budget B (epochs
  after a ``dense_epochs`` dense model), swept at C = ``sweep_compression`` on the first seed."""

  methods: tuple[str, ...]
  compressions: tuple[float, ...]
  budget: int
  dense_epochs: int
  sweep_compression: float = 10.0
  epoch_seconds: float = 13.0  # 2 CPU cores, for --plan
  run_overhead_seconds: float = 35.0
  more_rates: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (method, rates) swept besides


# The language model: GSM with AdamW, GSM with the paper's momentum SGD, GMP and magnitude +
# fine-tuning (AdamW), at 2x, 4x and 10x over the pooled kernels, 4 epochs of 100 steps after
# an 8-epoch dense model (the tiny GPT on 2 Xeon cores, loaded: 12.5 s per epoch, ~35 s more
# per run: start, compiles, the dense model's load, four evaluations of the test split). The
# ViT: GSM with AdamW against GMP at 10x and 30x, 6 epochs after a 6-epoch dense model.
TRANSFORMERS = {
  "gpt_austen": TransformerGrid(
    ("gsm", "gsm_sgd", "gmp", "magnitude"),
    (2.0, 4.0, 10.0),
    4,
    8,
    # gsm and magnitude chose 1e-2, the largest AdamW rate, again: one more for each
    more_rates=(("gsm", (3e-2,)), ("magnitude", (3e-2,))),
  ),
  "vit_fashion": TransformerGrid(
    ("gsm", "gmp"), (10.0, 30.0), 6, 6, epoch_seconds=14.0, more_rates=(("gsm", (3e-2,)),)
  ),
}
# Transformer channels (--grid channels): MLP neurons or attention heads as channel groups
# (config.channels.groups), GSM against L1 + fine-tuning, C = 2 (half the neurons / heads).
GROUP_METHODS = {
  "gsm_neurons": ("gsm_channels", "neurons"),
  "l1_neurons": ("filter_l1", "neurons"),
  "gsm_heads": ("gsm_channels", "heads"),
  "l1_heads": ("filter_l1", "heads"),
}
GROUP_COMPRESSION = 2.0
RATE_OF |= {"gsm_neurons": "gsm", "gsm_heads": "gsm", "l1_neurons": "magnitude"}
RATE_OF |= {"l1_heads": "magnitude"}
# 1e-2 and 0.3 were added when GSM chose the largest rate of each first sweep (3e-3, 0.1).
LM_SWEEP_RATES = {"adamw": (3e-4, 1e-3, 3e-3, 1e-2), "sgd": (0.01, 0.03, 0.1, 0.3)}
GSM_SGD = {"optimizer": "sgd", "momentum": 0.99, "nesterov": True, "weight_decay": 5e-4}
TRAIN_METHOD = {m: "gsm" for m in ("gsm_sgd", *RAMPS, *VARIANTS)} | dict.fromkeys(
  TICKETS, "lottery"
)
TRAIN_METHOD |= {m: method for m, (method, _) in GROUP_METHODS.items()}
SCORE_EMA = 0.9  # gsm_ema
PASSIVE_GROWTH, PASSIVE_HORIZON_EPOCHS = 4.0, 1.0  # gsm_age
FINETUNE_SHARE = 6  # gsm_ft: the last B // 6 epochs fine-tune
TICKET_COMPRESSIONS = {"lenet_300_100": (60.0,), "lenet5": (125.0, 300.0)}
TICKET_SOURCE_BUDGET = 60  # the gsm grid cell whose final model gives the GSM ticket
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

  stage: str  # "dense", "sweep", "grid" or "ticket"
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
    if self.stage == "ticket":
      cell = f"{self.method}_c{self.compression:g}"
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


def grid_groups(
  model: str = "lenet_300_100", grid: str = "methods"
) -> list[tuple[str, float, int]]:
  """(method, C, B) of issue 13 (``grid="methods"``), of issue 14 (``"structured"``) or of
  issue 23 (the LM's methods and 2:4; ``"ramp"``: gradual GSM's ramps on LeNet-300-100).

  LeNet-300-100: 4 C at B = 60, 2 C at B = 120, a budget curve at 60x, then the
  variants at 60x and 120x, B = 60. LeNet-5: every method and variant at 125x
  and 300x, B = 60. Structured: channel GSM and L1 filter pruning at 2x and 4x
  fewer MACs (LeNet-5), 2:4 GSM and magnitude 2:4 (both), B = 60.
  """
  if grid == "ramp":
    return [(m, c, 60) for c in (60.0, 120.0) for m in RAMPS]
  if model in TRANSFORMERS:
    t = TRANSFORMERS[model]
    if grid == "structured":
      return [(m, NM_COMPRESSION, t.budget) for m in STRUCTURED[2:]]
    if grid == "channels":
      return [(m, GROUP_COMPRESSION, t.budget) for m in GROUP_METHODS]
    return [(m, c, t.budget) for c in t.compressions for m in t.methods]
  if grid == "structured":
    groups = [(m, c, 60) for c in CHANNEL_COMPRESSIONS[model] for m in STRUCTURED[:2]]
    return groups + [(m, NM_COMPRESSION, 60) for m in STRUCTURED[2:]]
  if model == "lenet5":
    return [(m, c, 60) for c in (125.0, 300.0) for m in METHODS + VARIANTS]
  groups = [(m, c, 60) for c in (10.0, 30.0, 60.0, 120.0) for m in METHODS]
  groups += [(m, c, 120) for c in (60.0, 120.0) for m in METHODS]
  groups += [(m, 60.0, b) for b in (15, 30) for m in ("gsm", "gmp")]
  groups += [(m, c, 60) for c in (60.0, 120.0) for m in VARIANTS]
  return groups


def all_cells(
  seeds: Sequence[int],
  dense_epochs: int,
  epochs: int | None,
  model: str = "lenet_300_100",
  sweep: bool = True,
  grid: str = "methods",
) -> list[Cell]:
  """The dense cells, the sweep (first seed), the grid and the tickets, in the order they run."""
  budget = lambda b: b if epochs is None else epochs  # noqa: E731
  cells = [Cell("dense", "dense", 1.0, dense_epochs, s, model=model) for s in seeds]
  if grid in (
    "structured",
    "ramp",
    "channels",
  ):  # the rates of an earlier sweep (--rates_from), no tickets
    groups = dict.fromkeys((m, c, budget(b)) for m, c, b in grid_groups(model, grid))
    return cells + [Cell("grid", m, c, b, s, model=model) for s in seeds for (m, c, b) in groups]
  if sweep:
    compression, sweep_budget = sweep_point(model)
    cells += [
      Cell("sweep", m, compression, budget(sweep_budget), seeds[0], lr, model)
      for m, rates in sweep_rates(model).items()
      for lr in rates
    ]
  groups = dict.fromkeys((m, c, budget(b)) for m, c, b in grid_groups(model))
  if model in TRANSFORMERS:  # no tickets
    return cells + [Cell("grid", m, c, b, s, model=model) for s in seeds for (m, c, b) in groups]
  # Seed-major: a run cut short (--deadline) has every group at its first seeds.
  cells += [Cell("grid", m, c, b, s, model=model) for s in seeds for (m, c, b) in groups]
  cells += [
    Cell("ticket", t, c, dense_epochs, s, model=model)
    for c in TICKET_COMPRESSIONS[model]
    for t in TICKETS
    for s in seeds
  ]
  return cells


def sweep_rates(model: str) -> dict[str, tuple[float, ...]]:
  """The swept methods and their rates: SGD's for the images, per optimizer for the LM."""
  if model in TRANSFORMERS:
    t = TRANSFORMERS[model]
    more = dict(t.more_rates)
    return {
      m: LM_SWEEP_RATES["sgd" if m == "gsm_sgd" else "adamw"] + more.get(m, ()) for m in t.methods
    }
  return dict.fromkeys(METHODS, SWEEP_RATES)


def sweep_point(model: str) -> tuple[float, int]:
  """(C, B) of the sweep."""
  if model in TRANSFORMERS:
    return TRANSFORMERS[model].sweep_compression, TRANSFORMERS[model].budget
  return SWEEP_COMPRESSION, SWEEP_BUDGET


def ticket_source(cell: Cell, epochs: int | None) -> Cell:
  """The grid cell whose final model gives a GSM ticket its mask."""
  budget = TICKET_SOURCE_BUDGET if epochs is None else epochs
  return Cell("grid", "gsm", cell.compression, budget, cell.seed, model=cell.model)


def rate_for(method: str, chosen: dict[str, float]) -> float | None:
  """A grid cell's learning rate: its method's chosen rate (a variant: gsm's)."""
  return chosen.get(RATE_OF.get(method, method))


def matches(cell: Cell, only: dict[str, str]) -> bool:
  """Whether every ``field=value`` of ``--only`` holds (``a|b``: either; numbers as numbers)."""
  return all(
    any(_equal(getattr(cell, key), value) for value in values.split("|"))
    for key, values in only.items()
  )


def _equal(field: Any, value: str) -> bool:
  if isinstance(field, (int, float)) and not isinstance(field, bool):
    return math.isclose(float(field), float(value))
  return str(field) == value


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
  if cell.model not in CONFIGS:
    raise ValueError(f"model {cell.model!r}: one of {', '.join(CONFIGS)}")
  if cell.model in TRANSFORMERS:
    return fields | transformer_cell_fields(cell, lr, args)
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
  if cell.stage == "ticket":
    fields["lottery.ticket"] = cell.method.removeprefix("ticket_")
    if cell.method == "ticket_gsm":
      source = ticket_source(cell, args.epochs)
      fields["lottery.gsm_checkpoint"] = os.path.join(args.workdir_root, source.name)
    return fields
  if cell.method in STRUCTURED:
    fields.update(STRUCTURED_FIELDS[cell.model])
    if cell.method.startswith("gsm"):
      fields.update(_sgd("gsm", b, lr))
      fields["gsm.warmup_epochs"] = min(5.0, b / 4)
    else:
      fields.update(_sgd("finetune", b, lr))
  elif cell.method == "gsm_ft":
    tune = max(1, b // FINETUNE_SHARE)
    fields.update(_sgd("gsm", b - tune, lr))
    fields["gsm.warmup_epochs"] = min(5.0, (b - tune) / 4)
    fields.update(_sgd("finetune", tune, args.finetune_rate))
    fields["gsm.finetune"] = True
  elif TRAIN_METHOD.get(cell.method, cell.method) == "gsm":
    fields.update(_sgd("gsm", b, lr))
    fields["gsm.warmup_epochs"] = min(5.0, b / 4)
    if cell.method in RAMPS:
      fields["gsm.ramp_epochs"] = RAMPS[cell.method] * b
    elif cell.method == "gsm_ema":
      fields["gsm.score_ema"] = SCORE_EMA
    elif cell.method == "gsm_age":
      fields["gsm.passive_decay_growth"] = PASSIVE_GROWTH
      fields["gsm.passive_decay_horizon_epochs"] = PASSIVE_HORIZON_EPOCHS
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


def transformer_cell_fields(
  cell: Cell, lr: float | None, args: argparse.Namespace
) -> dict[str, Any]:
  """A transformer cell's fields on top of its config (AdamW sections, cosine schedules)."""
  fields: dict[str, Any] = {"dense.epochs": args.dense_epochs}
  if args.data_dir:
    fields["data_dir"] = args.data_dir
  if cell.stage == "dense":
    return fields
  b, half = cell.budget, max(1, cell.budget // 2)
  fields["compression"] = cell.compression
  fields["dense_checkpoint"] = os.path.join(args.workdir_root, dense_name(cell))
  if cell.method in GROUP_METHODS:
    fields["channels.groups"] = GROUP_METHODS[cell.method][1]
  if cell.method in ("gsm", "gsm_sgd", "gsm_nm", "gsm_neurons", "gsm_heads"):
    fields.update({"gsm.epochs": b, "gsm.learning_rate": lr})
    if cell.method == "gsm_sgd":  # the paper's momentum SGD; passive weights shrink as gsm's
      fields.update({f"gsm.{key}": value for key, value in GSM_SGD.items()})
  elif cell.method in ("magnitude", "magnitude_nm", "l1_neurons", "l1_heads"):
    fields.update({"finetune.epochs": b, "finetune.learning_rate": lr})
  elif cell.method == "gmp":
    fields.update({"gmp.epochs": half, "gmp.learning_rate": lr})
    fields.update({"finetune.epochs": b - half, "finetune.learning_rate": lr})
  else:
    methods = TRANSFORMERS[cell.model].methods + STRUCTURED[2:] + tuple(GROUP_METHODS)
    raise ValueError(f"method {cell.method!r} has no {cell.model} cell: one of {methods}")
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
    f"--config={CONFIGS[cell.model]}",
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


def run_cell(
  argv: list[str], workdir: str, lock: str | None = None, env: dict[str, str] | None = None
) -> int:
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
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    while True:
      try:
        return process.wait()
      except KeyboardInterrupt:
        continue


def record(cell: Cell, lr: float | None, argv: list[str], workdir: str, status: str) -> dict:
  """One raw record: the cell, its command, its status and the summary's accuracies."""
  rec = dataclasses.asdict(cell) | {"name": cell.name, "learning_rate": lr, "status": status}
  config = f"--config={os.path.relpath(CONFIGS[cell.model], ROOT)}"  # from the repository root
  rec["command"] = shlex.join(["python", "train.py", config, *argv[3:]])
  path = os.path.join(workdir, "summary.json")
  if status == "done":
    with open(path) as f:
      summary = json.load(f)
    m = METRIC[cell.model]
    keys = (
      *(f"dense_{m}", f"dense_validation_{m}", f"{m}_before_prune", f"{m}_after_prune"),
      *(f"{m}_final", f"validation_{m}_final"),
      "num_train",
      "num_validation",
      "num_test",
      "keep",
      "nonzeros",
      "compression_reached",
      "epochs",
      "wall_time_s",
      "method_results",
    )
    rec.update({key: summary.get(key) for key in keys})
  return rec


def read_json(path: str, empty: Any) -> Any:
  if not os.path.exists(path):
    return empty
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Any) -> None:
  """Strict JSON (non-finite numbers as null), atomically (a temporary file, then a rename)."""
  strict_json.write_json(path, obj, indent=1)


def chosen_rates(records: list[dict], model: str = "lenet_300_100") -> dict[str, float]:
  """Per method whose sweep is complete: the rate of best validation metric (ties: smaller)."""
  chosen = {}
  metric = METRIC[model]
  sign = 1.0 if LARGER_IS_BETTER[metric] else -1.0
  for method, rates in sweep_rates(model).items():
    mine = [r for r in records if r["method"] == method]
    if len(mine) < len(rates):
      continue
    done = [r for r in mine if r["status"] == "done"]
    if done:
      best = max(done, key=lambda r: (sign * r[f"validation_{metric}_final"], -r["learning_rate"]))
      chosen[method] = best["learning_rate"]
  return chosen


# --------------------------------------------------------------------------- #
# The aggregate: Markdown table and plot
# --------------------------------------------------------------------------- #


def aggregate(records: list[dict]) -> list[dict[str, Any]]:
  """Per (model, method, C, B): seeds, mean and sample std (ddof 1; 0 for one seed)."""
  groups: dict[tuple, list[dict]] = {}
  for r in records:
    if r["stage"] in ("grid", "ticket") and r["status"] == "done":
      key = (r["stage"], r["model"], r["method"], r["compression"], r["budget"])
      groups.setdefault(key, []).append(r)
  rows = []
  for (stage, model, method, c, b), rs in sorted(groups.items()):
    row = {"stage": stage, "model": model, "method": method, "compression": c, "budget": b}
    row["seeds"] = len(rs)
    row["learning_rate"] = rs[0]["learning_rate"]
    row["metric"] = m = METRIC[model]
    for key in (f"{m}_final", f"validation_{m}_final", f"dense_{m}"):
      values = np.array([r[key] for r in rs], np.float64)
      row[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    macs = [r.get("method_results") or {} for r in rs]
    if all("macs_narrow" in m for m in macs):  # channel methods: the narrowed model's MACs
      row["macs_fraction"] = float(np.mean([m["macs_narrow"] / m["macs_dense"] for m in macs]))
    rows.append(row)
  return rows


def markdown(
  rows: list[dict[str, Any]],
  rates: dict[str, float],
  tag: str = "evidence",
  machine: str = "",
  fixed_rate: float | None = None,
) -> str:
  """The aggregate tables (accuracies in %, bits per byte as they are; mean +- std over seeds)."""
  chosen = (
    "learning rates chosen on the validation split: "
    f"{', '.join(f'{m} {lr:g}' for m, lr in rates.items()) or 'none yet'} "
    "(variants: gsm's rate; gsm_ft's fine-tuning: magnitude's)"
  )
  if fixed_rate is not None:
    chosen = f"one learning rate for every method, {fixed_rate:g} (--learning_rate, no sweep)"
  lines = [
    "# Evidence: equal post-dense budgets, mean +- std over seeds",
    "",
    "Generated by `python benchmarks/evidence.py`; raw per-seed records with their "
    f"commands: `{tag}_raw.json`; {chosen}. {machine}".rstrip(),
    "",
  ]
  if any(r["stage"] == "ticket" for r in rows):
    lines += [
      "Tickets (`ticket_*`): theta_0 * mask retrained for the dense epochs (the epochs column).",
      "",
    ]
  if any("macs_fraction" in r for r in rows):
    lines += [
      "Channel methods: C counts channels; MACs: the narrowed model's, as a fraction of the "
      "dense model's (mean over seeds).",
      "",
    ]
  images = [r for r in rows if r["metric"] == "accuracy"]
  lm = [r for r in rows if r["metric"] != "accuracy"]
  if images:
    lines += _table(images, "accuracy %", 100.0, 2)
  if lm:
    lines += ["Language models (lower is better):", "", *_table(lm, "bits/byte", 1.0, 4)]
  return "\n".join(lines).rstrip() + "\n"


def _table(rows: list[dict[str, Any]], unit: str, scale: float, digits: int) -> list[str]:
  """One row per (model, C, B, method): test, validation and dense test metric, MACs."""
  lines = [
    f"| model | C | epochs | method | lr | seeds | test {unit} | validation {unit} "
    f"| dense test {unit} | MACs |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    m = r["metric"]
    keys = (f"{m}_final", f"validation_{m}_final", f"dense_{m}")
    cells = [f"{scale * r[k][0]:.{digits}f} ± {scale * r[k][1]:.{digits}f}" for k in keys]
    macs = f"{r['macs_fraction']:.3f}" if "macs_fraction" in r else "-"
    lines.append(
      f"| {r['model']} | {r['compression']:g} | {r['budget']} | {r['method']} | "
      f"{_rate(r['learning_rate'])} | {r['seeds']} | {' | '.join(cells)} | {macs} |"
    )
  return lines + [""]


def _rate(lr: float | None) -> str:
  return "-" if lr is None else f"{lr:g}"


def plot(rows: list[dict[str, Any]], path: str) -> None:
  """Test accuracy vs C (one line per method and budget) and, when some method has several
  budgets, vs budget at each C; error bars: the std over seeds."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  rows = [r for r in rows if r["stage"] in ("grid", "ticket")]  # tickets: budget = dense epochs
  metric = rows[0]["metric"] if rows else "accuracy"
  scale = 100.0 if metric == "accuracy" else 1.0
  curves = len({(r["method"], r["compression"], r["budget"]) for r in rows}) > len(
    {(r["method"], r["compression"]) for r in rows}
  )  # some method was run at several budgets: the second panel
  fig, axes = plt.subplots(1, 1 + curves, figsize=(5.5 * (1 + curves), 4), squeeze=False)
  panels = (("compression", "budget"), ("budget", "compression"))[: 1 + curves]
  dense = {r["model"]: r[f"dense_{metric}"][0] for r in rows if r["stage"] == "grid"}
  for ax, (x, line) in zip(axes[0], panels):
    keys = sorted({(r["method"], r[line]) for r in rows})
    for method, value in keys:
      rs = sorted(
        (r for r in rows if (r["method"], r[line]) == (method, value)), key=lambda r: r[x]
      )
      if len(rs) < 2 and x == "budget":
        continue
      ax.errorbar(
        [r[x] for r in rs],
        [scale * r[f"{metric}_final"][0] for r in rs],
        yerr=[scale * r[f"{metric}_final"][1] for r in rs],
        marker="o",
        capsize=3,
        label=f"{method}, {line} {value:g}",
      )
    if len(dense) == 1:  # one model: its dense models' mean, for reference
      ax.axhline(scale * next(iter(dense.values())), ls="--", color="gray", lw=1, label="dense")
    ax.set_xscale("log")
    ticks = sorted({r[x] for r in rows})  # the measured values, as plain numbers
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel({"compression": "compression C", "budget": "epochs after the dense model"}[x])
    what = "test accuracy %" if metric == "accuracy" else "test bits per byte"
    ax.set_ylabel(f"{what} (mean ± std over seeds)")
    if ax.lines:
      ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(
  out: str,
  records: list[dict],
  rates: dict[str, float],
  tag: str = "evidence",
  machine: str = "",
  fixed_rate: float | None = None,
) -> None:
  """<tag>_raw.json, <tag>.md and <tag>.png from the records so far."""
  write_json(os.path.join(out, f"{tag}_raw.json"), {"records": records})
  rows = aggregate(records)
  with open(os.path.join(out, f"{tag}.md"), "w") as f:
    f.write(markdown(rows, rates, tag, machine, fixed_rate))
  if rows:
    plot(rows, os.path.join(out, f"{tag}.png"))


# --------------------------------------------------------------------------- #
# Plan and main
# --------------------------------------------------------------------------- #


def cell_seconds(cell: Cell, args: argparse.Namespace) -> float:
  """Estimated CPU wall time: epochs x the measured epoch time (scaled by examples) + overhead."""
  if cell.model in TRANSFORMERS:
    t = TRANSFORMERS[cell.model]
    return cell.budget * t.epoch_seconds + t.run_overhead_seconds
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
  t = TRANSFORMERS.get(args.model)
  seconds, overhead = (
    (t.epoch_seconds, t.run_overhead_seconds) if t else (args.epoch_seconds, RUN_OVERHEAD_SECONDS)
  )
  print(
    f"{len(todo)} of {len(cells)} cells to run, {sum(c.budget for c in todo)} epochs: "
    f"~{total / 3600:.1f} h at {seconds:g} s per full epoch + {overhead:g} s per run"
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", choices=tuple(CONFIGS), default="lenet_300_100")
  p.add_argument("--workdir_root", default="/work/evidence_runs")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  p.add_argument("--tag", default="evidence", help="output names: <tag>_raw.json, <tag>.md, ...")
  p.add_argument("--machine", default="", help="a line on the hardware, for the table")
  p.add_argument("--stage", choices=("all", "sweep", "grid", "ticket"), default="all")
  p.add_argument(
    "--grid",
    choices=("methods", "structured", "ramp", "channels"),
    default="methods",
    help="issue 13's methods (the LM: issue 23's), issue 14's structured methods (the LM: 2:4) "
    "gradual GSM's ramps on LeNet-300-100, or a transformer's neurons and heads "
    "(all but the first need --rates_from)",
  )
  p.add_argument("--only", default="", help="field=value,... over the cell fields")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--plan", action="store_true", help="print the cells left and the time")
  p.add_argument("--rates_from", default=None, help="an evidence_lr.json: its rates, no sweep")
  p.add_argument("--data_dir", default=None, help="config.data_dir (None: the default places)")
  p.add_argument("--max_examples", type=int, default=None, help="smoke runs: a data subset")
  p.add_argument("--validation_examples", type=int, default=None)
  p.add_argument("--epochs", type=int, default=None, help="smoke runs: every budget")
  p.add_argument("--dense_epochs", type=int, default=None, help="default: 30 (images), 8 (LM)")
  p.add_argument("--learning_rate", type=float, default=None, help="smoke runs: skip the sweep")
  p.add_argument("--lock", default=None, help="a file each cell holds flock on (shared CPUs)")
  p.add_argument("--jobs", type=int, default=1, help="cells run at a time")
  p.add_argument("--deadline", type=float, default=None, help="start no cell after S seconds")
  p.add_argument("--epoch_seconds", type=float, default=EPOCH_SECONDS)
  return p.parse_args(argv)


class Runner:
  """Runs the cells in order, ``--jobs`` at a time, each once its inputs exist."""

  def __init__(self, args: argparse.Namespace, cells: list[Cell]):
    self.args, self.cells = args, cells
    out = args.out
    self.raw_path = os.path.join(out, f"{args.tag}_raw.json")
    self.lr_path = os.path.join(
      out, "evidence_lr.json" if args.tag == "evidence" else f"{args.tag}_lr.json"
    )
    self.records = read_json(self.raw_path, {"records": []})["records"]
    if args.rates_from:
      self.sweep = {"records": [], "chosen": read_json(args.rates_from, {})["chosen"]}
    else:
      self.sweep = read_json(self.lr_path, {"records": [], "chosen": {}}) | {
        "rates": {m: list(r) for m, r in sweep_rates(args.model).items()}
      }
      self.sweep["chosen"] = chosen_rates(self.sweep["records"], args.model)  # rates may grow
    self.known = {r["name"]: r for r in self.records + self.sweep["records"]}
    self.env = None
    if args.jobs > 1:  # several JAX processes share one accelerator: no preallocation
      self.env = os.environ | {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}

  def workdir(self, cell: Cell) -> str:
    """Where ``cell`` runs; a transformer grid cell that its sweep already ran (same seed,
    C, B and the chosen rate: the same command) reuses the sweep cell's run."""
    twin = self.sweep_twin(cell)
    if twin is not None and os.path.exists(os.path.join(self.workdir(twin), "summary.json")):
      return self.workdir(twin)
    return os.path.join(self.args.workdir_root, cell.name)

  def sweep_twin(self, cell: Cell) -> Cell | None:
    if cell.stage != "grid" or cell.model not in TRANSFORMERS or self.args.epochs is not None:
      return None
    compression, budget = sweep_point(cell.model)
    lr = self.learning_rate(cell)
    if (cell.compression, cell.budget) != (compression, budget) or lr is None:
      return None
    return Cell("sweep", cell.method, compression, budget, cell.seed, lr, cell.model)

  def finished(self, cell: Cell) -> bool:
    diverged = self.known.get(cell.name, {}).get("status") == "diverged"
    return diverged or os.path.exists(os.path.join(self.workdir(cell), "summary.json"))

  def learning_rate(self, cell: Cell) -> float | None:
    if cell.stage in ("sweep", "dense"):
      return cell.learning_rate
    if cell.stage == "ticket":
      return None
    return self.args.learning_rate or rate_for(cell.method, self.sweep["chosen"])

  def ready(self, cell: Cell) -> bool:
    """Whether the cells ``cell`` starts from are finished (and its rate chosen)."""
    if cell.stage == "dense":
      return True
    dense = Cell("dense", "dense", 1.0, 0, cell.seed, model=cell.model)
    if not os.path.exists(os.path.join(self.args.workdir_root, dense.name, "summary.json")):
      return False
    if cell.stage == "grid" and self.learning_rate(cell) is None:
      return False
    if cell.method == "gsm_ft" and not (
      self.args.learning_rate or "magnitude" in self.sweep["chosen"]
    ):
      return False
    if cell.method == "ticket_gsm":
      return self.finished(ticket_source(cell, self.args.epochs))
    return True

  def argv(self, cell: Cell) -> list[str]:
    self.args.finetune_rate = self.args.learning_rate or self.sweep["chosen"].get("magnitude")
    fields = cell_fields(cell, self.learning_rate(cell), self.args)
    return command(cell, fields, self.workdir(cell))

  def finish(self, cell: Cell) -> None:
    """Records a finished cell and rewrites the outputs."""
    workdir = self.workdir(cell)
    status = "done" if os.path.exists(os.path.join(workdir, "summary.json")) else "diverged"
    rec = record(cell, self.learning_rate(cell), self.argv(cell), workdir, status)
    if self.args.machine:
      rec["machine"] = self.args.machine
    self.known[cell.name] = rec
    if cell.stage == "sweep":
      self.sweep["records"] = _replace(self.sweep["records"], rec)
      self.sweep["chosen"] = chosen_rates(self.sweep["records"], self.args.model)
      write_json(self.lr_path, self.sweep)
    else:
      self.records = _replace(self.records, rec)
    write_outputs(
      self.args.out,
      self.records,
      self.sweep["chosen"],
      self.args.tag,
      self.args.machine,
      self.args.learning_rate,
    )

  def stale(self) -> list[str]:
    """Finished grid cells whose workdir ran a different command (a rate the sweep no longer
    chooses, another tag's settings): each with the differing config fields."""
    lines = []
    for cell in self.cells:
      workdir = self.workdir(cell)
      if cell.stage != "grid" or not self.finished(cell) or self.learning_rate(cell) is None:
        continue
      if differences := config_differences(workdir, self.argv(cell)):
        lines.append(f"{cell.name}: {'; '.join(differences)}; delete {workdir} to rerun it")
    return lines

  def run(self) -> int:
    if stale := self.stale():
      print("\n".join(["evidence.py: stale grid cells, nothing run:", *stale]), file=sys.stderr)
      return 2
    for cell in self.cells:  # finished in an earlier run but not recorded
      if self.finished(cell) and cell.name not in self.known:
        self.finish(cell)
    pending = [c for c in self.cells if not self.finished(c)]
    start, code = time.monotonic(), 0
    with futures.ThreadPoolExecutor(max(1, self.args.jobs)) as pool:
      running: dict[futures.Future, Cell] = {}
      while pending or running:
        late = self.args.deadline is not None and time.monotonic() - start > self.args.deadline
        for cell in [c for c in pending if self.ready(c)] if not (late or code) else []:
          if len(running) >= max(1, self.args.jobs):
            break
          pending.remove(cell)
          if self.finished(cell):  # its sweep twin ran it meanwhile
            self.finish(cell)
            continue
          print(f"{time.strftime('%H:%M:%S')} {cell.name}", flush=True)
          job = pool.submit(run_cell, self.argv(cell), self.workdir(cell), self.args.lock, self.env)
          running[job] = cell
        if not running:
          break
        done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
        for job in done:
          cell, exit_code = running.pop(job), job.result()
          if exit_code in (130, 143):
            print(f"stopped by a signal in {cell.name}; run the same command again to resume")
            code = exit_code
          elif exit_code not in (0, EXIT_DIVERGED):
            print(f"{cell.name}: train.py exited {exit_code}; see {self.workdir(cell)}/train.log")
          else:
            self.finish(cell)
    for cell in pending:
      why = "the deadline passed" if self.args.deadline else "its inputs are missing"
      if not self.learning_rate(cell) and cell.stage == "grid":
        why = f"no learning rate chosen for {cell.method} yet: run the sweep first"
      print(f"{cell.name}: not run ({why})")
    return code


def config_differences(workdir: str, argv: list[str]) -> list[str]:
  """The ``--config.a.b=v`` flags of ``argv`` that ``workdir/config.json`` (the config the
  run started with) does not hold, as 'a.b ran with X, now v'; none without a config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    config = json.load(f)
  differences = []
  for flag in argv:
    if not flag.startswith("--config."):
      continue
    key, value = flag[len("--config.") :].split("=", 1)
    ran = functools.reduce(
      lambda d, k: d.get(k, {}) if isinstance(d, dict) else {}, key.split("."), config
    )
    if not _same_value(ran, value):
      differences.append(f"{key} ran with {ran}, now {value}")
  return differences


def _same_value(ran: Any, flag: str) -> bool:
  """Whether a config.json value equals a flag's text (numbers by value, tuples by item)."""
  if isinstance(ran, list):
    items = [item for item in flag.strip("()[] ").split(",") if item.strip()]
    return len(items) == len(ran) and all(map(_same_value, ran, items))
  try:
    return float(ran) == float(flag)
  except (TypeError, ValueError):
    return str(ran).lower() == flag.lower()


def _replace(records: list[dict], rec: dict) -> list[dict]:
  return sorted([r for r in records if r["name"] != rec["name"]] + [rec], key=lambda r: r["name"])


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  args.workdir_root = os.path.abspath(args.workdir_root)
  if args.dense_epochs is None:
    t = TRANSFORMERS.get(args.model)
    args.dense_epochs = t.dense_epochs if t else 30
  args.finetune_rate = None  # magnitude's chosen rate, set by the runner
  only = dict(item.split("=", 1) for item in args.only.split(",") if item)
  seeds = [int(s) for s in args.seeds.split(",")]
  cells = all_cells(
    seeds, args.dense_epochs, args.epochs, args.model, not args.rates_from, args.grid
  )
  if args.grid != "methods" and not (args.rates_from or args.learning_rate):
    sys.exit(f"--grid {args.grid} takes a sweep's rates: give --rates_from (or --learning_rate)")
  cells = select(cells, only, args.stage)
  os.makedirs(args.out, exist_ok=True)
  runner = Runner(args, cells)
  if args.plan:
    print_plan(cells, args, runner.known)
    return 0
  return runner.run()


if __name__ == "__main__":
  sys.exit(main())
