"""Byte-level text for next-byte prediction: Jane Austen's six novels, offline.

The corpus is read from Debian's ``r-cran-janeaustenr`` package, which ships
the novels as an R lazy-load database (``janeaustenr/data/Rdata.rdx`` and
``Rdata.rdb``); a small reader of R's XDR serialization below reads it, with no
R and no extra Python dependency.  A novel's text is its lines joined with
``"\\n"`` plus a trailing ``"\\n"``, as UTF-8 bytes; the vocabulary is the 256
byte values.

Where the corpus comes from (``load_text``):

* an explicit ``data_dir`` is the only place looked at: a directory holding
  the unpacked package (``**/janeaustenr/data/Rdata.rdx``), or a plain UTF-8
  ``.txt`` file, or a directory holding exactly one (the user's own corpus, one
  document);
* ``data_dir=None`` looks in the cache (``<root>/janeaustenr`` with ``root``
  the ``cache_dir`` argument, else ``$GSM_OPTAX_DATA_CACHE``, else
  ``~/.cache/gsm_optax``), then in ``/usr/lib/R/site-library/janeaustenr`` (an
  installed package), then fetches the package into the cache with
  ``apt-get download`` and ``dpkg-deb -x`` (no root, no R: unpacked into a
  temporary directory, then renamed into place).

Splits (``split_corpus``) are fixed for every seed: per document the last 5 %
of the bytes are validation, the 5 % before them test, the first 90 % training;
each split is the concatenation of its spans over the documents in order (so a
window may cross from one document into the next).

``TextDataset`` has the interface the training driver uses of
``data.Dataset``: training batches are ``context + 1``-byte windows at random
starts, a pure function of ``(seed, epoch, batch)``; evaluation cuts its split
into consecutive windows.  Errors are ``data.DataError`` (data problems,
``data.DataNotFoundError`` when nothing is where it was looked for) or
``ValueError`` (bad arguments), each message one line.
"""

from __future__ import annotations

import bz2
from collections.abc import Iterator
import dataclasses
from fractions import Fraction
import glob
import gzip
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from typing import Any
import zlib

import numpy as np

from training.data import DataError
from training.data import DataNotFoundError
from training.data import _shard_rows

TEXT_DATASETS = ("austen", "text")  # "text": the user's own .txt file (an explicit data_dir)
AUSTEN_NOVELS = (  # the package's object names, in publication order (janeaustenr's austen_books)
  "sensesensibility",
  "prideprejudice",
  "mansfieldpark",
  "emma",
  "northangerabbey",
  "persuasion",
)
AUSTEN_PACKAGE = "r-cran-janeaustenr"
SYSTEM_AUSTEN_DIR = "/usr/lib/R/site-library/janeaustenr"
CACHE_ENV = "GSM_OPTAX_DATA_CACHE"
DEFAULT_CACHE_ROOT = "~/.cache/gsm_optax"
VOCAB_SIZE = 256

_RDX_PATTERN = os.path.join("**", "janeaustenr", "data", "Rdata.rdx")


# --------------------------------------------------------------------------- #
# R serialization (XDR), enough for a lazy-load database of character vectors
# --------------------------------------------------------------------------- #

_NILVALUE, _REF, _SYM, _LIST, _CHAR = 254, 255, 1, 2, 9
_VECTORS = {10: np.dtype(">i4"), 13: np.dtype(">i4"), 14: np.dtype(">f8")}  # LGL, INT, REAL
_STR, _VEC, _EXPR = 16, 19, 20
_LATIN1, _UTF8, _ASCII = 1 << 2, 1 << 3, 1 << 6


