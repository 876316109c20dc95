"""The one summary of a run: ``summary.json``, ``final_model/``, the plots, the table.

Every method writes the same schema (docs/TRAINING.md lists every field):

* run: ``schema_version``, ``model``, ``dataset``, ``data_source``,
  ``num_train``, ``num_test``, ``method``, ``compression_target`` (None for
  the ``dense`` method), ``dense_source``, ``epochs`` ({phase: epochs trained});
* accuracies: ``dense_accuracy``, ``accuracy_before_prune`` and
  ``accuracy_after_prune`` (around the last pruning step, before any
  fine-tuning), ``accuracy_final`` and ``loss_final`` (the final model);
* validation (``config.validation_examples`` held-out training examples, else
  0 and None): ``num_validation``, ``dense_validation_accuracy``,
  ``validation_accuracy_before_prune``, ``validation_accuracy_final``;
* sparsity of the final model: ``pool_size``, ``keep`` (Q), ``nonzeros``,
  ``compression_reached``, ``layers`` (``gsm_optax.SparsityReport``);
* ``method_results``: what the method's transitions recorded besides the two
  accuracies above; ``devices``: backend, device kind, number of devices and
  processes, mesh shape; ``wall_time_s``: seconds per phase, the final
  evaluation and this invocation.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os
from typing import Any

import gsm_optax
from training import checkpoints
from training import plots

SCHEMA_VERSION = 1
_ACCURACY_RESULTS = ("accuracy_before_prune", "accuracy_after_prune")


def finite_json(obj: Any) -> Any:
  """``obj`` with every non-finite float replaced by None: JSON has no NaN or inf."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, Mapping):
    return {key: finite_json(value) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(value) for value in obj]
  return obj


def json_line(row: Mapping[str, Any]) -> str:
  """One line of metrics.jsonl: strict JSON (non-finite numbers as null)."""
  return json.dumps(finite_json(row), allow_nan=False) + "\n"


def write_json(path: str, obj: Any) -> None:
  """Writes strict JSON atomically (a temporary file, then a rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(finite_json(obj), f, indent=2, allow_nan=False)
    f.write("\n")
  os.replace(tmp, path)


def epochs_per_phase(history: list[Mapping[str, Any]]) -> dict[str, int]:
  """{phase: number of epochs trained}, in the order the phases ran."""
  epochs: dict[str, int] = {}
  for row in history:
    epochs[row["phase"]] = epochs.get(row["phase"], 0) + 1
  return epochs


def build_summary(
  *,
  config: Any,
  dataset: Any,
  progress: Any,
  params: Any,
  final: Mapping[str, float],
  prunes: bool,
) -> dict[str, Any]:
  """The summary.json dict (without ``wall_time_s``) of a finished run."""
  sparsity = gsm_optax.sparsity_report(params)
  results = dict(progress.results)
  compression = float(config.compression) if prunes else None
  return {
    "schema_version": SCHEMA_VERSION,
    "model": config.model,
    "dataset": config.dataset,
    "data_source": dataset.source,
    "num_train": dataset.num_train,
    "num_test": dataset.num_test,
    "method": config.method,
    "compression_target": compression,
    "dense_source": progress.dense_source,
    "epochs": epochs_per_phase(progress.history),
    "dense_accuracy": progress.dense_accuracy,
    "accuracy_before_prune": results.pop("accuracy_before_prune", None),
    "accuracy_after_prune": results.pop("accuracy_after_prune", None),
    "accuracy_final": final["accuracy"],
    "num_validation": int(config.validation_examples),
    "dense_validation_accuracy": progress.dense_validation_accuracy,
    "validation_accuracy_before_prune": results.pop("validation_accuracy_before_prune", None),
    "validation_accuracy_final": final.get("validation_accuracy"),
    "loss_final": final["loss"],
    "pool_size": int(sparsity.total_size),
    "keep": gsm_optax.keep_count(params, compression) if prunes else int(sparsity.total_size),
    "nonzeros": int(sparsity.total_nonzeros),
    "compression_reached": float(sparsity.total_size) / max(int(sparsity.total_nonzeros), 1),
    "layers": sparsity.to_dict()["leaves"],
    "method_results": results,
  }


def _pct(x: float | None) -> str:
  return "n/a" if x is None else f"{100.0 * x:.2f}%"


def summary_line(summary: Mapping[str, Any]) -> str:
  """One line: the accuracies along the run, the compression reached, the epochs."""
  parts = [f"dense {_pct(summary['dense_accuracy'])}"]
  if summary["accuracy_after_prune"] is not None:
    if summary["accuracy_before_prune"] is not None:
      parts.append(f"before pruning {_pct(summary['accuracy_before_prune'])}")
    parts.append(f"after pruning {_pct(summary['accuracy_after_prune'])}")
  parts.append(f"final {_pct(summary['accuracy_final'])}")
  line = (
    f"{summary['method']}: {' -> '.join(parts)}; compression "
    f"{summary['compression_reached']:.1f}x ({summary['nonzeros']:,} of "
    f"{summary['pool_size']:,} pooled weights); epochs {summary['epochs']}"
  )
  extra = summary["method_results"]
  if "largest_passive_abs_weight_before_cut" in extra:
    line += (
      f"; largest passive |w| before the cut "
      f"{extra['largest_passive_abs_weight_before_cut']:.3g} "
      f"(smallest kept {extra['smallest_kept_abs_weight_before_cut']:.3g})"
    )
  return line


def write_report(
  *,
  config: Any,
  dataset: Any,
  workdir: str,
  progress: Any,
  state: Any,
  final: Mapping[str, float],
  prunes: bool,
  wall_time_s: Mapping[str, float],
  devices: Mapping[str, Any],
  write: bool = True,
) -> dict[str, Any]:
  """Writes ``final_model/``, ``summary.json`` and the plots, prints the table; the summary.

  Every process takes part in saving ``final_model/`` (orbax writes sharded
  arrays from all hosts); only the process with ``write`` (process 0) writes
  the JSON and the plots and prints.
  """
  checkpoints.save_model(
    os.path.join(workdir, "final_model"),
    {"params": state.params, "batch_stats": state.batch_stats},
  )
  summary = build_summary(
    config=config,
    dataset=dataset,
    progress=progress,
    params=state.params,
    final=final,
    prunes=prunes,
  )
  summary["devices"] = dict(devices)
  summary["wall_time_s"] = dict(wall_time_s)
  if not write:
    return summary
  write_json(os.path.join(workdir, "summary.json"), summary)
  if config.plots:
    target = f", C={config.compression:g}" if prunes else ""
    title = f"{config.model} on {config.dataset}, {config.method}{target}"
    plots.plot_sparsity(summary["layers"], os.path.join(workdir, "sparsity.png"), title=title)
    plots.plot_curves(
      progress.history,
      os.path.join(workdir, "curves.png"),
      accuracy_final=final["accuracy"] if prunes else None,
      title=title,
    )
  print(gsm_optax.sparsity_report(state.params))
  print(summary_line(summary))
  return summary
