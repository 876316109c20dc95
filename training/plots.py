"""Figures written to the workdir: per-layer density and training curves."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the Agg backend)


def _short_name(path: str) -> str:
  """``"['block1']['conv']['kernel']"`` -> ``"block1/conv/kernel"``."""
  parts = re.findall(r"\['?([^'\]]*)'?\]", path)
  return "/".join(parts) if parts else path


def plot_sparsity(layers: Sequence[Mapping[str, Any]], path: str, *, title: str = "") -> None:
  """Bar chart of the density (nonzeros / size) of every pooled layer.

  Args:
      layers: one mapping per layer with keys ``path``, ``size``, ``nonzeros``
          and ``density``.
      path: the PNG file to write.
      title: figure title.
  """
  names = [_short_name(str(layer["path"])) for layer in layers]
  densities = [100.0 * float(layer["density"]) for layer in layers]
  fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2.0), 4.5))
  bars = ax.bar(range(len(names)), densities, color="tab:blue")
  if len(names) <= 24:
    for bar, layer in zip(bars, layers):
      ax.annotate(
        f"{int(layer['nonzeros']):,} / {int(layer['size']):,}",
        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
        xytext=(0, 2),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=7,
        rotation=90,
      )
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=0 if len(names) <= 6 else 90, fontsize=7)
  ax.set_ylabel("density after the cut (% non-zero)")
  ax.set_ylim(0, max(densities, default=1.0) * 1.45 + 1e-3)
  ax.set_title(title or "per-layer density")
  ax.text(
    0.99,
    0.98,
    "bar labels: non-zeros / size",
    transform=ax.transAxes,
    ha="right",
    va="top",
    fontsize=7,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_curves(
  history: Sequence[Mapping[str, Any]],
  path: str,
  *,
  metric: str = "accuracy",
  final: float | None = None,
  title: str = "",
) -> None:
  """The task's headline metric and the loss against the epoch, with the GSM phase shaded.

  Args:
      history: the per-epoch rows of ``metrics.jsonl`` (keys ``epoch``, ``phase``,
          ``train_loss``, ``test_loss``, ``train_<metric>``, ``test_<metric>``).
      path: the PNG file to write.
      metric: "accuracy" (drawn in %) or another metric (bits per byte).
      final: the metric of the final (pruned) model on the test split, drawn
          as a star at the last epoch.
      title: figure title.
  """
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
  scale = 100.0 if metric == "accuracy" else 1.0
  epochs = [row["epoch"] for row in history]
  for key, label, style in ((f"train_{metric}", "train", "--"), (f"test_{metric}", "test", "-")):
    ax_acc.plot(epochs, [scale * row[key] for row in history], style, label=label)
  for key, label, style in (("train_loss", "train", "--"), ("test_loss", "test", "-")):
    ax_loss.plot(epochs, [row[key] for row in history], style, label=label)
  if final is not None:
    ax_acc.plot(
      [epochs[-1] if epochs else 0],
      [scale * final],
      "r*",
      markersize=12,
      label="final model (test)",
    )
  # Shade the GSM epochs; the dense phase is the unshaded part before them.
  gsm_epochs = [row["epoch"] for row in history if row["phase"] == "gsm"]
  for ax in (ax_acc, ax_loss):
    if gsm_epochs:
      ax.axvspan(
        min(gsm_epochs) - 0.5,
        max(gsm_epochs) + 0.5,
        color="tab:orange",
        alpha=0.12,
        label="GSM phase",
      )
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
  ax_acc.set_ylabel("accuracy (%)" if metric == "accuracy" else metric.replace("_", " "))
  ax_loss.set_ylabel("cross-entropy loss")
  ax_loss.set_yscale("log")
  ax_acc.legend(loc="lower right" if metric == "accuracy" else "upper right")
  ax_loss.legend(loc="upper right")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