class _RReader:
  """Reads one XDR-serialized R object from ``data`` (``where`` names it in errors)."""

  def __init__(self, data: bytes, where: str):
    self.data, self.where, self.pos, self.refs = data, where, 0, []
    self.native = "utf-8"

  def fail(self, what: str) -> DataError:
    return DataError(f"{self.where}: {what} at byte {self.pos}; re-fetch the package")

  def take(self, n: int) -> bytes:
    if n < 0 or self.pos + n > len(self.data):
      raise self.fail(f"truncated R data ({n} bytes wanted)")
    self.pos += n
    return self.data[self.pos - n : self.pos]

  def int(self) -> int:
    return struct.unpack(">i", self.take(4))[0]

  def length(self) -> int:
    n = self.int()
    return (self.int() << 32) + (self.int() & 0xFFFFFFFF) if n == -1 else n  # long vector

  def read(self) -> Any:
    """The object after the header: ``"X\\n"``, format version 2 or 3."""
    if self.take(2) != b"X\n":
      raise self.fail("not R XDR serialization (no 'X\\n' header)")
    version = self.int()
    if version not in (2, 3):
      raise self.fail(f"R serialization version {version}, only 2 and 3 are read")
    self.take(8)  # the writer's R version, the oldest R that reads it
    if version == 3:
      self.native = self.take(self.int()).decode("ascii", "replace")
    return self.item()

  def item(self) -> Any:
    flags = self.int()
    kind, levels, has_attr = flags & 0xFF, flags >> 12, bool(flags & (1 << 9))
    if kind == _NILVALUE:
      return None
    if kind == _REF:
      index = flags >> 8 or self.int()
      if not 0 < index <= len(self.refs):
        raise self.fail(f"reference {index} to an object not read")
      return self.refs[index - 1]
    if kind == _SYM:
      self.refs.append(self.item())
      return self.refs[-1]
    if kind == _LIST:
      return self.pairlist(flags)
    if kind == _CHAR:
      text = self.string(levels)
      if has_attr:  # old R wrote attributes of strings too: read and ignored, as R does
        self.item()
      return text
    if kind in _VECTORS:
      dtype = _VECTORS[kind]
      value: Any = np.frombuffer(self.take(dtype.itemsize * self.length()), dtype).astype(
        dtype.str[1:]
      )
    elif kind in (_STR, _VEC, _EXPR):
      value = [self.item() for _ in range(self.length())]
    else:
      raise self.fail(f"unsupported R object type {kind} (only lists and atomic vectors are read)")
    names = self.attributes().get("names") if has_attr else None
    return dict(zip(names, value)) if kind == _VEC and names is not None else value

  def attributes(self) -> dict[str, Any]:
    """The attribute pairlist that follows a vector, by tag."""
    pairs = self.item()
    if not isinstance(pairs, list) or not all(isinstance(p, tuple) for p in pairs):
      raise self.fail("attributes that are not a pairlist")
    return dict(pairs)

  def pairlist(self, flags: int) -> list[tuple[str | None, Any]]:
    """A pairlist (LISTSXP) as ``[(tag, value), ...]``; its attributes are dropped."""
    pairs = []
    while flags & 0xFF == _LIST:
      if flags & (1 << 9):
        self.item()
      tag = self.item() if flags & (1 << 10) else None
      pairs.append((tag, self.item()))
      flags = self.int()
    if flags & 0xFF != _NILVALUE:
      raise self.fail(f"a pairlist ending in R object type {flags & 0xFF}")
    return pairs

  def string(self, levels: int) -> str | None:
    """A CHARSXP: None for NA, else decoded by its encoding flag (native: the header's)."""
    n = self.int()
    if n == -1:
      return None
    raw = self.take(n)
    latin1 = levels & _LATIN1 or not levels & (_UTF8 | _ASCII) and "8859" in self.native
    try:
      return raw.decode("latin-1" if latin1 else "utf-8")
    except UnicodeDecodeError as err:
      raise self.fail(f"a string that is not UTF-8 (byte {err.start} of it)") from err


def _decompress(data: bytes, where: str) -> bytes:
  """gzip, bzip2 or xz data (by its magic number) decompressed; anything else as it is."""
  try:
    if data[:2] == b"\x1f\x8b":
      return gzip.decompress(data)
    if data[:3] == b"BZh":
      return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
      return lzma.decompress(data)
  except (OSError, EOFError, lzma.LZMAError) as err:
    raise DataError(f"{where} is truncated or corrupt ({err}); re-fetch the package") from err
  return data


def read_rds(path: str) -> Any:
  """The R object saved in ``path`` (``saveRDS`` format: XDR, maybe gzip/bzip2/xz-compressed)."""
  with open(path, "rb") as f:
    return _RReader(_decompress(f.read(), path), path).read()


