"""The one summary of a run: ``summary.json``, ``final_model/``, the plots, the table.

Every method writes the same schema (docs/TRAINING.md lists every field):

* run: ``schema_version``, ``task``, ``model``, ``dataset``, ``data_source``,
  ``num_train``, ``num_test``, ``method``, ``compression_target`` (None for
  the ``dense`` method), ``dense_source``, ``epochs`` ({phase: epochs trained});
* for every metric m of the task (``accuracy``; for language modelling
  ``bits_per_byte`` too): ``dense_m``, ``m_before_prune`` and
  ``m_after_prune`` (around the last pruning step, before any fine-tuning),
  ``m_final`` (the final model); ``loss_final``;
* validation (a fixed split for text; ``config.validation_examples`` held-out
  training examples for images, else 0 and None): ``num_validation``, and for
  every metric ``dense_validation_m``, ``validation_m_before_prune``,
  ``validation_m_final``;
* ``samples`` (language modelling): greedy continuations of a fixed prompt by
  the dense and the final model;
* sparsity of the final model: ``pool_size``, ``keep`` (Q), ``nonzeros``,
  ``compression_reached``, ``layers`` (``gsm_optax.SparsityReport``);
* ``method_results``: what the method's transitions recorded besides the two
  accuracies above; ``devices``: backend, device kind, number of devices and
  processes, mesh shape; ``wall_time_s``: seconds per phase, the final
  evaluation and this invocation.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import os
from typing import Any

import gsm_optax
from training import checkpoints
from training import plots
from training import strict_json
from training.tasks.base import format_metric

SCHEMA_VERSION = 1


# The project's one JSON writer, under the names the training program uses.
finite_json = strict_json.finite_json
json_line = strict_json.json_line
write_json = strict_json.write_json


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
  task: Any,
  pool: Any = None,
  num_validation: int = 0,
) -> dict[str, Any]:
  """The summary.json dict (without ``wall_time_s``) of a finished run."""
  sparsity = gsm_optax.sparsity_report(params, pool=pool)
  results = dict(progress.results)
  compression = float(config.compression) if prunes else None
  dense, dense_validation = progress.dense_metrics, progress.dense_validation_metrics or {}
  summary = {
    "schema_version": SCHEMA_VERSION,
    "task": task.name,
    "model": config.model,
    "dataset": config.dataset,
    "data_source": dataset.source,
    "num_train": dataset.num_train,
    "num_test": dataset.num_test,
    "method": config.method,
    "compression_target": compression,
    "dense_source": progress.dense_source,
    "epochs": epochs_per_phase(progress.history),
  }
  for m in task.metrics:
    summary[f"dense_{m}"] = dense.get(m)
    summary[f"{m}_before_prune"] = results.pop(f"{m}_before_prune", None)
    summary[f"{m}_after_prune"] = results.pop(f"{m}_after_prune", None)
    summary[f"{m}_final"] = final[m]
  summary["num_validation"] = int(num_validation)
  for m in task.metrics:
    summary[f"dense_validation_{m}"] = dense_validation.get(m)
    summary[f"validation_{m}_before_prune"] = results.pop(f"validation_{m}_before_prune", None)
    summary[f"validation_{m}_final"] = final.get(f"validation_{m}")
  keep = gsm_optax.keep_count(params, compression, pool=pool) if prunes else sparsity.total_size
  summary.update(
    loss_final=final["loss"],
    pool_size=int(sparsity.total_size),
    keep=int(keep),
    nonzeros=int(sparsity.total_nonzeros),
    compression_reached=float(sparsity.total_size) / max(int(sparsity.total_nonzeros), 1),
    layers=sparsity.to_dict()["leaves"],
    method_results=results,
  )
  return summary


def summary_line(summary: Mapping[str, Any], metric: str = "accuracy") -> str:
  """One line: the metric along the run, the compression reached, the epochs."""
  show = functools.partial(format_metric, metric)
  parts = [f"dense {show(summary[f'dense_{metric}'])}"]
  if summary[f"{metric}_after_prune"] is not None:
    if summary[f"{metric}_before_prune"] is not None:
      parts.append(f"before pruning {show(summary[f'{metric}_before_prune'])}")
    parts.append(f"after pruning {show(summary[f'{metric}_after_prune'])}")
  parts.append(f"final {show(summary[f'{metric}_final'])}")
  name = "" if metric == "accuracy" else f"{metric.replace('_', ' ')} "
  line = (
    f"{summary['method']}: {name}{' -> '.join(parts)}; compression "
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
  task: Any,
  pool: Any = None,
  num_validation: int = 0,
  samples: Mapping[str, str] | None = None,
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
    task=task,
    pool=pool,
    num_validation=num_validation,
  )
  if samples is not None:
    summary["samples"] = dict(samples)
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
      metric=task.headline,
      final=final[task.headline] if prunes else None,
      title=title,
    )
  print(gsm_optax.sparsity_report(state.params, pool=pool))
  for name, text in (samples or {}).items():
    print(f"sample of the {name} model: {text!r}")
  print(summary_line(summary, task.headline))
  return summary
