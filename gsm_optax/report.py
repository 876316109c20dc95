"""Per-leaf and total sparsity of the pool."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from gsm_optax import _pool


@dataclasses.dataclass(frozen=True)
class LeafSparsity:
  """Sparsity of one pooled leaf."""

  path: str
  shape: tuple[int, ...]
  size: int
  nonzeros: int

  @property
  def density(self) -> float:
    return self.nonzeros / self.size if self.size else 0.0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """Sparsity of every pooled leaf and of the whole pool; str() is a table."""

  rows: tuple[LeafSparsity, ...]

  @property
  def total_size(self) -> int:
    return sum(r.size for r in self.rows)

  @property
  def total_nonzeros(self) -> int:
    return sum(r.nonzeros for r in self.rows)

  @property
  def density(self) -> float:
    """non-zeros / |pool|; 0.0 for a pool of no weights (every leaf empty), as
    `LeafSparsity.density` of an empty leaf."""
    size = self.total_size
    return self.total_nonzeros / size if size else 0.0

  @property
  def compression(self) -> float:
    """|pool| / non-zeros; inf when no pooled weight is non-zero (also for a
    pool of no weights, whose density is 0.0)."""
    nonzeros = self.total_nonzeros
    return self.total_size / nonzeros if nonzeros else float("inf")

  def to_dict(self) -> dict[str, Any]:
    return {
      "leaves": [
        dict(path=r.path, shape=list(r.shape), size=r.size, nonzeros=r.nonzeros, density=r.density)
        for r in self.rows
      ],
      "total_size": self.total_size,
      "total_nonzeros": self.total_nonzeros,
      "density": self.density,
      "compression": self.compression,
    }

  def __str__(self) -> str:
    header = ("path", "shape", "size", "non-zeros", "density")
    lines = [
      (r.path, str(r.shape), str(r.size), str(r.nonzeros), f"{100 * r.density:.2f}%")
      for r in self.rows
    ]
    lines.append(
      ("total", "", str(self.total_size), str(self.total_nonzeros), f"{100 * self.density:.2f}%")
    )
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(5)]

    def fmt(row):
      return "  ".join(
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
      )

    rule = "-" * len(fmt(header))
    body = [fmt(header), rule] + [fmt(r) for r in lines[:-1]] + [rule, fmt(lines[-1])]
    body.append(f"compression {self.compression:.2f}x ({self.total_size} / {self.total_nonzeros})")
    return "\n".join(body)


def sparsity_report(params: Any, *, pool: _pool.Pool = None) -> SparsityReport:
  """Counts non-zeros per pooled leaf: density = nnz / size, C = |pool| / nnz.

  A pool of no weights (every pooled leaf of size 0) has density 0.0 and
  compression inf, like a pool of zeros, instead of dividing by zero.
  """
  mask = _pool.resolve_pool(params, pool)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  rows = []
  for (path, leaf), in_pool in zip(flat, jax.tree.leaves(mask)):
    if in_pool:
      value = np.asarray(leaf)
      rows.append(
        LeafSparsity(
          path=jax.tree_util.keystr(path),
          shape=tuple(value.shape),
          size=int(value.size),
          nonzeros=int(np.count_nonzero(value)),
        )
      )
  return SparsityReport(rows=tuple(rows))