def _lazyload_record(rdb: bytes, offset: int, length: int, compressed: int, where: str) -> bytes:
  """The serialized object at ``rdb[offset:offset + length]``, decompressed as R's lazyLoadDBfetch.

  ``compressed`` 0: stored as is; 1: 4-byte big-endian size, then zlib; 2 or 3:
  the size, then a byte naming the method ("0" none, "1" zlib, "2" bzip2, "Z" xz).
  """
  record = rdb[offset : offset + length]
  if len(record) != length or length < 5 and compressed:
    raise DataError(f"{where}: record at {offset} is truncated; re-fetch the package")
  if not compressed:
    return record
  kind, body = (record[4:5], record[5:]) if compressed in (2, 3) else (b"1", record[4:])
  methods = {b"0": bytes, b"1": zlib.decompress, b"2": bz2.decompress, b"Z": lzma.decompress}
  if kind not in methods:
    raise DataError(f"{where}: record at {offset} has unknown compression {kind!r}")
  try:
    payload = methods[kind](body)
  except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as err:
    raise DataError(
      f"{where}: record at {offset} is corrupt ({err}); re-fetch the package"
    ) from err
  if len(payload) != int.from_bytes(record[:4], "big"):
    raise DataError(f"{where}: record at {offset} has the wrong size; re-fetch the package")
  return payload


def read_lazyload(rdx_path: str) -> dict[str, Any]:
  """Every object of an R lazy-load database (``X.rdx`` index + ``X.rdb`` data) by name."""
  index = read_rds(rdx_path)
  if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
    raise DataError(f"{rdx_path} is not a lazy-load index (no 'variables' list)")
  rdb_path = rdx_path[: -len(".rdx")] + ".rdb"
  with open(rdb_path, "rb") as f:
    rdb = f.read()
  compressed = int(np.asarray(index.get("compressed", 1)).reshape(-1)[0])
  objects = {}
  for name, (offset, length) in index["variables"].items():
    record = _lazyload_record(rdb, int(offset), int(length), compressed, rdb_path)
    objects[name] = _RReader(record, f"{rdb_path} ({name})").read()
  return objects


# --------------------------------------------------------------------------- #
# Corpus
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Corpus:
  """Documents as uint8 arrays of UTF-8 bytes; ``titles`` names each (novel or file name)."""

  name: str
  source: str  # human readable: "janeaustenr:/path/Rdata.rdx", "txt:/path/corpus.txt"
  documents: list[np.ndarray]
  titles: tuple[str, ...] = ()

  @property
  def num_bytes(self) -> int:
    """Bytes in all documents together."""
    return sum(len(d) for d in self.documents)


def encode(text: str) -> np.ndarray:
  """``text`` as a uint8 array of its UTF-8 bytes (the tokens)."""
  return np.frombuffer(text.encode("utf-8"), np.uint8).copy()


def decode(tokens: Any) -> str:
  """Byte tokens (any integer array in [0, 256)) as text; invalid UTF-8 becomes U+FFFD."""
  return np.asarray(tokens, np.uint8).tobytes().decode("utf-8", errors="replace")


def read_austen(rdx_path: str, name: str = "austen") -> Corpus:
  """The six novels of the janeaustenr lazy-load database ``rdx_path``, in ``AUSTEN_NOVELS`` order."""
  objects = read_lazyload(rdx_path)
  missing = [novel for novel in AUSTEN_NOVELS if novel not in objects]
  if missing:
    raise DataError(
      f"{rdx_path} lacks the novels {', '.join(missing)} (it holds {', '.join(objects)}): "
      f"is it janeaustenr's data? Re-fetch {AUSTEN_PACKAGE}"
    )
  documents = []
  for novel in AUSTEN_NOVELS:
    lines = objects[novel]
    if not isinstance(lines, list) or not all(isinstance(s, str) for s in lines):
      raise DataError(f"{rdx_path}: {novel} is not a character vector without NA")
    documents.append(encode("\n".join(lines) + "\n"))
  return Corpus(name, f"janeaustenr:{rdx_path}", documents, AUSTEN_NOVELS)


