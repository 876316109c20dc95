"""Issue 13's evidence as the top of docs/RESULTS.md: tables by C, verdicts, cut costs, tickets.

Usage:
  python benchmarks/evidence_report.py       # rewrites the part of docs/RESULTS.md between
                                             # <!-- BEGIN EVIDENCE --> and <!-- END EVIDENCE -->

It reads the raw per-seed records that ``benchmarks/evidence.py`` wrote (one
file per run of it, ``SOURCES``) and trains nothing. A difference between two
methods is called clear when it exceeds twice its standard error over seeds,
2 * sqrt(s1^2 / n1 + s2^2 / n2) (s the sample std, n the seeds); otherwise it
is within the seed spread.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import math
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import evidence  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
BEGIN, END = "<!-- BEGIN EVIDENCE -->", "<!-- END EVIDENCE -->"
# (raw records, title, the command that produced them)
SOURCES = (
  (
    "evidence_raw.json",
    "LeNet-300-100, 2 CPU cores",
    "python benchmarks/evidence.py --lock /tmp/cpu.lock",
  ),
  (
    "evidence_tickets_raw.json",
    "LeNet-300-100 winning tickets, 2 CPU cores",
    "python benchmarks/evidence.py --stage ticket --tag evidence_tickets "
    "--rates_from benchmarks/results/evidence_lr.json --lock /tmp/cpu.lock",
  ),
  (
    "evidence_variants_raw.json",
    "LeNet-300-100, the GSM variants, one H200 GPU",
    "bash benchmarks/evidence_gpu.sh OUT DATA_DIR DEADLINE_S (its second runner), run twice",
  ),
  (
    "evidence_lenet5_raw.json",
    "LeNet-5, full Fashion-MNIST, one H200 GPU",
    "bash benchmarks/evidence_gpu.sh OUT DATA_DIR DEADLINE_S (its first runner), run twice",
  ),
  (
    "evidence_lenet5_tickets_raw.json",
    "LeNet-5 winning tickets and 300x repeated with 3 seeds, full Fashion-MNIST, one H200 GPU "
    "(new dense models: gsm and the tickets from those of the first command, 91.88 ± 0.08; the "
    "other 300x rows from those retrained by the second, 91.97 ± 0.24)",
    "bash benchmarks/evidence_gpu.sh OUT DATA_DIR DEADLINE_S structured (its third runner), "
    "then python3 benchmarks/evidence.py --model lenet5 --tag evidence_lenet5_tickets --only "
    "'method=gsm_gradual|magnitude|gmp|admm|gsm_ema|gsm_age|gsm_ft,compression=300,budget=60' "
    "--rates_from benchmarks/results/evidence_lr.json --jobs 12 --deadline 170",
  ),
  (
    "structured_lenet5_raw.json",
    "Structured pruning (issue 14), LeNet-5, full Fashion-MNIST, one H200 GPU: channel GSM vs "
    "L1 filter pruning of conv2 (C = 2.38 / 7.1 keep 21 / 7 of its 50 channels: 2.02x / 4.00x "
    "fewer MACs), 2:4 GSM vs magnitude 2:4 + retraining (the 2x column; conv2, fc1, fc2)",
    "bash benchmarks/evidence_gpu.sh OUT DATA_DIR DEADLINE_S structured (its first runner)",
  ),
  (
    "structured_lenet300_raw.json",
    "Structured pruning (issue 14), LeNet-300-100, one H200 GPU: 2:4 GSM vs magnitude 2:4 + "
    "retraining (every kernel)",
    "bash benchmarks/evidence_gpu.sh OUT DATA_DIR DEADLINE_S structured (its second runner)",
  ),
  (
    "evidence_ramp_raw.json",
    "Gradual GSM's ramp (issue 23): C reached at B / 4 (gsm_gradual), B / 8 (gsm_ramp8) and "
    "B / 16 (gsm_ramp16), LeNet-300-100, 2 CPU cores (new dense models, this machine's)",
    "python benchmarks/evidence.py --grid ramp --tag evidence_ramp "
    "--rates_from benchmarks/results/evidence_lr.json",
  ),
  (
    "evidence_lm_raw.json",
    "The byte-level GPT on Jane Austen (issue 23): tiny size (478,976 parameters, 393,216 "
    "pooled in the attention and MLP kernels), context 64, an 8-epoch dense model (800 steps of "
    "32 windows), then 4 epochs (400 steps) for every method, 2 CPU cores",
    "python benchmarks/evidence.py --model gpt_austen --tag evidence_lm",
  ),
  (
    "evidence_lm_structured_raw.json",
    "2:4 on the byte-level GPT (issue 23): 2:4 GSM (AdamW, passive weights shrink) vs magnitude "
    "2:4 + fine-tuning, every pooled kernel, the same dense models and budget, 2 CPU cores",
    "python benchmarks/evidence.py --model gpt_austen --grid structured "
    "--tag evidence_lm_structured --rates_from benchmarks/results/evidence_lm_lr.json",
  ),
  (
    "evidence_lm_channels_raw.json",
    "Transformer channels on the byte-level GPT (issue 23): half the MLP neurons (C = 2 over "
    "the neurons of both blocks) or half the attention heads, channel GSM (AdamW, passive "
    "channels shrink) vs L1 pruning + fine-tuning, the same dense models and budget, 2 CPU cores",
    "python benchmarks/evidence.py --model gpt_austen --grid channels "
    "--tag evidence_lm_channels --rates_from benchmarks/results/evidence_lm_lr.json",
  ),
  (
    "evidence_lm_lr3e-3_raw.json",
    "The byte-level GPT with one learning rate, 3e-3, for GSM (AdamW) and magnitude + "
    "fine-tuning at 2x and 4x (issue 23, a check outside the sweep protocol: 3e-3 is GMP's "
    "chosen rate; GSM's sweep, at 10x, chose 1e-2), the same dense models and budget, 2 CPU cores",
    "python benchmarks/evidence.py --model gpt_austen --stage grid --learning_rate 0.003 "
    "--only method=gsm,compression=2 --tag evidence_lm_lr3e-3 (then gsm at 4, magnitude at 2 "
    "and 4)",
  ),
  (
    "evidence_lm_channels_lr3e-3_raw.json",
    "Transformer channels with one learning rate, 3e-3, for every method (issue 23, a check "
    "outside the sweep protocol), the same dense models and budget, 2 CPU cores",
    "python benchmarks/evidence.py --model gpt_austen --grid channels --stage grid "
    "--learning_rate 0.003 --tag evidence_lm_channels_lr3e-3",
  ),
  (
    "evidence_vit_raw.json",
    "The tiny ViT on Fashion-MNIST (issue 23): GSM with AdamW vs GMP, a 6-epoch dense model, "
    "then 6 epochs for each (GMP: 3 + 3 of fine-tuning), 2 CPU cores",
    "python benchmarks/evidence.py --model vit_fashion --tag evidence_vit",
  ),
)
ORDER = (
  evidence.METHODS
  + ("gsm_ramp8", "gsm_ramp16", "gsm_sgd")
  + evidence.VARIANTS
  + evidence.TICKETS
  + evidence.STRUCTURED
  + tuple(evidence.GROUP_METHODS)
)
NO_FINETUNE_VARIANTS = ("gsm_gradual", "gsm_ema", "gsm_age")
FULL_BUDGET = 60  # the protocol's B; shorter budgets are the budget curve's


def scale(metric: str) -> float:
  """Accuracies are printed in points (x100), bits per byte as they are."""
  return 100.0 if metric == "accuracy" else 1.0


def pct(stat: tuple[float, float], seeds: int, metric: str = "accuracy") -> str:
  """mean ± std of a metric over seeds (accuracy in %, 2 decimals; bits per byte, 4)."""
  mean, std = (scale(metric) * v for v in stat)
  digits = 2 if metric == "accuracy" else 4
  return f"{mean:.{digits}f} ± {std:.{digits}f}" + ("" if seeds >= 3 else f" (n={seeds})")


def diff_text(diff: float, metric: str) -> str:
  return f"{diff:+.2f}" if metric == "accuracy" else f"{diff:+.4f}"


def clear(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, bool | None]:
  """(a - b in points (bits per byte), whether |a - b| > 2 standard errors; None with one seed)."""
  metric = a.get("metric", "accuracy")
  (ma, sa), (mb, sb) = a[f"{metric}_final"], b[f"{metric}_final"]
  k = scale(metric)
  diff = k * (ma - mb)
  if min(a["seeds"], b["seeds"]) < 2:
    return diff, None
  se = k * math.sqrt(sa**2 / a["seeds"] + sb**2 / b["seeds"])
  return diff, abs(diff) > 2 * se


def by_compression(
  rows: list[dict[str, Any]], model: str, budget: int, diverged: dict[tuple, int] | None = None
) -> list[str]:
  """One table: a row per method, a column per C (test accuracy %, mean ± std).

  ``diverged`` counts the seeds whose run diverged per (model, method, C, budget).
  """
  diverged = diverged or {}
  mine = [r for r in rows if r["model"] == model and r["budget"] == budget and r["stage"] == "grid"]
  cs = sorted({r["compression"] for r in mine})
  methods = [m for m in ORDER if any(r["method"] == m for r in mine)]
  failed_here = {k[1] for k in diverged if (k[0], k[3]) == (model, budget)}
  methods += [m for m in ORDER if m not in methods and m in failed_here]
  if not mine:
    return []
  metric = mine[0].get("metric", "accuracy")
  what = "test accuracy %" if metric == "accuracy" else "test bits per byte, lower is better"
  macs = (
    "; MACs: the narrowed model's / the dense model's"
    if any("macs_fraction" in r for r in mine)
    else ""
  )
  lines = [
    f"**{model}, {budget} epochs after the dense model** ({what}, mean ± std over seeds{macs})",
    "",
    "| method | lr | " + " | ".join(f"{c:g}x" for c in cs) + " |",
    "|---|---|" + "---|" * len(cs),
  ]
  dense = [
    r
    for r in mine
    if r["method"]
    in ("gsm", "gsm_gradual", "magnitude", *evidence.STRUCTURED, *evidence.GROUP_METHODS)
  ]
  for m in methods:
    cells = []
    for c in cs:
      row = next((r for r in mine if r["method"] == m and r["compression"] == c), None)
      text = pct(row[f"{metric}_final"], row["seeds"], metric) if row else ""
      if row and "macs_fraction" in row:  # channel methods: the narrowed model's MACs
        text += f"; MACs {row['macs_fraction']:.3f}"
      failed = diverged.get((model, m, c, budget), 0)
      cells.append(f"{text}{'; ' if text else ''}{failed} diverged" if failed else text)
    lr = next((r["learning_rate"] for r in mine if r["method"] == m), None)
    lines.append(f"| {m} | {evidence._rate(lr)} | " + " | ".join(cells) + " |")
  if dense:
    lines.append(
      "| *dense model* | | "
      + " | ".join(
        pct(
          next(r for r in dense if r["compression"] == c)[f"dense_{metric}"],
          next(r for r in dense if r["compression"] == c)["seeds"],
          metric,
        )
        if any(r["compression"] == c for r in dense)
        else ""
        for c in cs
      )
      + " |"
    )
  return lines + [""]


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
  """Per (model, C, budget): the winner, and every other method against it."""
  lines = []
  grid = [r for r in rows if r["stage"] == "grid"]
  cells = sorted({(r["model"], r["compression"], r["budget"], family(r["method"])) for r in grid})
  for model, c, b, kind in cells:
    mine = [
      r
      for r in grid
      if (r["model"], r["compression"], r["budget"], family(r["method"])) == (model, c, b, kind)
    ]
    if len(mine) < 2:
      continue
    metric = mine[0].get("metric", "accuracy")
    sign = -1.0 if evidence.LARGER_IS_BETTER[metric] else 1.0
    mine.sort(key=lambda r: sign * r[f"{metric}_final"][0])
    best = mine[0]
    others = []
    for r in mine[1:]:
      diff, is_clear = clear(r, best)
      label = {True: "clear", False: "within the spread", None: "one seed"}[is_clear]
      others.append(f"{r['method']} {diff_text(diff, metric)} ({label})")
    lines.append(
      f"- {model}, {c:g}x{' ' + kind if kind else ''}, {b} epochs: **{best['method']}** "
      f"{pct(best[f'{metric}_final'], best['seeds'], metric)}; " + "; ".join(others) + "."
    )
    lines += _variant_line(mine)
  return lines


def family(method: str) -> str:
  """What a method's C counts when it is not the pool's weights: 'neurons' or 'heads' (the
  transformer channel grid's two comparisons), else ''."""
  return evidence.GROUP_METHODS[method][1] if method in evidence.GROUP_METHODS else ""


def _variant_line(rows: list[dict[str, Any]]) -> list[str]:
  """The best GSM variant with no fine-tuning against the paper's rule, in one cell."""
  gsm = next((r for r in rows if r["method"] == "gsm"), None)
  variants = [r for r in rows if r["method"] in NO_FINETUNE_VARIANTS]
  if gsm is None or not variants:
    return []
  metric = gsm.get("metric", "accuracy")
  sign = 1.0 if evidence.LARGER_IS_BETTER[metric] else -1.0
  best = max(variants, key=lambda r: sign * r[f"{metric}_final"][0])
  diff, is_clear = clear(best, gsm)
  label = {True: "clear", False: "within the spread", None: "one seed"}[is_clear]
  return [
    f"  - best GSM variant with no fine-tuning: {best['method']}, {diff_text(diff, metric)} "
    f"({label}) vs gsm."
  ]


def cut_costs(
  records: list[dict[str, Any]], method: str = "gsm", metric: str = "accuracy"
) -> dict[tuple, list[float]]:
  """Per (model, C, budget): each seed's cost of `method`'s final cut: test accuracy just
  before the cut minus just after it, in points (bits per byte: after minus before)."""
  costs: dict[tuple, list[float]] = {}
  sign = scale(metric) if evidence.LARGER_IS_BETTER[metric] else -scale(metric)
  for r in records:
    if (r["stage"], r["status"], r["method"]) != ("grid", "done", method):
      continue
    if evidence.METRIC.get(r["model"], "accuracy") != metric:
      continue
    before, after = r.get(f"{metric}_before_prune"), r.get(f"{metric}_after_prune")
    if before is not None and after is not None:
      key = (r["model"], r["compression"], r["budget"])
      costs.setdefault(key, []).append(sign * (before - after))
  return costs


def cut_table(records: list[dict[str, Any]]) -> list[str]:
  """The cut cost of GSM and its no-fine-tuning variants per cell: mean and max over seeds."""
  lines = []
  metric = evidence.METRIC.get(records[0]["model"], "accuracy") if records else "accuracy"
  digits = 2 if metric == "accuracy" else 4
  for method in ("gsm", "gsm_sgd", "gsm_ramp8", "gsm_ramp16", *NO_FINETUNE_VARIANTS):
    for (model, c, budget), costs in sorted(cut_costs(records, method, metric).items()):
      lines.append(
        f"| {method} | {model} | {c:g}x | {budget} | {len(costs)} | "
        f"{sum(costs) / len(costs):.{digits}f} | {max(costs):.{digits}f} |"
      )
  if not lines:
    return []
  unit = (
    "test accuracy just before it minus just after it, points"
    if metric == "accuracy"
    else "test bits per byte just after it minus just before it"
  )
  head = [
    f"The final cut's cost ({unit}; no fine-tuning follows it):",
    "",
    "| method | model | C | epochs | seeds | mean cost | max cost |",
    "|---|---|---|---|---|---|---|",
  ]
  return head + lines + [""]


def full_budget(model: str) -> int:
  """The protocol's budget B of a model: 60 epochs for the LeNets, the transformer grid's."""
  return evidence.TRANSFORMERS[model].budget if model in evidence.TRANSFORMERS else FULL_BUDGET


def cut_sentence(cells: dict[tuple, list[float]]) -> str:
  """GSM's cut cost over cells keyed (..., model, C, budget): the largest mean over seeds
  with the model's full budget or more, and per shorter budget."""
  means = {key: sum(v) / len(v) for key, v in cells.items()}
  full = {key for key in cells if key[-1] >= full_budget(key[-3])}
  if not full:
    return ""
  worst = max(means[key] for key in full)
  worst_seed = max(max(cells[key]) for key in full)
  models = sorted({key[-3] for key in full if key[-3] in evidence.TRANSFORMERS})
  others = "".join(f", {full_budget(m)} for {m}" for m in models)
  text = (
    f"GSM's final cut costs at most {worst:.2f} point (mean over seeds; {worst_seed:.2f} for "
    f"one seed) in every cell with the full budget ({FULL_BUDGET} or more epochs after the "
    f"dense model{others})"
  )
  short = sorted({key[-1] for key in cells if key not in full}, reverse=True)
  parts = [
    f"{max(means[key] for key in cells if key[-1] == b and key not in full):.2f} with {b} epochs"
    for b in short
  ]
  return text + (", but " + " and ".join(parts) if parts else "")


def all_cut_costs(results: str = RESULTS) -> dict[tuple, list[float]]:
  """GSM's cut costs per (source, model, C, budget), over every source file that exists."""
  cells = {}
  for name, _, _ in SOURCES:
    path = os.path.join(results, name)
    if os.path.exists(path):
      records = evidence.read_json(path, {"records": []})["records"]
      cells.update({(name, *key): v for key, v in cut_costs(records).items()})
  return cells


def tickets(rows: list[dict[str, Any]]) -> list[str]:
  mine = [r for r in rows if r["stage"] == "ticket"]
  if not mine:
    return []
  lines = [
    "| model | C | magnitude ticket | GSM ticket | GSM - magnitude |",
    "|---|---|---|---|---|",
  ]
  for model, c in sorted({(r["model"], r["compression"]) for r in mine}):
    pair = {r["method"]: r for r in mine if (r["model"], r["compression"]) == (model, c)}
    mag, gsm = pair.get("ticket_magnitude"), pair.get("ticket_gsm")
    diff = ""
    if mag and gsm:
      d, is_clear = clear(gsm, mag)
      diff = f"{d:+.2f}" + {True: " (clear)", False: " (within the spread)", None: ""}[is_clear]
    lines.append(
      f"| {model} | {c:g}x | {pct(mag['accuracy_final'], mag['seeds']) if mag else ''} | "
      f"{pct(gsm['accuracy_final'], gsm['seeds']) if gsm else ''} | {diff} |"
    )
  return lines + [""]


def section(results: str = RESULTS) -> str:
  """The generated evidence section, from every source file that exists."""
  out = []
  sentence = cut_sentence(all_cut_costs(results))
  if sentence:
    out += [f"**GSM's cut, over every run below:** {sentence}.", ""]
  for name, title, command in SOURCES:
    path = os.path.join(results, name)
    if not os.path.exists(path):
      continue
    records = evidence.read_json(path, {"records": []})["records"]
    rows = evidence.aggregate(records)
    if not rows:
      continue
    machine = next((r.get("machine") for r in records if r.get("machine")), "")
    out += [f"### {title}", "", f"Command: `{command}`; raw records: `benchmarks/results/{name}`."]
    out += [machine, ""] if machine else [""]
    keys = sorted({(r["model"], r["budget"]) for r in rows if r["stage"] == "grid"})
    diverged: dict[tuple, int] = {}
    for r in records:
      if r["stage"] == "grid" and r["status"] == "diverged":
        key = (r["model"], r["method"], r["compression"], r["budget"])
        diverged[key] = diverged.get(key, 0) + 1
    for model, budget in keys:
      out += by_compression(rows, model, budget, diverged)
    unit = "bits per byte" if rows[0].get("metric") == "bits_per_byte" else "points"
    out += [f"Verdicts (differences in {unit} against the best method of each cell):", ""]
    out += verdicts(rows) + [""]
    out += cut_table(records)
    if any(r["stage"] == "ticket" for r in rows):
      out += [
        "Winning tickets (Table 4 protocol: theta_0 * mask retrained with the dense schedule):",
        "",
      ]
      out += tickets(rows)
  return "\n".join(out).rstrip() + "\n"


def replace_between(text: str, block: str) -> str:
  """``text`` with the part between BEGIN and END replaced (both added on top when absent)."""
  if BEGIN not in text:
    return f"{BEGIN}\n{block}{END}\n\n{text}"
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--results", default=RESULTS)
  p.add_argument("--doc", default=os.path.join(ROOT, "docs", "RESULTS.md"))
  args = p.parse_args(argv)
  with open(args.doc) as f:
    text = f.read()
  with open(args.doc, "w") as f:
    f.write(replace_between(text, section(args.results)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
