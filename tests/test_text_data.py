"""Tests for training/text_data.py: the R reader, corpus sources, splits, batches and errors."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import stat
import struct
import zlib

import numpy as np
import pytest

from training import data
from training import text_data

# --------------------------------------------------------------------------- #
# A small R serializer (XDR), written from R's format description
# --------------------------------------------------------------------------- #

NIL, SYM, LIST, CHAR, LGL, INT, STR, VEC, CLOS = 254, 1, 2, 9, 10, 13, 16, 19, 3
UTF8_LEVEL, LATIN1_LEVEL, ASCII_LEVEL = 8, 4, 64


def i32(value: int) -> bytes:
  return struct.pack(">i", value)


def header(kind: int, *, attr: bool = False, tag: bool = False, levels: int = 0) -> bytes:
  return i32(kind | attr << 9 | tag << 10 | levels << 12)


class RWriter:
  """Serializes nested Python values as R objects (XDR), symbols shared by reference."""

  def __init__(self):
    self.symbols: dict[str, int] = {}

  def charsxp(self, text: str | None, encoding: str = "utf-8") -> bytes:
    if text is None:
      return header(CHAR) + i32(-1)
    raw = text.encode(encoding)
    level = (
      LATIN1_LEVEL if encoding == "latin-1" else (ASCII_LEVEL if raw.isascii() else UTF8_LEVEL)
    )
    return header(CHAR, levels=level) + i32(len(raw)) + raw

  def symbol(self, name: str) -> bytes:
    if name in self.symbols:
      return i32(255 | self.symbols[name] << 8)
    self.symbols[name] = len(self.symbols) + 1
    return header(SYM) + self.charsxp(name)

  def attributes(self, pairs: dict[str, bytes]) -> bytes:
    cells = [header(LIST, tag=True) + self.symbol(k) + v for k, v in pairs.items()]
    return b"".join(cells) + header(NIL)

  def strings(self, values: list, attrs: dict[str, bytes] | None = None, enc="utf-8") -> bytes:
    body = b"".join(self.charsxp(v, enc) for v in values)
    tail = self.attributes(attrs) if attrs else b""
    return header(STR, attr=bool(attrs)) + i32(len(values)) + body + tail

  def ints(self, values: list[int], kind: int = INT) -> bytes:
    return header(kind) + i32(len(values)) + b"".join(i32(v) for v in values)

  def named_list(self, items: dict[str, bytes]) -> bytes:
    names = self.attributes({"names": self.strings(list(items))})
    return header(VEC, attr=True) + i32(len(items)) + b"".join(items.values()) + names


def serialized(body: bytes, version: int = 3) -> bytes:
  head = b"X\n" + i32(version) + i32(0x40201) + i32(0x30500)
  if version == 3:
    head += i32(5) + b"UTF-8"
  return head + body


COMPRESSORS = {
  1: zlib.compress,
  2: lambda b: b"2" + bz2.compress(b),
  3: lambda b: b"Z" + lzma.compress(b),
}


def write_package(
  root, novels: dict[str, list[str]], *, version: int = 3, compressed: int = 1
) -> str:
  """An unpacked janeaustenr: ``usr/lib/R/site-library/janeaustenr/data/Rdata.rd[bx]``.

  Records are a 4-byte size then zlib (``compressed`` 1), or a method byte then
  bzip2 (2) or xz (3).
  """
  directory = root / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"
  directory.mkdir(parents=True)
  rdb, variables = b"", {}
  for name, lines in novels.items():
    writer = RWriter()
    payload = serialized(writer.strings(lines, {"comment": writer.strings(["x"])}), version)
    record = i32(len(payload)) + COMPRESSORS[compressed](payload)
    variables[name] = RWriter().ints([len(rdb), len(record)])
    rdb += record
  index = RWriter()
  body = index.named_list(
    {
      "variables": index.named_list(variables),
      "references": index.named_list({}),
      "compressed": index.ints([1], LGL) if compressed == 1 else index.ints([compressed]),
    }
  )
  (directory / "Rdata.rdb").write_bytes(rdb)
  (directory / "Rdata.rdx").write_bytes(gzip.compress(serialized(body, version)))
  return str(directory / "Rdata.rdx")


TINY_NOVELS = {
  name: [f"{name.upper()}", "", f"Line one of {name}, caf\u00e9 \u00a31.", "The end."]
  for name in text_data.AUSTEN_NOVELS
}


def novel_bytes(lines: list[str]) -> bytes:
  return ("\n".join(lines) + "\n").encode("utf-8")


def assert_one_line(err: pytest.ExceptionInfo, error: type, *parts: str) -> None:
  message = str(err.value)
  assert isinstance(err.value, error), type(err.value)
  assert "\n" not in message, message
  for part in parts:
    assert part in message, (part, message)


# --------------------------------------------------------------------------- #
# The R reader
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("version,compressed", [(2, 1), (3, 1), (3, 2), (3, 3)])
def test_reads_tiny_package(tmp_path, version, compressed):
  rdx = write_package(tmp_path, TINY_NOVELS, version=version, compressed=compressed)
  corpus = text_data.read_austen(rdx)
  assert corpus.titles == text_data.AUSTEN_NOVELS
  assert corpus.source == f"janeaustenr:{rdx}"
  for novel, document in zip(text_data.AUSTEN_NOVELS, corpus.documents):
    assert document.dtype == np.uint8
    assert document.tobytes() == novel_bytes(TINY_NOVELS[novel])


def test_lazyload_index_and_latin1_and_na(tmp_path):
  writer = RWriter()
  path = tmp_path / "x.rds"
  body = writer.named_list(
    {
      "a": writer.strings(["caf\u00e9", None], enc="latin-1"),
      "b": writer.ints([7, -3]),
      "a2": writer.strings(["names"]),  # a CHARSXP equal to a symbol's name: no reference
    }
  )
  path.write_bytes(serialized(body))
  value = text_data.read_rds(str(path))
  assert value["a"] == ["caf\u00e9", None]
  np.testing.assert_array_equal(value["b"], [7, -3])
  assert value["a2"] == ["names"]


def test_unsupported_r_type_is_one_data_error(tmp_path):
  path = tmp_path / "closure.rds"
  path.write_bytes(serialized(header(CLOS) + header(NIL)))
  with pytest.raises(data.DataError) as err:
    text_data.read_rds(str(path))
  assert_one_line(err, data.DataError, str(path), "unsupported R object type 3")


def test_truncated_and_foreign_r_data_are_data_errors(tmp_path):
  path = tmp_path / "t.rds"
  path.write_bytes(serialized(RWriter().strings(["abc"]))[:-2])
  with pytest.raises(data.DataError) as err:
    text_data.read_rds(str(path))
  assert_one_line(err, data.DataError, str(path), "truncated")
  path.write_bytes(b"A\n1\n")
  with pytest.raises(data.DataError) as err:
    text_data.read_rds(str(path))
  assert_one_line(err, data.DataError, "not R XDR serialization")


def test_corrupt_record_is_one_data_error(tmp_path):
  rdx = write_package(tmp_path, TINY_NOVELS)
  rdb = rdx[: -len(".rdx")] + ".rdb"
  with open(rdb, "r+b") as f:
    f.seek(10)
    f.write(b"\xff" * 8)
  with pytest.raises(data.DataError) as err:
    text_data.read_austen(rdx)
  assert_one_line(err, data.DataError, rdb, "record at 0 is corrupt", "re-fetch")


def test_package_lacking_a_novel(tmp_path):
  rdx = write_package(tmp_path, {"emma": ["EMMA"]})
  with pytest.raises(data.DataError) as err:
    text_data.read_austen(rdx)
  assert_one_line(err, data.DataError, rdx, "lacks the novels sensesensibility", "holds emma")


# --------------------------------------------------------------------------- #
# Corpus sources
# --------------------------------------------------------------------------- #


def test_load_text_package_dir_and_txt(tmp_path):
  write_package(tmp_path / "pkg", TINY_NOVELS)
  assert len(text_data.load_text(data_dir=str(tmp_path / "pkg")).documents) == 6
  (tmp_path / "own").mkdir()
  (tmp_path / "own" / "corpus.txt").write_text("h\u00e9llo\nworld\n", encoding="utf-8")
  for path in (tmp_path / "own", tmp_path / "own" / "corpus.txt"):
    corpus = text_data.load_text("text", data_dir=str(path))
    assert corpus.source == f"txt:{tmp_path / 'own' / 'corpus.txt'}"
    assert corpus.titles == ("corpus",)
    assert text_data.decode(corpus.documents[0]) == "h\u00e9llo\nworld\n"


def test_encode_decode():
  tokens = text_data.encode("a\u00e9\u00a3")
  np.testing.assert_array_equal(tokens, [0x61, 0xC3, 0xA9, 0xC2, 0xA3])
  assert text_data.decode(tokens) == "a\u00e9\u00a3"
  assert text_data.decode(np.array([0x61, 0xC3], np.int32)) == "a\ufffd"


def test_data_dir_errors(tmp_path):
  cases = []
  cases.append((str(tmp_path / "nope"), data.DataNotFoundError, ["does not exist", ".txt"]))
  cases.append(("", data.DataNotFoundError, ["empty string"]))
  (tmp_path / "empty.txt").write_bytes(b"")
  cases.append((str(tmp_path / "empty.txt"), data.DataError, ["empty.txt is empty"]))
  (tmp_path / "bad.txt").write_bytes(b"abc\xe9def")
  cases.append((str(tmp_path / "bad.txt"), data.DataError, ["not UTF-8", "0xe9 at offset 3"]))
  (tmp_path / "notes.md").write_text("x")
  cases.append((str(tmp_path / "notes.md"), data.DataNotFoundError, ["not a .txt file"]))
  (tmp_path / "none").mkdir()
  cases.append((str(tmp_path / "none"), data.DataNotFoundError, ["neither janeaustenr"]))
  (tmp_path / "two").mkdir()
  (tmp_path / "two" / "a.txt").write_text("a")
  (tmp_path / "two" / "b.txt").write_text("b")
  cases.append((str(tmp_path / "two"), data.DataError, ["holds 2 .txt files (a.txt, b.txt)"]))
  for path, error, parts in cases:
    with pytest.raises(data.DataError) as err:
      text_data.load_text(data_dir=path)
    assert_one_line(err, error, *parts)


def test_name_errors():
  with pytest.raises(ValueError, match="Unknown text dataset 'shakespeare'"):
    text_data.load_text("shakespeare")
  with pytest.raises(data.DataNotFoundError) as err:
    text_data.load_text("text")
  assert_one_line(err, data.DataNotFoundError, "pass data_dir=PATH")


def test_cache_root_precedence(monkeypatch, tmp_path):
  monkeypatch.setenv(text_data.CACHE_ENV, str(tmp_path / "env"))
  assert text_data.cache_root() == str(tmp_path / "env")
  assert text_data.cache_root(str(tmp_path / "arg")) == str(tmp_path / "arg")
  monkeypatch.delenv(text_data.CACHE_ENV)
  assert text_data.cache_root() == os.path.expanduser("~/.cache/gsm_optax")


# --------------------------------------------------------------------------- #
# Fetching with apt-get (fake executables on PATH)
# --------------------------------------------------------------------------- #


def fake_tools(tmp_path, *, dpkg_fails: bool = False) -> str:
  """A bin directory: apt-get writes a .deb, dpkg-deb -x copies a tiny package (or fails)."""
  source = tmp_path / "source"
  write_package(source, TINY_NOVELS)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  apt = "#!/bin/sh\necho 'Get:1 fake'\necho deb > r-cran-janeaustenr_1.0.0-1_all.deb\n"
  dpkg = f'#!/bin/sh\nmkdir -p "$3"\ncp -r "{source}/usr" "$3/"\n'
  if dpkg_fails:
    dpkg += "echo 'dpkg-deb: error: archive is corrupt' >&2\nexit 2\n"
  for name, script in (("apt-get", apt), ("dpkg-deb", dpkg)):
    (bin_dir / name).write_text(script)
    (bin_dir / name).chmod(stat.S_IRWXU)
  return str(bin_dir)


@pytest.fixture
def no_system_package(monkeypatch, tmp_path):
  monkeypatch.setattr(text_data, "SYSTEM_AUSTEN_DIR", str(tmp_path / "no-r-library"))
  monkeypatch.delenv(text_data.CACHE_ENV, raising=False)


def test_fetch_unpacks_atomically_with_one_line(monkeypatch, tmp_path, capsys, no_system_package):
  monkeypatch.setenv("PATH", fake_tools(tmp_path) + os.pathsep + os.environ["PATH"])
  cache = tmp_path / "cache"
  corpus = text_data.load_text(cache_dir=str(cache))
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and "apt-get download r-cran-janeaustenr" in lines[0], lines
  assert os.listdir(cache) == ["janeaustenr"]  # no temporary directory left behind
  assert corpus.source.startswith(f"janeaustenr:{cache / 'janeaustenr'}")
  assert corpus.documents[0].tobytes() == novel_bytes(TINY_NOVELS["sensesensibility"])
  text_data.load_text(cache_dir=str(cache))  # now from the cache: no second fetch
  assert capsys.readouterr().err == ""


def test_failed_fetch_leaves_nothing(monkeypatch, tmp_path, capsys, no_system_package):
  monkeypatch.setenv(
    "PATH", fake_tools(tmp_path, dpkg_fails=True) + os.pathsep + os.environ["PATH"]
  )
  cache = tmp_path / "cache"
  with pytest.raises(data.DataNotFoundError) as err:
    text_data.load_text(cache_dir=str(cache))
  assert_one_line(err, data.DataNotFoundError, "archive is corrupt", "dpkg-deb -x", "data_dir=DIR")
  assert os.listdir(cache) == []
  assert len(capsys.readouterr().err.splitlines()) == 1


def test_no_apt_gives_manual_commands(monkeypatch, tmp_path, no_system_package):
  (tmp_path / "empty-bin").mkdir()
  monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
  with pytest.raises(data.DataNotFoundError) as err:
    text_data.load_text(cache_dir=str(tmp_path / "cache"))
  assert_one_line(err, data.DataNotFoundError, "no apt-get or dpkg-deb", "apt-get download")


def test_broken_cache_dir_is_reported(monkeypatch, tmp_path, no_system_package):
  (tmp_path / "cache" / "janeaustenr").mkdir(parents=True)
  with pytest.raises(data.DataNotFoundError) as err:
    text_data.load_text(cache_dir=str(tmp_path / "cache"))
  assert_one_line(err, data.DataNotFoundError, "holds no janeaustenr/data/Rdata.rdx", "delete it")


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #


def test_split_boundaries_exact():
  documents = [np.arange(n, dtype=np.uint8) + 100 * i for i, n in enumerate((100, 37, 20))]
  splits = text_data.split_corpus(text_data.Corpus("toy", "arrays", documents))
  # floor(n / 20) bytes each for validation and test: 5, 1, 1.
  a, b, c = documents
  np.testing.assert_array_equal(splits.train, np.concatenate([a[:90], b[:35], c[:18]]))
  np.testing.assert_array_equal(splits.test, np.concatenate([a[90:95], b[35:36], c[18:19]]))
  np.testing.assert_array_equal(splits.validation, np.concatenate([a[95:], b[36:], c[19:]]))


def test_split_fraction_is_the_decimal():
  corpus = text_data.Corpus("toy", "arrays", [np.zeros(100, np.uint8)])
  splits = text_data.split_corpus(corpus, validation_fraction=0.29, test_fraction=0.0)
  assert (len(splits.validation), len(splits.test), len(splits.train)) == (29, 0, 71)
  with pytest.raises(ValueError, match="must be < 1"):
    text_data.split_corpus(corpus, 0.5, 0.5)


# --------------------------------------------------------------------------- #
# Batches
# --------------------------------------------------------------------------- #

CONTEXT = 7


def toy_dataset(n_train: int = 300, n_held: int = 40, n_test: int = 53) -> text_data.TextDataset:
  rng = np.random.default_rng(11)
  sizes = (n_train, n_held, n_test)
  train, validation, test = (rng.integers(0, 256, n, dtype=np.uint8) for n in sizes)
  splits = text_data.Splits(train=train, validation=validation, test=test)
  return text_data.TextDataset("toy", "arrays", splits, context=CONTEXT, steps_per_epoch=5)


def test_interface_fields():
  ds = toy_dataset()
  assert (ds.num_classes, ds.image_shape, ds.in_memory_unaugmented) == (256, None, False)
  assert (ds.num_train, ds.num_test, ds.steps_per_epoch(4)) == (300, 52 // CONTEXT, 5)
  assert ds.validation().num_test == 39 // CONTEXT
  with pytest.raises(ValueError, match="fixed validation split .* use validation()"):
    ds.split_validation(10)


def test_train_windows_are_slices():
  ds = toy_dataset()
  batches = list(ds.train_batches(4, epoch=2, seed=3))
  assert len(batches) == 5
  for k, (inputs, targets) in enumerate(batches):
    assert inputs.shape == targets.shape == (4, CONTEXT) and inputs.dtype == np.int32
    starts = np.random.default_rng([3, 2, k]).integers(0, 300 - CONTEXT, size=4)
    for row, s in enumerate(starts):
      np.testing.assert_array_equal(inputs[row], ds.splits.train[s : s + CONTEXT])
      np.testing.assert_array_equal(targets[row], ds.splits.train[s + 1 : s + CONTEXT + 1])


def test_resume_and_shards_match_uninterrupted():
  ds = toy_dataset()
  full = list(ds.train_batches(6, epoch=1, seed=0))
  resumed = list(ds.train_batches(6, epoch=1, seed=0, start=3))
  for got, want in zip(resumed, full[3:], strict=True):
    np.testing.assert_array_equal(got, want)
  parts = [list(ds.train_batches(6, epoch=1, seed=0, shard=(i, 3))) for i in range(3)]
  for k, want in enumerate(full):
    inputs = np.concatenate([part[k][0] for part in parts])
    np.testing.assert_array_equal(inputs, want[0])
  assert not np.array_equal(full[0][0], next(ds.train_batches(6, epoch=0, seed=0))[0])


def test_eval_windows_cover_the_split():
  ds = toy_dataset()
  split, n = ds.splits.test, ds.num_test
  batches = list(ds.eval_batches(3))
  inputs, targets, mask = (np.concatenate(parts) for parts in zip(*batches))
  assert all(b[0].shape == (3, CONTEXT) for b in batches) and mask.dtype == bool
  assert mask[:n].all() and not mask[n:].any() and len(mask) == 3 * len(batches)
  np.testing.assert_array_equal(inputs[mask].reshape(-1), split[: n * CONTEXT])
  np.testing.assert_array_equal(targets[mask].reshape(-1), split[1 : n * CONTEXT + 1])
  assert not inputs[~mask].any() and not targets[~mask].any()
  assert len(split) - 1 - n * CONTEXT == (len(split) - 1) % CONTEXT  # the uncovered tail
  sharded = [list(ds.eval_batches(3, shard=(i, 3))) for i in range(3)]
  np.testing.assert_array_equal(np.concatenate([b[2] for s in zip(*sharded) for b in s]), mask)
  test_inputs = np.concatenate([x for x, _ in ds.test_batches(3)])
  np.testing.assert_array_equal(test_inputs, inputs[mask])


def test_validation_reads_the_validation_split():
  ds = toy_dataset().validation()
  inputs, targets, mask = next(ds.eval_batches(2))
  np.testing.assert_array_equal(inputs[0], ds.splits.validation[:CONTEXT])
  np.testing.assert_array_equal(targets[1], ds.splits.validation[CONTEXT + 1 : 2 * CONTEXT + 1])


def test_argument_errors():
  ds = toy_dataset()
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    ds.steps_per_epoch(0)
  with pytest.raises(ValueError, match="shard=.*dividing batch_size=4"):
    next(ds.train_batches(4, epoch=0, seed=0, shard=(0, 3)))
  with pytest.raises(ValueError, match=r"start must be in \[0, 5\]"):
    ds.train_batches(4, epoch=0, seed=0, start=6)
  with pytest.raises(ValueError, match="context must be a positive integer"):
    text_data.TextDataset("toy", "arrays", ds.splits, context=0, steps_per_epoch=1)


def test_context_too_long():
  with pytest.raises(data.DataError) as err:
    toy_dataset(n_train=7)
  assert_one_line(
    err, data.DataError, "training split", "holds 7 bytes", "largest context allowed is 6"
  )
  with pytest.raises(data.DataError) as err:
    toy_dataset(n_test=CONTEXT)
  assert_one_line(err, data.DataError, "test split", f"holds {CONTEXT} bytes", "allowed is 6")
  with pytest.raises(data.DataError) as err:
    toy_dataset(n_held=3).validation()
  assert_one_line(err, data.DataError, "validation split", "holds 3 bytes", "allowed is 2")


def test_load_text_dataset_from_txt(tmp_path):
  text = "".join(f"line {i} of a small corpus\n" for i in range(200))
  (tmp_path / "c.txt").write_text(text)
  ds = text_data.load_text_dataset("text", data_dir=str(tmp_path), context=16, steps_per_epoch=3)
  n = len(text)
  assert ds.num_train == n - 2 * (n // 20) and ds.num_test == (n // 20 - 1) // 16
  assert ds.source == f"txt:{tmp_path / 'c.txt'}"


# --------------------------------------------------------------------------- #
# The real corpus (when the package has been fetched)
# --------------------------------------------------------------------------- #


def real_rdx() -> str | None:
  for directory in (
    os.path.join(text_data.cache_root(), "janeaustenr"),
    "/tmp/janeaustenr",
    text_data.SYSTEM_AUSTEN_DIR,
  ):
    if os.path.isdir(directory) and text_data.find_austen_rdx(directory):
      return text_data.find_austen_rdx(directory)
  return None


@pytest.mark.skipif(real_rdx() is None, reason="r-cran-janeaustenr is not unpacked here")
def test_real_austen_corpus():
  corpus = text_data.read_austen(real_rdx())
  texts = [text_data.decode(d) for d in corpus.documents]
  assert corpus.titles == text_data.AUSTEN_NOVELS
  assert sum(len(t) for t in texts) == 4_025_028 and corpus.num_bytes == 4_025_029
  pride = texts[text_data.AUSTEN_NOVELS.index("prideprejudice")]
  assert pride.splitlines()[0] == "PRIDE AND PREJUDICE"
  assert "It is a truth universally acknowledged, that a single man in possession" in pride[:200]
  splits = text_data.split_corpus(corpus)
  assert (len(splits.train), len(splits.test), len(splits.validation)) == (
    3_622_531,
    201_249,
    201_249,
  )