def read_text_file(path: str, name: str = "text") -> Corpus:
  """A plain UTF-8 text file as a one-document corpus."""
  allowed = "a text corpus must be one non-empty plain UTF-8 .txt file"
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as err:
    raise DataNotFoundError(f"{path} cannot be read ({err.strerror or err}): {allowed}") from err
  if not raw:
    raise DataError(f"{path} is empty: {allowed}")
  try:
    raw.decode("utf-8")
  except UnicodeDecodeError as err:
    raise DataError(
      f"{path} is not UTF-8: byte 0x{raw[err.start]:02x} at offset {err.start} is not valid "
      f"UTF-8 ({err.reason}); {allowed} (convert it, e.g. `iconv -f latin1 -t utf-8`)"
    ) from err
  title = os.path.splitext(os.path.basename(path))[0]
  return Corpus(name, f"txt:{path}", [np.frombuffer(raw, np.uint8).copy()], (title,))


def find_austen_rdx(directory: str) -> str | None:
  """``Rdata.rdx`` of an unpacked janeaustenr under ``directory`` (any depth), or None."""
  candidates = [os.path.join(directory, "data", "Rdata.rdx")]
  candidates += sorted(
    glob.glob(os.path.join(glob.escape(directory), _RDX_PATTERN), recursive=True)
  )
  return next((path for path in candidates if os.path.isfile(path)), None)


def cache_root(cache_dir: str | None = None) -> str:
  """The data cache: ``cache_dir``, else ``$GSM_OPTAX_DATA_CACHE``, else ``~/.cache/gsm_optax``."""
  root = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT
  return os.path.abspath(os.path.expanduser(root))


def load_text(
  name: str = "austen", data_dir: str | None = None, cache_dir: str | None = None
) -> Corpus:
  """Corpus ``name`` from an explicit ``data_dir``, else (Austen) the cache, R's library or apt.

  Raises:
    DataNotFoundError: nothing usable where it was looked for (and no fetch possible).
    DataError: a file found is empty, not UTF-8, corrupt, or ambiguous (several .txt files).
  """
  if name not in TEXT_DATASETS:
    raise ValueError(f"Unknown text dataset {name!r}; choose one of {', '.join(TEXT_DATASETS)}")
  if data_dir is not None:
    return _load_from_data_dir(name, data_dir)
  if name != "austen":
    raise DataNotFoundError(
      f"Text dataset {name!r} is the user's own corpus: pass data_dir=PATH of a plain UTF-8 "
      ".txt file (or of a directory holding exactly one)"
    )
  target = os.path.join(cache_root(cache_dir), "janeaustenr")
  for directory in (target, SYSTEM_AUSTEN_DIR):
    rdx = find_austen_rdx(directory) if os.path.isdir(directory) else None
    if rdx is not None:
      return read_austen(rdx, name)
  if os.path.exists(target):
    raise DataNotFoundError(
      f"{target} exists but holds no janeaustenr/data/Rdata.rdx (an interrupted manual unpack?): "
      "delete it and run again to fetch the package"
    )
  return read_austen(fetch_austen(target), name)


def _load_from_data_dir(name: str, data_dir: str) -> Corpus:
  """The package or the one .txt file at ``data_dir``: the only place looked at."""
  allowed = (
    "data_dir must be a directory holding the unpacked r-cran-janeaustenr "
    "(janeaustenr/data/Rdata.rdx), a plain UTF-8 .txt file, or a directory holding exactly one"
  )
  if not data_dir:
    raise DataNotFoundError(f"data_dir is an empty string: {allowed}, or None (default places)")
  if os.path.isfile(data_dir):
    if not data_dir.endswith(".txt"):
      raise DataNotFoundError(f"{data_dir} is a file but not a .txt file: {allowed}")
    return read_text_file(data_dir, name)
  if not os.path.isdir(data_dir):
    raise DataNotFoundError(f"{data_dir} does not exist: {allowed}")
  rdx = find_austen_rdx(data_dir)
  if rdx is not None:
    return read_austen(rdx, name)
  texts = sorted(glob.glob(os.path.join(glob.escape(data_dir), "*.txt")))
  if len(texts) > 1:
    listed = ", ".join(os.path.basename(t) for t in texts[:5]) + (", ..." if len(texts) > 5 else "")
    raise DataError(
      f"{data_dir} holds {len(texts)} .txt files ({listed}): {allowed}; pass the file's path "
      "or move the others away"
    )
  if not texts:
    raise DataNotFoundError(
      f"{data_dir} holds neither janeaustenr's data nor a .txt file: {allowed}"
    )
  return read_text_file(texts[0], name)


