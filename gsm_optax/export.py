"""Export: pruned kernels as sparse arrays, a compact file format, N:M storage.

* `to_bcoo` turns pooled kernels into `jax.experimental.sparse.BCOO` arrays;
  `sparse_dense` runs a Dense layer's ``x @ W + b`` with such a kernel.
* `save_sparse` / `load_sparse` store a pruned pytree in one ``.npz``: pooled
  kernels CSR-like (rows = every axis but the last), other leaves as they are.
* `nm_compress` / `nm_decompress` store an N:M kernel as its N kept values and
  their positions in each group of M. Storage only: JAX has no public 2:4 (N:M)
  sparse matmul, so an N:M kernel is decompressed to dense to compute with it.
"""

from __future__ import annotations

import json
import math
from typing import Any
from typing import Optional

import jax
from jax.experimental import sparse
import jax.numpy as jnp
import numpy as np

from gsm_optax import _pool

_META = "__meta__"


# --------------------------------------------------------------------------
# BCOO kernels.


def to_bcoo(params: Any, *, pool: _pool.Pool = None) -> Any:
  """The pytree with every pooled kernel as a BCOO array (its non-zeros only)."""
  mask = _pool.resolve_pool(params, pool)
  return jax.tree.map(lambda p, m: sparse.BCOO.fromdense(p) if m else p, params, mask)


def sparse_dense(
  x: jax.Array, kernel: sparse.BCOO | jax.Array, bias: Optional[jax.Array] = None
) -> jax.Array:
  """``x @ kernel + bias`` for a (in, out) kernel, BCOO or dense (jit-able)."""
  y = x @ kernel  # BCOO: jax.experimental.sparse's bcoo_dot_general
  return y if bias is None else y + bias


# --------------------------------------------------------------------------
# The .npz format.


