"""The paper's experiments, reproduced on Fashion-MNIST with a small CPU budget.

Usage:
  python benchmarks/paper_tables.py [--quick] [--workdir DIR] [--out DIR] [--docs DIR]

* Table 1 analogue: LeNet-300-100 at 10x, 30x, 60x, 120x and LeNet-5 at 30x,
  125x, 300x: the dense model, then GSM (no fine-tuning), one-shot global
  magnitude pruning (no fine-tuning / fine-tuned), GMP and ADMM. Every method
  gets the same number of epochs after the shared dense model (GSM: all of them
  GSM training; magnitude: all of them masked fine-tuning; GMP and ADMM: half
  pruning, half masked fine-tuning). ADMM's per-layer targets are the per-layer
  densities GSM found at the same compression.
* Table 4 analogue: magnitude tickets vs GSM tickets (LeNet-300-100 60x, LeNet-5
  125x and 300x), retrained from theta_0 with the dense schedule.
* Per-layer density of GSM vs global magnitude pruning at the same compression.
* Accuracy-vs-compression plot, one line per method.

One dense model per architecture is trained once and loaded by every other run
with ``dense_checkpoint``. Each run is a ``train_and_evaluate`` workdir under
``--workdir``; a finished run (summary.json present) is not run again, an
interrupted one resumes. Writes ``paper_tables[_quick].json`` / ``.md`` under
``--out`` and the plots under ``--docs``; the full mode also writes
``docs/RESULTS.md`` (tables, plots, command, epochs, wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

# Repository code (models/, training/, configs/) is not installed with gsm_optax:
# run from the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from configs import default as default_config  # noqa: E402
from training import config as config_lib  # noqa: E402
from training import strict_json  # noqa: E402
from training import train_lib  # noqa: E402

METHODS = ("gsm", "magnitude_no_ft", "magnitude_ft", "gmp", "admm")
METHOD_LABELS = {
  "gsm": "GSM (no FT)",
  "magnitude_no_ft": "magnitude (no FT)",
  "magnitude_ft": "magnitude + FT",
  "gmp": "GMP",
  "admm": "ADMM",
}
TICKETS = ("magnitude", "gsm")


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #


def settings(quick: bool) -> dict[str, dict[str, Any]]:
  """Per architecture: data subset, batch, dense epochs, budget, compressions, tickets."""
  if quick:
    return {
      "lenet_300_100": dict(
        max_train_examples=1024,
        max_test_examples=500,
        batch_size=128,
        dense_epochs=1,
        budget_epochs=2,
        compressions=(60.0,),
        tickets=(60.0,),
        plots=False,
      ),
      "lenet5": dict(
        max_train_examples=512,
        max_test_examples=500,
        batch_size=128,
        dense_epochs=1,
        budget_epochs=2,
        compressions=(125.0,),
        tickets=(125.0,),
        plots=False,
      ),
    }
  return {
    "lenet_300_100": dict(
      max_train_examples=None,
      max_test_examples=None,
      batch_size=256,
      dense_epochs=8,
      budget_epochs=8,
      compressions=(10.0, 30.0, 60.0, 120.0),
      tickets=(60.0,),
    ),
    "lenet5": dict(
      max_train_examples=3072,
      max_test_examples=2000,
      batch_size=64,
      dense_epochs=4,
      budget_epochs=4,
      compressions=(30.0, 125.0, 300.0),
      tickets=(125.0, 300.0),
    ),
  }


def supplement(quick: bool) -> dict[str, Any]:
  """A longer equal budget for one row (LeNet-300-100 at 60x), from the same dense model."""
  return dict(model="lenet_300_100", compression=60.0, budget_epochs=3 if quick else 30)


def base_config(model: str, s: dict[str, Any]):
  """The shared config of one architecture: default hyperparameters, epochs scaled."""
  config = default_config.get_config()
  config.model = model
  config.dataset = "fashion_mnist"
  config.max_train_examples = s["max_train_examples"]
  config.max_test_examples = s["max_test_examples"]
  config.batch_size = s["batch_size"]
  config.progress_bar = False
  config.plots = s.get("plots", True)  # the per-run plots of train_and_evaluate
  config.checkpoint_keep = 1
  config.seed = 0

  dense = s["dense_epochs"]
  config.dense.epochs = dense
  # Default: 30 epochs, x0.1 at 50% and ~77%, 2 warm-up epochs; same shape here.
  config.dense.boundaries = tuple(b for b in (0.5 * dense, 0.77 * dense) if b > 0)
  config.dense.warmup_epochs = min(2.0, 0.5 * dense)

  budget = s["budget_epochs"]
  half = budget // 2
  # GSM: the default config's hyperparameters, lr held to 80% of the epochs.
  config.gsm.epochs = budget
  config.gsm.boundaries = (0.8 * budget,)
  # Baselines: SGD as the dense phase (lr 3e-2, momentum 0.9, wd 5e-4), the
  # fine-tuning/retraining stages x0.1 at 80% as GSM.
  config.finetune.epochs = budget
  config.finetune.boundaries = (0.8 * budget,)
  config.gmp.epochs = half
  config.admm.epochs = half
  steps = (s["max_train_examples"] or 60000) // s["batch_size"]
  config.gmp.update_every_steps = max(1, steps // 4)
  config.admm.steps_per_iteration = steps  # one ADMM iteration per epoch
  return config


def method_config(
  base,
  method: str,
  compression: float,
  dense_dir: str,
  gsm_dir: str | None,
  ticket: str | None = None,
):
  config = base.copy_and_resolve_references()
  rest = base.gsm.epochs - base.gmp.epochs  # the budget minus the pruning stage
  config.compression = compression
  config.method = method
  if method == "gsm":
    config.dense_checkpoint = dense_dir
  elif method == "magnitude":
    config.dense_checkpoint = dense_dir
  elif method in ("gmp", "admm"):
    config.dense_checkpoint = dense_dir
    config.finetune.epochs = rest
    config.finetune.boundaries = (0.8 * rest,)
    if method == "admm":
      config.admm.densities_from = gsm_dir
  elif method == "lottery":
    config.dense_checkpoint = dense_dir
    config.lottery.ticket = ticket
    if ticket == "gsm":
      config.lottery.gsm_checkpoint = gsm_dir
  return config


def dense_config(base):
  config = base.copy_and_resolve_references()
  config.method = "dense"
  return config


# --------------------------------------------------------------------------- #
# Running
# --------------------------------------------------------------------------- #


def run(config, workdir: str, log) -> dict[str, Any]:
  """``train_and_evaluate`` unless the workdir already holds a summary of this config."""
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path) and _same_config(config, workdir):
    with open(path) as f:
      summary = json.load(f)
    log(f"  reused {workdir}")
  else:
    start = time.perf_counter()
    summary = train_lib.train_and_evaluate(config, workdir)
    log(f"  {workdir}: {time.perf_counter() - start:.0f} s")
  _RUN_TIMES.append(summary["wall_time_s"]["this_invocation"])
  return summary


_RUN_TIMES: list[float] = []  # wall time of every run's (last) train_and_evaluate call


def _same_config(config, workdir: str) -> bool:
  """Whether the workdir was written by this config, up to the harmless fields."""
  stored = config_lib.read_workdir_config(workdir)
  return stored is not None and not config_lib.config_differences(stored, config)


def _slim(summary: dict[str, Any]) -> dict[str, Any]:
  keys = (
    "method",
    "dense_accuracy",
    "accuracy_after_prune",
    "accuracy_final",
    "compression_target",
    "compression_reached",
    "nonzeros",
    "epochs",
    "wall_time_s",
    "accuracy_before_prune",
    "method_results",
  )
  out = {k: summary[k] for k in keys}
  out["layers"] = [
    {k: row[k] for k in ("path", "size", "nonzeros", "density")} for row in summary["layers"]
  ]
  return out


def run_all(quick: bool, workdir: str, log) -> dict[str, Any]:
  start = time.perf_counter()
  _RUN_TIMES.clear()
  results: dict[str, Any] = {
    "mode": "quick" if quick else "full",
    "settings": {},
    "dense": {},
    "table1": [],
    "table4": [],
    "densities": [],
    "runs": {},
  }
  for model, s in settings(quick).items():
    base = base_config(model, s)
    budget = s["budget_epochs"]
    results["settings"][model] = {
      **{k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
      "num_train": s["max_train_examples"] or 60000,
      "num_test": s["max_test_examples"] or 10000,
      "epochs_after_dense": {
        "gsm": {"gsm": budget},
        "magnitude": {"finetune": budget},
        "gmp": {"gmp": budget // 2, "finetune": budget - budget // 2},
        "admm": {"admm": budget // 2, "finetune": budget - budget // 2},
        "lottery": {"ticket (dense schedule)": s["dense_epochs"]},
      },
      "dense": base.dense.to_dict(),
      "gsm": {k: v for k, v in base.gsm.to_dict().items() if k != "compression"},
      "finetune": base.finetune.to_dict(),
      "gmp": base.gmp.to_dict(),
      "admm": {
        k: v for k, v in base.admm.to_dict().items() if k not in ("densities", "densities_from")
      },
    }
    log(f"{model}: dense model")
    dense_dir = os.path.join(workdir, model, "dense")
    dense = run(dense_config(base), dense_dir, log)
    results["dense"][model] = {
      "accuracy": dense["dense_accuracy"],
      "epochs": dense["epochs"].get("dense", 0),
      "wall_time_s": dense["wall_time_s"]["dense"],
    }
    for c in s["compressions"]:
      tag = f"{model}/c{c:g}"
      log(f"{tag}: gsm, magnitude, gmp, admm")
      dirs = {
        m: os.path.join(workdir, model, f"c{c:g}", m) for m in ("gsm", "magnitude", "gmp", "admm")
      }
      runs = {}
      runs["gsm"] = run(method_config(base, "gsm", c, dense_dir, None), dirs["gsm"], log)
      for m in ("magnitude", "gmp", "admm"):
        runs[m] = run(method_config(base, m, c, dense_dir, dirs["gsm"]), dirs[m], log)
      for m, summary in runs.items():
        results["runs"][f"{tag}/{m}"] = _slim(summary)
      row = _table1_row(model, c, dense["dense_accuracy"], runs)
      results["table1"].append(row)
      results["densities"].append(
        {
          "model": model,
          "compression": c,
          "layers": [
            {
              "path": g["path"],
              "size": g["size"],
              "gsm_density": g["density"],
              "magnitude_density": m["density"],
            }
            for g, m in zip(runs["gsm"]["layers"], runs["magnitude"]["layers"])
          ],
        }
      )
      if c in s["tickets"]:
        log(f"{tag}: tickets")
        tickets = {}
        for t in TICKETS:
          tdir = os.path.join(workdir, model, f"c{c:g}", f"ticket_{t}")
          tickets[t] = run(
            method_config(base, "lottery", c, dense_dir, dirs["gsm"], ticket=t), tdir, log
          )
          results["runs"][f"{tag}/ticket_{t}"] = _slim(tickets[t])
        results["table4"].append(
          {
            "model": model,
            "compression": c,
            "dense_accuracy": dense["dense_accuracy"],
            "magnitude_ticket": tickets["magnitude"]["accuracy_final"],
            "gsm_ticket": tickets["gsm"]["accuracy_final"],
            "magnitude_ticket_at_theta0": tickets["magnitude"]["accuracy_after_prune"],
            "gsm_ticket_at_theta0": tickets["gsm"]["accuracy_after_prune"],
            "retrain_epochs": tickets["gsm"]["epochs"].get("ticket", 0),
          }
        )
  sup = supplement(quick)
  model, c = sup["model"], sup["compression"]
  s = dict(settings(quick)[model], budget_epochs=sup["budget_epochs"])
  base = base_config(model, s)
  dense_dir = os.path.join(workdir, model, "dense")
  tag = f"{model}/c{c:g}_budget{sup['budget_epochs']}"
  log(f"{tag}: gsm, magnitude, gmp, admm (longer budget)")
  dirs = {m: os.path.join(workdir, tag, m) for m in ("gsm", "magnitude", "gmp", "admm")}
  runs = {"gsm": run(method_config(base, "gsm", c, dense_dir, None), dirs["gsm"], log)}
  for m in ("magnitude", "gmp", "admm"):
    runs[m] = run(method_config(base, m, c, dense_dir, dirs["gsm"]), dirs[m], log)
  for m, summary in runs.items():
    results["runs"][f"{tag}/{m}"] = _slim(summary)
  results["supplement"] = _table1_row(model, c, results["dense"][model]["accuracy"], runs)
  results["supplement"]["budget_epochs"] = sup["budget_epochs"]
  results["wall_time_s"] = time.perf_counter() - start
  results["runs_wall_time_s"] = sum(_RUN_TIMES)  # the same whether runs were reused or not
  return results


def _table1_row(model, c, dense_accuracy, runs) -> dict[str, Any]:
  return {
    "model": model,
    "compression": c,
    "dense_accuracy": dense_accuracy,
    "gsm": runs["gsm"]["accuracy_final"],
    "magnitude_no_ft": runs["magnitude"]["accuracy_after_prune"],
    "magnitude_ft": runs["magnitude"]["accuracy_final"],
    "gmp": runs["gmp"]["accuracy_final"],
    "admm": runs["admm"]["accuracy_final"],
    "gmp_no_ft": runs["gmp"]["accuracy_after_prune"],
    "admm_no_ft": runs["admm"]["accuracy_after_prune"],
    "gsm_largest_passive_abs_weight": runs["gsm"]["method_results"].get(
      "largest_passive_abs_weight_before_cut"
    ),
    "gsm_accuracy_before_cut": runs["gsm"]["accuracy_before_prune"],
    "compression_reached": {m: r["compression_reached"] for m, r in runs.items()},
    "nonzeros": {m: r["nonzeros"] for m, r in runs.items()},
    "epochs": {m: {k: v for k, v in r["epochs"].items() if k != "dense"} for m, r in runs.items()},
    "wall_time_s": {
      m: sum(v for k, v in r["wall_time_s"].items() if k != "this_invocation")
      for m, r in runs.items()
    },
  }


# --------------------------------------------------------------------------- #
# Reports
# --------------------------------------------------------------------------- #


def _pct(x: float | None) -> str:
  return "n/a" if x is None else f"{100 * x:.2f}"


def _short(path: str) -> str:
  return path.replace("['", "").replace("']", ".").rstrip(".").replace(".kernel", "")


def markdown(results: dict[str, Any]) -> str:
  lines = []
  mode = results["mode"]
  lines.append(f"## Table 1 analogue: accuracy (%) on Fashion-MNIST ({mode} mode)\n")
  for model, s in results["settings"].items():
    e = s["epochs_after_dense"]
    lines.append(
      f"- **{model}**: {s['num_train']} training / {s['num_test']} test examples, "
      f"batch {s['batch_size']}; dense model {s['dense_epochs']} epochs (shared); "
      f"budget after it **{s['budget_epochs']} epochs for every method**: GSM "
      f"{e['gsm']['gsm']} GSM epochs; magnitude {e['magnitude']['finetune']} fine-tuning; "
      f"GMP {e['gmp']['gmp']} pruning + {e['gmp']['finetune']} fine-tuning; ADMM "
      f"{e['admm']['admm']} ADMM + {e['admm']['finetune']} retraining."
    )
  lines.append("")
  header = ["model", "C", "dense"] + [METHOD_LABELS[m] for m in METHODS] + ["weights kept"]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  for row in results["table1"]:
    best = max(row[m] for m in METHODS)
    cells = [row["model"], f"{row['compression']:g}x", _pct(row["dense_accuracy"])]
    for m in METHODS:
      text = _pct(row[m])
      cells.append(f"**{text}**" if row[m] == best else text)
    cells.append(f"{row['nonzeros']['gsm']:,}")
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(
    "Compression reached by every method equals the target (the same number of "
    "weights kept). GMP / ADMM right after their final cut, before fine-tuning: "
    + "; ".join(
      f"{r['model']} {r['compression']:g}x GMP {_pct(r['gmp_no_ft'])}, ADMM {_pct(r['admm_no_ft'])}"
      for r in results["table1"]
    )
    + ".\n"
  )

  sup = results.get("supplement")
  if sup:
    lines.append(
      f"### Longer budget: {sup['model']} at {sup['compression']:g}x, "
      f"{sup['budget_epochs']} epochs for every method after the same dense "
      "model\n"
    )
    header = ["model", "C", "budget", "dense"] + [METHOD_LABELS[m] for m in METHODS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    best = max(sup[m] for m in METHODS)
    cells = [
      sup["model"],
      f"{sup['compression']:g}x",
      f"{sup['budget_epochs']} epochs",
      _pct(sup["dense_accuracy"]),
    ]
    cells += [f"**{_pct(sup[m])}**" if sup[m] == best else _pct(sup[m]) for m in METHODS]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  lines.append(
    "GSM before its final cut and the largest |w| the cut removes: "
    + "; ".join(
      f"{r['model']} {r['compression']:g}x {_pct(r['gsm_accuracy_before_cut'])} "
      f"(largest passive |w| {r['gsm_largest_passive_abs_weight']:.3g})"
      for r in results["table1"] + ([sup] if sup else [])
    )
    + ".\n"
  )

  lines.append(
    "## Table 4 analogue: winning tickets, accuracy (%) after retraining theta_0 "
    "* mask with the dense schedule\n"
  )
  header = ["model", "C", "dense", "magnitude ticket", "GSM ticket", "retrain epochs"]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  for row in results["table4"]:
    lines.append(
      "| "
      + " | ".join(
        [
          row["model"],
          f"{row['compression']:g}x",
          _pct(row["dense_accuracy"]),
          _pct(row["magnitude_ticket"]),
          _pct(row["gsm_ticket"]),
          str(row["retrain_epochs"]),
        ]
      )
      + " |"
    )
  lines.append("")

  lines.append("## Per-layer density (%): GSM vs global magnitude pruning, same compression\n")
  header = ["model", "C", "layer", "size", "GSM", "magnitude"]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  for entry in results["densities"]:
    for layer in entry["layers"]:
      lines.append(
        "| "
        + " | ".join(
          [
            entry["model"],
            f"{entry['compression']:g}x",
            _short(layer["path"]),
            f"{layer['size']:,}",
            f"{100 * layer['gsm_density']:.2f}",
            f"{100 * layer['magnitude_density']:.2f}",
          ]
        )
        + " |"
      )
  lines.append("")
  lines.append(
    f"Wall time: {results['runs_wall_time_s'] / 60:.1f} min summed over the "
    f"{len(results['runs']) + len(results['dense'])} training runs "
    f"(this invocation: {results['wall_time_s'] / 60:.1f} min; runs finished by an "
    "earlier invocation are reused).\n"
  )
  return "\n".join(lines)


def plot_accuracy(results: dict[str, Any], path: str) -> None:
  models = list(results["settings"])
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
  for ax, model in zip(axes[0], models):
    rows = [r for r in results["table1"] if r["model"] == model]
    cs = [r["compression"] for r in rows]
    for m in METHODS:
      ax.plot(cs, [100 * r[m] for r in rows], marker="o", label=METHOD_LABELS[m])
    ax.axhline(100 * results["dense"][model]["accuracy"], color="k", ls="--", lw=1, label="dense")
    ax.set_xscale("log")
    ax.set_xticks(cs)
    ax.set_xticklabels([f"{c:g}x" for c in cs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("compression C")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model}, Fashion-MNIST ({results['mode']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_densities(results: dict[str, Any], path: str) -> None:
  entries = results["densities"]
  fig, axes = plt.subplots(1, len(entries), figsize=(3.2 * len(entries), 3.8), squeeze=False)
  for ax, entry in zip(axes[0], entries):
    names = [_short(layer["path"]) for layer in entry["layers"]]
    x = range(len(names))
    ax.bar(
      [i - 0.2 for i in x], [100 * la["gsm_density"] for la in entry["layers"]], 0.4, label="GSM"
    )
    ax.bar(
      [i + 0.2 for i in x],
      [100 * la["magnitude_density"] for la in entry["layers"]],
      0.4,
      label="magnitude",
    )
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=45, fontsize=8)
    ax.set_yscale("log")
    ax.set_title(f"{entry['model']} {entry['compression']:g}x", fontsize=9)
    ax.set_ylabel("density (%)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def results_md(results: dict[str, Any], command: str, tables: str, docs_rel: str) -> str:
  return "\n".join(
    [
      "# Results: GSM and its baselines on Fashion-MNIST",
      "",
      "Generated by `benchmarks/paper_tables.py` (the tables and plots below are "
      "rewritten by every full run).",
      "",
      f"Command: `{command}`",
      "",
      f"Wall time of the full run: **{results['runs_wall_time_s'] / 60:.1f} min** summed "
      "over its training runs, on 2 CPU cores shared with other jobs (load average 8-10).",
      "",
      tables,
      f"![accuracy vs compression]({docs_rel}/paper_accuracy_vs_compression.png)",
      "",
      f"![per-layer density]({docs_rel}/paper_layer_density.png)",
      "",
    ]
  )


BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"


def write_results_md(path: str, generated: str) -> None:
  """Replaces the generated part of RESULTS.md, keeping what was written around it."""
  block = f"{BEGIN}\n{generated}\n{END}\n"
  text = ""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  if BEGIN in text and END in text:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    text = head + block + tail.lstrip("\n")
  else:
    text = block + text
  with open(path, "w") as f:
    f.write(text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny subsets and epochs")
  parser.add_argument("--workdir", default=None, help="where the runs go")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  parser.add_argument("--docs", default=os.path.join(ROOT, "docs"))
  args = parser.parse_args(argv)
  mode = "quick" if args.quick else "full"
  workdir = args.workdir or os.path.join(ROOT, "runs", f"paper_tables_{mode}")
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.docs, exist_ok=True)

  def log(msg):
    print(msg, flush=True)

  results = run_all(args.quick, workdir, log)
  command = "python benchmarks/paper_tables.py" + (" --quick" if args.quick else "")
  results["command"] = command
  suffix = "_quick" if args.quick else ""
  strict_json.write_json(os.path.join(args.out, f"paper_tables{suffix}.json"), results)
  tables = markdown(results)
  with open(os.path.join(args.out, f"paper_tables{suffix}.md"), "w") as f:
    f.write(tables)
  plot_accuracy(results, os.path.join(args.docs, f"paper_accuracy_vs_compression{suffix}.png"))
  plot_densities(results, os.path.join(args.docs, f"paper_layer_density{suffix}.png"))
  if not args.quick:
    write_results_md(
      os.path.join(args.docs, "RESULTS.md"), results_md(results, command, tables, ".")
    )
  log(tables)
  return 0


if __name__ == "__main__":
  sys.exit(main())