def _manual_fetch(target: str) -> str:
  return (
    f"get it by hand: `apt-get update && cd /tmp && apt-get download {AUSTEN_PACKAGE} && "
    f"dpkg-deb -x {AUSTEN_PACKAGE}_*.deb {target}` (no root needed but for the update, "
    "and never `apt-get install`: it pulls in R), or pass data_dir=DIR holding the unpacked "
    "package or one plain UTF-8 .txt file"
  )


def fetch_austen(target: str) -> str:
  """Download r-cran-janeaustenr with ``apt-get download``, unpack it to ``target`` atomically.

  Prints one line to stderr.  The package is unpacked into a temporary directory
  beside ``target``, then renamed to it, so ``target`` is whole or absent.
  Returns the path of its ``Rdata.rdx``.
  """
  missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
  if missing:
    raise DataNotFoundError(
      f"Jane Austen's novels not found (not in {target} nor {SYSTEM_AUSTEN_DIR}) and no "
      f"{' or '.join(missing)} to fetch them; {_manual_fetch(target)}"
    )
  print(
    f"Fetching Jane Austen's novels: apt-get download {AUSTEN_PACKAGE}, unpacking to {target}",
    file=sys.stderr,
  )
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".janeaustenr-", dir=parent) as tmp:
    _run(["apt-get", "download", AUSTEN_PACKAGE], tmp, target)
    debs = glob.glob(os.path.join(glob.escape(tmp), f"{AUSTEN_PACKAGE}_*.deb"))
    if len(debs) != 1:
      raise DataNotFoundError(
        f"`apt-get download {AUSTEN_PACKAGE}` left {len(debs)} .deb files, expected one; "
        f"{_manual_fetch(target)}"
      )
    unpacked = os.path.join(tmp, "janeaustenr")
    _run(["dpkg-deb", "-x", debs[0], unpacked], tmp, target)
    if find_austen_rdx(unpacked) is None:
      raise DataError(f"{debs[0]} holds no janeaustenr/data/Rdata.rdx; {_manual_fetch(target)}")
    try:
      os.rename(unpacked, target)
    except OSError:  # another process unpacked it first: use theirs if it is whole
      if find_austen_rdx(target) is None:
        raise
  return find_austen_rdx(target)  # type: ignore[return-value]


def _run(command: list[str], cwd: str, target: str) -> None:
  """Run ``command`` quietly; a failure is one DataNotFoundError line with its last error line."""
  try:
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
  except (OSError, subprocess.CalledProcessError) as err:
    output = getattr(err, "stderr", None) or str(err)
    last = (output.strip().splitlines() or ["no output"])[-1][:200]
    raise DataNotFoundError(
      f"Jane Austen's novels not found and `{' '.join(command)}` failed ({last}); "
      f"{_manual_fetch(target)}"
    ) from err


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Splits:
  """The training, validation and test bytes: each the concatenation of its document spans."""

  train: np.ndarray
  validation: np.ndarray
  test: np.ndarray


def held_out_sizes(size: int, validation_fraction: float, test_fraction: float) -> tuple[int, int]:
  """(validation, test) bytes of a ``size``-byte document: ``floor(size * fraction)`` each.

  The fractions are taken as the decimals they print as (0.05 is exactly 1/20),
  so the floor does not depend on the float's rounding.
  """
  validation = int(size * Fraction(str(validation_fraction)))
  return validation, int(size * Fraction(str(test_fraction)))