def _index_dtype(largest: int) -> np.dtype:
  """The smallest unsigned integer dtype that holds 0..largest."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if largest <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  return np.dtype(np.uint64)


def _raw(array: np.ndarray) -> np.ndarray:
  """NumPy-native bits of `array` (bfloat16 and other ml_dtypes as unsigned ints)."""
  if array.dtype.kind == "V":
    return array.view(_index_dtype(2 ** (8 * array.dtype.itemsize) - 1))
  return array


def _unraw(array: np.ndarray, dtype: str) -> np.ndarray:
  return array if array.dtype.name == dtype else array.view(jnp.dtype(dtype))


def _csr(kernel: np.ndarray) -> dict[str, np.ndarray]:
  """values, column indices and row pointers of `kernel` as (prod(shape[:-1]), shape[-1])."""
  rows = kernel.reshape(-1, kernel.shape[-1]) if kernel.ndim else kernel.reshape(1, 1)
  nonzero = rows != 0
  counts = nonzero.sum(axis=1)
  _, cols = np.nonzero(nonzero)
  indptr = np.concatenate([[0], np.cumsum(counts)])
  return dict(
    values=_raw(rows[nonzero]),
    indices=cols.astype(_index_dtype(max(rows.shape[1] - 1, 0))),
    indptr=indptr.astype(_index_dtype(int(indptr[-1]))),
  )


def _dense_from_csr(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape, dtype):
  cols = shape[-1] if shape else 1
  rows = np.zeros((math.prod(shape) // max(cols, 1) if cols else 0, cols), jnp.dtype(dtype))
  row_of = np.repeat(np.arange(rows.shape[0]), np.diff(indptr.astype(np.int64)))
  rows[row_of, indices.astype(np.int64)] = _unraw(values, dtype)
  return rows.reshape(shape)


def _path_entry(key: Any) -> list[Any]:
  if isinstance(key, jax.tree_util.DictKey):
    return ["dict", key.key]
  if isinstance(key, jax.tree_util.SequenceKey):
    return ["seq", key.idx]
  if isinstance(key, jax.tree_util.GetAttrKey):
    return ["dict", key.name]
  raise ValueError(f"save_sparse: cannot store the key {key!r} ({type(key).__name__}).")


def save_sparse(path: str, params: Any, *, pool: _pool.Pool = None) -> None:
  """Writes `params` to one .npz: pooled kernels CSR-like, other leaves dense.

  Per pooled kernel (rows = every axis but the last): values in the kernel's
  dtype, column indices in the smallest unsigned dtype that fits, row
  pointers. The tree is stored as key paths (dicts, lists, attributes; no
  pickle); `load_sparse` rebuilds it as nested dicts and lists.
  """
  mask = _pool.resolve_pool(params, pool)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  arrays, leaves = {}, []
  for i, ((key_path, leaf), pooled) in enumerate(zip(flat, jax.tree.leaves(mask))):
    array = np.asarray(leaf)
    leaves.append(
      dict(
        path=[_path_entry(k) for k in key_path],
        shape=list(array.shape),
        dtype=array.dtype.name,
        sparse=bool(pooled),
      )
    )
    if pooled:
      for name, part in _csr(array).items():
        arrays[f"{i}.{name}"] = part
    else:
      arrays[f"{i}.dense"] = _raw(array)
  meta = json.dumps(dict(format="gsm_optax.sparse/1", leaves=leaves)).encode()
  arrays[_META] = np.frombuffer(meta, np.uint8)
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def _insert(tree: Any, path: list[list[Any]], value: np.ndarray) -> Any:
  """Puts `value` at `path` in nested dicts / lists, creating them as needed."""
  if not path:
    return value
  (kind, key), rest = path[0], path[1:]
  if tree is None:
    tree = {} if kind == "dict" else []
  if kind == "seq":
    tree.extend([None] * (key + 1 - len(tree)))
  tree[key] = _insert(tree[key] if kind == "seq" else tree.get(key), rest, value)
  return tree


def load_sparse(path: str) -> Any:
  """Reads a `save_sparse` file: the params (NumPy arrays) as nested dicts and lists."""
  with np.load(path, allow_pickle=False) as data:
    meta = json.loads(data[_META].tobytes().decode())
    tree = None
    for i, leaf in enumerate(meta["leaves"]):
      if leaf["sparse"]:
        value = _dense_from_csr(
          data[f"{i}.values"],
          data[f"{i}.indices"],
          data[f"{i}.indptr"],
          tuple(leaf["shape"]),
          leaf["dtype"],
        )
      else:
        value = _unraw(data[f"{i}.dense"], leaf["dtype"])
      tree = _insert(tree, leaf["path"], value)
  return tree


# --------------------------------------------------------------------------
# N:M storage.


def _nm_axis(shape: tuple[int, ...], n: int, m: int, axis: int, group: int) -> int:
  """Checks N, M, the axis and that `group` divides it; returns the axis, non-negative."""
  if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m <= 256):
    raise ValueError(f"N:M storage needs integers 1 <= n <= m <= 256, got n={n!r}, m={m!r}.")
  if not -len(shape) <= axis < len(shape):
    raise ValueError(f"axis={axis} does not exist in a kernel of shape {shape}.")
  axis %= len(shape)
  if shape[axis] % group:
    raise ValueError(f"{group} does not divide the size {shape[axis]} of axis {axis} of {shape}.")
  return axis


def nm_compress(kernel: Any, n: int, m: int, *, axis: int = -2) -> tuple[np.ndarray, np.ndarray]:
  """(values, indices) of an N:M kernel: the N kept entries of each group of M.

  Groups are M consecutive entries along `axis`; both outputs have that axis
  shrunk to size * N / M. `indices` (uint8) is each value's position in its
  group, increasing; a group with fewer than N non-zeros is padded with zeros
  at free positions. Storage only: JAX has no public N:M (2:4) sparse matmul.

  Raises:
    ValueError: bad n, m or axis, or a group with more than N non-zeros.
  """
  array = np.asarray(kernel)
  axis = _nm_axis(array.shape, n, m, axis, m)
  moved = np.moveaxis(array, axis, -1)
  groups = moved.reshape(*moved.shape[:-1], -1, m)
  nonzero = groups != 0
  over = int(np.sum(nonzero.sum(axis=-1) > n))
  if over:
    raise ValueError(
      f"the kernel is not {n}:{m} along axis {axis}: {over} of {nonzero[..., 0].size} groups "
      f"hold more than {n} non-zeros (prune it with gsm_optax.prune_nm first)."
    )
  # Non-zeros first (in order), then zeros; keep N, sorted by position.
  order = np.sort(np.argsort(~nonzero, axis=-1, kind="stable")[..., :n], axis=-1)
  values = np.take_along_axis(groups, order, axis=-1)

  def back(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a.reshape(*moved.shape[:-1], -1), -1, axis)

  return back(values), back(order.astype(np.uint8))


def nm_decompress(values: Any, indices: Any, n: int, m: int, *, axis: int = -2) -> np.ndarray:
  """The dense kernel of `nm_compress`'s (values, indices)."""
  values, indices = np.asarray(values), np.asarray(indices)
  if values.shape != indices.shape:
    raise ValueError(f"values {values.shape} and indices {indices.shape} differ in shape.")
  axis = _nm_axis(values.shape, n, m, axis, n)
  moved_v = np.moveaxis(values, axis, -1)
  moved_i = np.moveaxis(indices, axis, -1).astype(np.int64)
  groups_v = moved_v.reshape(*moved_v.shape[:-1], -1, n)
  groups_i = moved_i.reshape(groups_v.shape)
  dense = np.zeros((*groups_v.shape[:-1], m), values.dtype)
  np.put_along_axis(dense, groups_i, groups_v, axis=-1)
  return np.moveaxis(dense.reshape(*moved_v.shape[:-1], -1), -1, axis)


def nm_storage_bytes(
  shape: tuple[int, ...], dtype: Any, n: int, m: int, *, packed: bool = False
) -> int:
  """Bytes of `nm_compress`'s output for a kernel: values, plus one uint8 index
  per value (``packed``: ceil(log2 M) bits per index, as 2:4 hardware stores them)."""
  count = math.prod(shape) * n // m
  index_bits = max(1, math.ceil(math.log2(m))) if packed else 8
  return count * jnp.dtype(dtype).itemsize + math.ceil(count * index_bits / 8)