def split_corpus(
  corpus: Corpus, validation_fraction: float = 0.05, test_fraction: float = 0.05
) -> Splits:
  """Per document: the last ``validation_fraction`` validation, the ``test_fraction`` before test.

  The rest (the first bytes, about 90 %) is training.  Fixed for every seed.
  """
  for what, value in (
    ("validation_fraction", validation_fraction),
    ("test_fraction", test_fraction),
  ):
    if not 0 <= value < 1:
      raise ValueError(f"{what} must be in [0, 1), got {value}")
  if validation_fraction + test_fraction >= 1:
    raise ValueError(
      f"validation_fraction + test_fraction must be < 1 (some training bytes), got "
      f"{validation_fraction} + {test_fraction}"
    )
  parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
  for document in corpus.documents:
    n_validation, n_test = held_out_sizes(len(document), validation_fraction, test_fraction)
    test_start = len(document) - n_validation - n_test
    parts["train"].append(document[:test_start])
    parts["test"].append(document[test_start : len(document) - n_validation])
    parts["validation"].append(document[len(document) - n_validation :])
  return Splits(**{k: np.concatenate(v or [np.zeros(0, np.uint8)]) for k, v in parts.items()})


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #

TextBatch = tuple[np.ndarray, np.ndarray]


class TextDataset:
  """Next-byte prediction over a split corpus, with ``data.Dataset``'s driver interface.

  Training batches are ``context + 1``-byte windows of the training split at
  random starts (``inputs = w[:-1]``, ``targets = w[1:]``, int32); an "epoch"
  is ``steps_per_epoch`` such batches.  Evaluation reads the test split (or,
  from ``validation()``, the validation split) as consecutive windows.
  """

  num_classes = VOCAB_SIZE
  image_shape = None  # not images
  in_memory_unaugmented = False  # the driver feeds batches from the host

  def __init__(
    self,
    name: str,
    source: str,
    splits: Splits,
    *,
    context: int,
    steps_per_epoch: int,
    evaluate: str = "test",
  ):
    if evaluate not in ("test", "validation"):
      raise ValueError(f"evaluate must be 'test' or 'validation', got {evaluate!r}")
    _check_positive("context", context)
    _check_positive("steps_per_epoch", steps_per_epoch)
    self.name, self.source, self.context, self.evaluate = name, source, context, evaluate
    self.splits, self._steps = splits, steps_per_epoch
    self.train = np.asarray(splits.train, np.uint8)
    self.evaluation = np.asarray(getattr(splits, evaluate), np.uint8)
    self._check_fits("training", self.train)
    self._check_fits(evaluate, self.evaluation)

  def _check_fits(self, split: str, tokens: np.ndarray) -> None:
    if len(tokens) < self.context + 1:
      largest = f"the largest context allowed is {len(tokens) - 1}"
      if len(tokens) < 2:
        largest = "no context fits: give the corpus more text"
      raise DataError(
        f"context={self.context} is too long for the {split} split of {self.name} "
        f"({self.source}): it holds {len(tokens)} bytes and a window needs context + 1; {largest}"
      )

  @property
  def num_train(self) -> int:
    """Bytes in the training split."""
    return len(self.train)

  @property
  def num_test(self) -> int:
    """Evaluation windows: ``(len(split) - 1) // context``."""
    return (len(self.evaluation) - 1) // self.context

  def __repr__(self) -> str:
    return (
      f"TextDataset(name={self.name!r}, source={self.source!r}, context={self.context}, "
      f"num_train={self.num_train}, num_test={self.num_test}, evaluate={self.evaluate!r})"
    )

  def steps_per_epoch(self, batch_size: int) -> int:
    """The fixed number of training batches per epoch (given at construction)."""
    _check_positive("batch_size", batch_size)
    return self._steps

  def train_starts(self, batch_size: int, *, epoch: int, seed: int, step: int) -> np.ndarray:
    """Window starts of batch ``step``: ``default_rng([seed, epoch, step])``, in [0, num_train - context)."""
    rng = np.random.default_rng([seed, epoch, step])
    return rng.integers(0, self.num_train - self.context, size=batch_size)

  def train_batches(
    self,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    start: int = 0,
    shard: tuple[int, int] = (0, 1),
  ) -> Iterator[TextBatch]:
    """``(inputs, targets)`` [L, context] int32 of batches ``start, ..., steps_per_epoch - 1``.

    A pure function of ``(seed, epoch, batch index)``: resuming at ``start``
    gives the batches of an uninterrupted run.  With ``shard = (index, count)``
    only rows ``[index * L, (index + 1) * L)``, ``L = batch_size / count``.
    """
    steps = self.steps_per_epoch(batch_size)
    if epoch < 0 or seed < 0:
      raise ValueError(f"epoch and seed must be >= 0, got epoch={epoch}, seed={seed}")
    if not 0 <= start <= steps:
      raise ValueError(f"start must be in [0, {steps}] (the batches per epoch), got {start}")
    rows = _shard_rows(batch_size, shard)
    return self._train_batches(batch_size, epoch, seed, start, rows)

  def _train_batches(
    self, batch_size: int, epoch: int, seed: int, start: int, rows: slice
  ) -> Iterator[TextBatch]:
    for step in range(start, self._steps):
      starts = self.train_starts(batch_size, epoch=epoch, seed=seed, step=step)[rows]
      yield _windows(self.train, starts, self.context)

  def eval_batches(
    self, batch_size: int, *, shard: tuple[int, int] = (0, 1)
  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(inputs, targets, mask)``: the evaluation windows in order, ``batch_size`` a batch.

    Window ``j`` covers bytes ``[j * context, j * context + context + 1)``, so
    every byte but the first is a target once, except the last
    ``(len(split) - 1) % context`` bytes, too few for a window.  The last batch
    is zero-padded and ``mask`` [rows] marks the real windows; with ``shard``
    only this process's rows (as ``train_batches``).
    """
    _check_positive("batch_size", batch_size)
    rows = _shard_rows(batch_size, shard)
    return self._eval_batches(batch_size, rows)

  def _eval_batches(
    self, batch_size: int, rows: slice
  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    for first in range(0, self.num_test, batch_size):
      window = np.arange(first, first + batch_size)
      mask = window < self.num_test
      inputs, targets = _windows(
        self.evaluation, np.where(mask, window, 0) * self.context, self.context
      )
      inputs[~mask], targets[~mask] = 0, 0
      yield inputs[rows], targets[rows], mask[rows]

  def test_batches(self, batch_size: int) -> Iterator[TextBatch]:
    """``(inputs, targets)`` of the evaluation windows in order, the last batch partial."""
    _check_positive("batch_size", batch_size)
    for first in range(0, self.num_test, batch_size):
      window = np.arange(first, min(first + batch_size, self.num_test))
      yield _windows(self.evaluation, window * self.context, self.context)

  def validation(self) -> TextDataset:
    """The same dataset evaluating the validation split (``num_test``: its windows)."""
    return TextDataset(
      self.name,
      self.source,
      self.splits,
      context=self.context,
      steps_per_epoch=self._steps,
      evaluate="validation",
    )

  def split_validation(self, num_validation: int) -> tuple[TextDataset, TextDataset]:
    """Not available: text datasets have a fixed validation split (``validation()``)."""
    raise ValueError(
      "text datasets have a fixed validation split (the last 5 % of every document); "
      "use validation()"
    )


def _windows(tokens: np.ndarray, starts: np.ndarray, context: int) -> TextBatch:
  """``(inputs, targets)`` int32 [len(starts), context] of the windows at ``starts``."""
  windows = tokens[starts[:, None] + np.arange(context + 1)].astype(np.int32)
  return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


def _check_positive(what: str, value: int) -> None:
  if int(value) != value or value < 1:
    raise ValueError(f"{what} must be a positive integer, got {value!r}")


def load_text_dataset(
  name: str = "austen",
  *,
  data_dir: str | None = None,
  context: int,
  steps_per_epoch: int,
  cache_dir: str | None = None,
) -> TextDataset:
  """``load_text`` split by ``split_corpus`` (default fractions): the dataset evaluating the test split."""
  _check_positive("context", context)
  corpus = load_text(name, data_dir=data_dir, cache_dir=cache_dir)
  return TextDataset(
    corpus.name,
    corpus.source,
    split_corpus(corpus),
    context=context,
    steps_per_epoch=steps_per_epoch,
  )
