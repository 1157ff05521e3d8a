"""Data sources of the continual-learning trainer.

One entry point, :func:`load_source`, turns a *source spec* string into a
:class:`TaskData`: raw float32 features, int64 labels ``0..K-1``, a train /
validation / optional test split, class names and the :class:`Preprocessing`
(``x * scale + shift``) the model should apply to the raw features.

Source specs
------------
``mnist``, ``fashion-mnist``
    The idx files (60,000 train / 10,000 t10k test images, 28x28).  Raw
    features are the pixel values 0..255 as float32, shape ``(N, 28, 28)``;
    preprocessing standardises pixels with the dataset's usual mean and std of the 0..1 pixel values
    (MNIST 0.1307 / 0.3081, Fashion-MNIST 0.2860 / 0.3530): ``scale = 1/(255*std)``, ``shift = -mean/std``.
    Fashion-MNIST class names are the article names ("T-shirt/top", ...).
``permuted-mnist:SEED``
    MNIST with one fixed pixel permutation ``p =
    np.random.default_rng(SEED).permutation(784)`` applied to every image
    (train, validation and test alike): ``new.flat[i] = old.flat[p[i]]``,
    reshaped back to 28x28.  ``SEED`` is a non-negative integer.  Note that
    ``permuted-mnist:0`` is *not* plain MNIST: it is permuted by seed 0's
    permutation like any other seed.  SEED is unrelated to the ``seed``
    argument of :func:`load_source` (which only drives the validation hold-out).
``split-mnist:A,B,...`` / ``split-fashion-mnist:A,B,...``
    The dataset restricted to the listed classes (distinct digits 0-9, at
    least two), relabelled in the order given: ``split-mnist:7,3`` has label 0
    for the digit 7 and class names ``("7", "3")``.
``PATH.npz``
    Arrays ``x`` (N, *feature_shape) and ``y`` (N,), optional ``x_val``/``y_val``
    and ``x_test``/``y_test``.
``PATH.csv``
    A header row is required; ``label_column`` names the label column, every
    other column is a float feature.  No validation/test split in the file.

For npz and csv the sorted unique training labels (integers; for csv also
arbitrary strings when not all labels are integers) are mapped to ``0..K-1``
and their ``str()`` are the class names; validation / test labels must be
among them.  Preprocessing standardises each feature with the mean / std of
the final training split (``scale = 1/std``, ``shift = -mean/std``; a feature
with ``std < 1e-8`` gets ``scale = 1``, ``shift = -mean``).

Splits
------
Without a given validation split, ``val_fraction`` of the training data is held
out, chosen by ``np.random.default_rng(seed).permutation``; this happens
before ``limit``.  The remaining training samples keep their file order.
``limit=N`` keeps the first N of those training samples and caps the
validation set at ``max(N // 5, 500)`` samples (a prefix of the seeded
permutation, so it stays a random subset) so that quick runs stay quick.
The test split is never limited.

MNIST-family files
------------------
Looked up, per file (``NAME`` or ``NAME.gz``), in ``DATA_DIR/mnist/`` (or
``DATA_DIR/fashion-mnist/``), then directly in ``DATA_DIR`` (used only when the
files there are that dataset's), then in ``CACHE_DIR/<dataset>/``; if still
missing and ``download`` is true, the ``.gz`` is downloaded into the cache
(temp file, verified, atomic rename).  ``DATA_DIR`` is the ``data_dir``
argument, else ``$CLNP_DATA_DIR``; ``CACHE_DIR`` is ``cache_dir``, else
``$CLNP_CACHE_DIR``, else ``~/.cache/clnp``.  Base URLs: ``base_urls``
argument, else ``$CLNP_MNIST_URL`` / ``$CLNP_FASHION_MNIST_URL``, else the
defaults in :data:`DEFAULT_BASE_URLS`.  Every file is checked (idx magic,
dimensions, counts against the file size, the paired file and the expected
60000/10000, and the sha256 of the uncompressed content against the canonical
values); the sha256 verification is cached per process, keyed by
path + size + mtime.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import logging
import math
import os
import re
import struct
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "Preprocessing",
    "TaskData",
    "load_source",
    "DEFAULT_BASE_URLS",
    "DOWNLOAD_TIMEOUT_S",
]

logger = logging.getLogger(__name__)


# Per-dataset mean and std of the pixel values scaled to 0..1 (the usual normalisation constants).
_PIXEL_MEAN = {"mnist": 0.1307, "fashion-mnist": 0.2860}
_PIXEL_STD = {"mnist": 0.3081, "fashion-mnist": 0.3530}


class DataError(Exception):
    """Bad data source spec, missing/corrupt files, failed download.

    The message says what was wrong and what is allowed.
    """


@dataclass(frozen=True, eq=False)
class Preprocessing:
    """Affine input normalisation ``x * scale + shift`` (float32 arrays)."""

    scale: np.ndarray
    shift: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Return ``x * scale + shift`` as float32."""
        return (np.asarray(x, dtype=np.float32) * self.scale + self.shift).astype(np.float32, copy=False)


@dataclass(frozen=True, eq=False)
class TaskData:
    """One task's data: raw float32 features, int64 labels 0..num_classes-1."""

    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    class_names: tuple[str, ...]
    preprocessing: Preprocessing

    def __post_init__(self) -> None:
        if (self.x_test is None) != (self.y_test is None):
            raise DataError("TaskData: x_test and y_test must both be given or both be None")
        for split, x, y in (("train", self.x_train, self.y_train), ("val", self.x_val, self.y_val),
                            ("test", self.x_test, self.y_test)):
            if x is None:
                continue
            if len(x) != len(y):
                raise DataError(f"TaskData: x_{split} has {len(x)} samples but y_{split} has {len(y)}")
            if tuple(x.shape[1:]) != tuple(self.x_train.shape[1:]):
                raise DataError(f"TaskData: x_{split} feature shape {tuple(x.shape[1:])} differs from "
                                f"x_train's {tuple(self.x_train.shape[1:])}")

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------- constants

DEFAULT_BASE_URLS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
_URL_ENV = {"mnist": "CLNP_MNIST_URL", "fashion-mnist": "CLNP_FASHION_MNIST_URL"}
_DISPLAY = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}

#: Socket timeout (seconds) for each blocking operation of a download.
DOWNLOAD_TIMEOUT_S = 60.0

# sha256 of the *uncompressed* idx files (canonical distributions).
_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
_KNOWN_SHA = {sha: (ds, name) for ds, files in _SHA256.items() for name, sha in files.items()}

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_ROWS = _COLS = 28
_EXPECTED_COUNT = {"train": 60000, "t10k": 10000}
_FILES = (  # (split, kind, name)
    ("train", "images", "train-images-idx3-ubyte"),
    ("train", "labels", "train-labels-idx1-ubyte"),
    ("t10k", "images", "t10k-images-idx3-ubyte"),
    ("t10k", "labels", "t10k-labels-idx1-ubyte"),
)

_CLASS_NAMES = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
}

_ALLOWED_FORMS = (
    "allowed sources: 'mnist', 'fashion-mnist', 'permuted-mnist:SEED' (SEED a non-negative integer), "
    "'split-mnist:A,B,...' or 'split-fashion-mnist:A,B,...' (at least two distinct digits 0-9), "
    "a path ending in '.npz' (arrays x, y, optional x_val/y_val, x_test/y_test) "
    "or a path ending in '.csv' (header row, label column given by label_column)"
)
_DATA_DIR_HINT = ("pass --data-dir (data_dir=) or set CLNP_DATA_DIR to a folder holding "
                  "mnist/ and fashion-mnist/ with the idx files")

# path -> (size, mtime_ns) -> sha256 hex of the uncompressed content
_sha_cache: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


# --------------------------------------------------------------------------- public entry point

def load_source(
    spec: str,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    label_column: str | None = None,
    val_fraction: float = 0.1,
    download: bool = True,
    base_urls: dict[str, str] | None = None,
) -> TaskData:
    """Load the data source named by ``spec`` (see the module docstring)."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise DataError(f"data source spec must be a string, got {type(spec).__name__}; {_ALLOWED_FORMS}")
    _check_int("seed", seed, minimum=0)
    if limit is not None:
        _check_int("limit", limit, minimum=1)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not (0.0 <= float(val_fraction) < 1.0):
        raise DataError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    val_fraction = float(val_fraction)

    text = spec.strip()
    if not text:
        raise DataError(f"empty data source spec; {_ALLOWED_FORMS}")
    lower = text.lower()
    opts = dict(limit=limit, seed=seed, val_fraction=val_fraction)

    if lower.endswith(".npz") or lower.endswith(".csv"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} not found (source {spec!r})")
        source = str(path.resolve())
        if lower.endswith(".npz"):
            if label_column is not None:
                logger.warning("label_column=%r ignored for npz source %s", label_column, source)
            return _load_npz(path, source, **opts)
        return _load_csv(path, source, label_column=label_column, **opts)

    if label_column is not None:
        logger.warning("label_column=%r ignored for source %r", label_column, text)
    mnist_kw = dict(data_dir=data_dir, cache_dir=cache_dir, download=download, base_urls=base_urls)

    name, sep, arg = lower.partition(":")
    name = name.strip()
    if name in ("mnist", "fashion-mnist") and not sep:
        return _load_mnist_family(name, source=name, **mnist_kw, **opts)
    if name == "permuted-mnist":
        arg = arg.strip()
        if not sep or not re.fullmatch(r"[0-9]+", arg):
            raise DataError(f"bad permuted-mnist spec {spec!r}: expected 'permuted-mnist:SEED' with SEED a "
                            f"non-negative integer, e.g. 'permuted-mnist:1'")
        pseed = int(arg)
        return _load_mnist_family("mnist", source=f"permuted-mnist:{pseed}", permutation_seed=pseed,
                                  **mnist_kw, **opts)
    if name in ("split-mnist", "split-fashion-mnist"):
        ds = name[len("split-"):]
        classes = _parse_split_digits(spec, arg if sep else "")
        return _load_mnist_family(ds, source=f"{name}:{','.join(map(str, classes))}", classes=classes,
                                  **mnist_kw, **opts)
    raise DataError(f"unknown data source {spec!r}; {_ALLOWED_FORMS}")


# --------------------------------------------------------------------------- helpers

def _check_int(what: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _parse_split_digits(spec: str, arg: str) -> tuple[int, ...]:
    usage = "expected e.g. 'split-mnist:0,1' (at least two distinct digits 0-9, comma-separated)"
    parts = [p.strip() for p in arg.split(",")] if arg.strip() else []
    if len(parts) < 2:
        raise DataError(f"bad split spec {spec!r}: {usage}")
    digits: list[int] = []
    for p in parts:
        if not re.fullmatch(r"[0-9]", p):
            raise DataError(f"bad split spec {spec!r}: {p!r} is not a digit 0-9; {usage}")
        d = int(p)
        if d in digits:
            raise DataError(f"bad split spec {spec!r}: digit {d} is listed twice; {usage}")
        digits.append(d)
    return tuple(digits)


def _plan_split(n: int, *, given_val: int | None, val_fraction: float, seed: int, limit: int | None,
                what: str) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (train into the training data, val into the training data or the given val split)."""
    if given_val is None:
        n_val = int(round(n * val_fraction))
        if val_fraction > 0:
            n_val = max(n_val, 1)
        if n - n_val < 1:
            raise DataError(f"{what}: {n} training samples are too few to hold out val_fraction={val_fraction}")
        perm = np.random.default_rng(seed).permutation(n)
        val_idx = perm[:n_val]
        train_idx = np.sort(perm[n_val:])
    else:
        train_idx = np.arange(n)
        val_idx = np.arange(given_val)
    if limit is not None:
        train_idx = train_idx[:limit]
        val_idx = val_idx[:max(limit // 5, 500)]
    return train_idx, val_idx


def _warn_missing_classes(source: str, y_train: np.ndarray, class_names: tuple[str, ...]) -> None:
    present = np.unique(y_train)
    if len(present) < len(class_names):
        missing = [class_names[i] for i in range(len(class_names)) if i not in set(present.tolist())]
        logger.warning("%s: the training split (after limit) has no samples of classes %s",
                       source, ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))


# --------------------------------------------------------------------------- MNIST family

def _load_mnist_family(ds: str, *, source: str, data_dir, cache_dir, download: bool, base_urls,
                       limit: int | None, seed: int, val_fraction: float,
                       permutation_seed: int | None = None, classes: tuple[int, ...] | None = None) -> TaskData:
    arrays = _get_mnist_arrays(ds, data_dir=data_dir, cache_dir=cache_dir, download=download,
                               base_urls=base_urls)
    x_tr_all, y_tr_all = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    x_te, y_te = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]

    class_names = _CLASS_NAMES[ds]
    if classes is not None:
        lut = np.full(10, -1, dtype=np.int64)
        lut[list(classes)] = np.arange(len(classes))
        keep = np.flatnonzero(lut[y_tr_all] >= 0)
        x_tr_all, y_tr_all = x_tr_all[keep], lut[y_tr_all[keep]]
        keep_te = np.flatnonzero(lut[y_te] >= 0)
        x_te, y_te = x_te[keep_te], lut[y_te[keep_te]]
        class_names = tuple(_CLASS_NAMES[ds][c] for c in classes)

    train_idx, val_idx = _plan_split(len(y_tr_all), given_val=None, val_fraction=val_fraction, seed=seed,
                                     limit=limit, what=source)
    perm = None
    if permutation_seed is not None:
        perm = np.random.default_rng(permutation_seed).permutation(_ROWS * _COLS)

    def feats(x: np.ndarray) -> np.ndarray:
        if perm is not None:
            x = x.reshape(len(x), -1)[:, perm].reshape(len(x), _ROWS, _COLS)
        return x.astype(np.float32)

    y_tr_all = y_tr_all.astype(np.int64)
    data = TaskData(
        source=source,
        x_train=feats(x_tr_all[train_idx]), y_train=y_tr_all[train_idx],
        x_val=feats(x_tr_all[val_idx]), y_val=y_tr_all[val_idx],
        x_test=feats(x_te), y_test=y_te.astype(np.int64),
        class_names=class_names,
        preprocessing=Preprocessing(scale=np.full((_ROWS, _COLS), 1.0 / (255.0 * _PIXEL_STD[ds]), dtype=np.float32),
                                    shift=np.full((_ROWS, _COLS), -_PIXEL_MEAN[ds] / _PIXEL_STD[ds], dtype=np.float32)),
    )
    _warn_missing_classes(source, data.y_train, class_names)
    logger.info("loaded %s: %d train, %d val, %d test samples", source, len(data.y_train), len(data.y_val),
                len(data.y_test))
    return data


def _get_mnist_arrays(ds: str, *, data_dir, cache_dir, download: bool, base_urls) -> dict[str, np.ndarray]:
    """Find (or download) and verify the four idx files of ``ds``; return their arrays by file name."""
    display = _DISPLAY[ds]
    if data_dir is None:
        env = os.environ.get("CLNP_DATA_DIR")
        data_dir = env if env else None
    ddir = Path(data_dir).expanduser() if data_dir is not None else None
    if ddir is not None and not ddir.is_dir():
        raise DataError(f"data directory {str(ddir)!r} does not exist or is not a directory; "
                        f"it should hold {ds}/ with the {display} idx files")
    if cache_dir is None:
        cache_dir = os.environ.get("CLNP_CACHE_DIR") or "~/.cache/clnp"
    csub = Path(cache_dir).expanduser() / ds

    arrays: dict[str, np.ndarray] = {}
    for _split, _kind, name in _FILES:
        arr = None
        searched: list[str] = []
        ignored: list[str] = []
        if ddir is not None:
            for path in _candidates(ddir / ds, name):
                searched.append(str(path))
                if path.is_file():
                    arr = _read_idx(path, ds, name)
                    break
            if arr is None:
                for path in _candidates(ddir, name):
                    searched.append(str(path))
                    if path.is_file():
                        try:
                            arr = _read_idx(path, ds, name)
                        except _OtherDatasetError as e:
                            logger.info("ignoring %s: %s", path, e)
                            ignored.append(f"ignored {path}: {e}")
                            continue
                        break
        if arr is None:
            for path in _candidates(csub, name):
                searched.append(str(path))
                if path.is_file():
                    try:
                        arr = _read_idx(path, ds, name)
                    except DataError as e:
                        raise DataError(f"{e} (this is a cached file: delete it to download it again)") from e
                    break
        if arr is None:
            if not download:
                note = f" ({'; '.join(ignored)})" if ignored else ""
                raise DataError(f"{display} file {name} not found (looked for {', '.join(searched)}){note} and "
                                f"download is disabled; {_DATA_DIR_HINT}")
            arr = _download(ds, name, csub, _base_url(ds, base_urls))
        arrays[name] = arr

    for split in ("train", "t10k"):
        ni, nl = len(arrays[f"{split}-images-idx3-ubyte"]), len(arrays[f"{split}-labels-idx1-ubyte"])
        if ni != nl:  # unreachable after the expected-count checks, kept as a guard
            raise DataError(f"{display} {split}: {ni} images but {nl} labels")
    return arrays


def _candidates(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / name, folder / f"{name}.gz"


def _base_url(ds: str, base_urls: dict[str, str] | None) -> str:
    if base_urls:
        unknown = set(base_urls) - set(DEFAULT_BASE_URLS)
        if unknown:
            raise DataError(f"base_urls has unknown keys {sorted(unknown)}; allowed keys: "
                            f"{sorted(DEFAULT_BASE_URLS)}")
        if base_urls.get(ds):
            return base_urls[ds]
    return os.environ.get(_URL_ENV[ds]) or DEFAULT_BASE_URLS[ds]


class _OtherDatasetError(DataError):
    """The file is intact but belongs to another dataset / another file name."""


def _expected_size(name: str) -> int:
    split, kind = name.split("-")[0], name.split("-")[1]
    n = _EXPECTED_COUNT[split]
    return 16 + n * _ROWS * _COLS if kind == "images" else 8 + n


def _read_content(path: Path, max_bytes: int, what: str) -> bytes:
    """The (decompressed if gzip) content of ``path``, at most ``max_bytes + 1`` bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as g:
                return g.read(max_bytes + 1)
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{what}: corrupt gzip data ({e}); the file is damaged or truncated") from e
    except OSError as e:
        raise DataError(f"{what}: cannot read ({e})") from e


def _read_idx(path: Path, ds: str, name: str, *, content: bytes | None = None, what: str | None = None) -> np.ndarray:
    """Read and verify one idx file; returns uint8 images (N, 28, 28) or labels (N,)."""
    display = _DISPLAY[ds]
    split, kind = name.split("-")[0], name.split("-")[1]
    expected_n = _EXPECTED_COUNT[split]
    expected_size = _expected_size(name)
    what = what or f"{display} {name} file {str(path)!r}"
    if content is None:
        content = _read_content(path, 2 * expected_size, what)

    want_magic = _IMAGES_MAGIC if kind == "images" else _LABELS_MAGIC
    header_len = 16 if kind == "images" else 8
    if len(content) < header_len:
        raise DataError(f"{what}: only {len(content)} bytes, too short for an idx header "
                        f"({header_len} bytes); the file is truncated")
    magic, count = struct.unpack(">II", content[:8])
    if magic != want_magic:
        hint = ""
        if magic == (_LABELS_MAGIC if kind == "images" else _IMAGES_MAGIC):
            hint = f" (that is the magic of an idx {'labels' if kind == 'images' else 'images'} file)"
        raise DataError(f"{what}: wrong idx magic number {magic} (0x{magic:08x}){hint}; an idx {kind} file "
                        f"starts with {want_magic} (0x{want_magic:08x})")
    item = 1
    if kind == "images":
        rows, cols = struct.unpack(">II", content[8:16])
        if (rows, cols) != (_ROWS, _COLS):
            raise DataError(f"{what}: images are {rows}x{cols}, expected {_ROWS}x{_COLS}")
        item = rows * cols
    if count != expected_n:
        raise DataError(f"{what}: header declares {count} {kind}, expected {expected_n} for the {split} split")
    declared = header_len + count * item
    if len(content) != declared:
        if len(content) < declared:
            problem = f"truncated: the header declares {count} {kind} ({declared} bytes) but the content has " \
                      f"only {len(content)} bytes"
        else:
            problem = f"has trailing data: the header declares {count} {kind} ({declared} bytes) but the " \
                      f"content is longer"
        raise DataError(f"{what}: {problem}")

    sha = _content_sha256(path, content)
    want_sha = _SHA256[ds][name]
    if sha != want_sha:
        other = _KNOWN_SHA.get(sha)
        if other is not None:
            raise _OtherDatasetError(f"{what}: this is the {_DISPLAY[other[0]]} {other[1]} file, not the "
                                     f"{display} {name} file")
        raise DataError(f"{what}: sha256 of the uncompressed content is {sha}, expected {want_sha} (canonical "
                        f"{display} {name}); the file is corrupt or modified")
    arr = np.frombuffer(content, dtype=np.uint8, offset=header_len)
    return arr.reshape(count, _ROWS, _COLS) if kind == "images" else arr


def _content_sha256(path: Path, content: bytes) -> str:
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None:
        with _sha_lock:
            hit = _sha_cache.get(key)
        if hit is not None:
            return hit
    sha = hashlib.sha256(content).hexdigest()
    if key is not None:
        with _sha_lock:
            _sha_cache[key] = sha
    return sha


def _download(ds: str, name: str, csub: Path, base_url: str) -> np.ndarray:
    display = _DISPLAY[ds]
    url = base_url.rstrip("/") + "/" + name + ".gz"

    def fail(why: str, cause: BaseException | None = None) -> DataError:
        err = DataError(f"downloading the {display} file {name}.gz from {url} failed: {why}. The file was not "
                        f"stored in the cache {str(csub)!r}; to use local files instead, {_DATA_DIR_HINT}")
        err.__cause__ = cause
        return err

    try:
        csub.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=csub)
    except OSError as e:
        raise fail(f"cannot create a file in the cache directory ({e})", e) from e
    tmp = Path(tmp_name)
    max_bytes = 2 * _expected_size(name)  # a .gz is never larger than its content here
    done = False
    try:
        logger.info("downloading %s to %s", url, csub)
        t0 = time.monotonic()
        try:
            with os.fdopen(fd, "wb") as out:
                req = urllib.request.Request(url, headers={"User-Agent": "clnp-trainer"})
                with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    length = resp.headers.get("Content-Length")
                    got = 0
                    while True:
                        chunk = resp.read(1 << 20)
                        if not chunk:
                            break
                        got += len(chunk)
                        if got > max_bytes:
                            raise fail(f"the server sent more than {max_bytes} bytes")
                        out.write(chunk)
                    if length is not None and length.isdigit() and got != int(length):
                        raise fail(f"incomplete transfer: got {got} of {length} bytes")
                out.flush()
                os.fsync(out.fileno())
        except urllib.error.HTTPError as e:
            raise fail(f"HTTP {e.code} {e.reason}", e) from e
        except urllib.error.URLError as e:
            raise fail(f"cannot connect ({e.reason})", e) from e
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise fail(f"{type(e).__name__}: {e}", e) from e

        try:
            what = f"downloaded {display} {name} data"
            content = _read_content(tmp, _expected_size(name) * 2, what)
            arr = _read_idx(tmp, ds, name, content=content, what=what)
        except DataError as e:
            raise fail(f"the data does not verify: {e}", e) from e
        with open(tmp, "rb") as f:
            is_gz = f.read(2) == b"\x1f\x8b"
        final = csub / (f"{name}.gz" if is_gz else name)
        try:
            os.replace(tmp, final)
        except OSError as e:
            raise fail(f"cannot move the verified file into place ({e})", e) from e
        done = True
        # Remember the verification for the file's final name (rename keeps size and mtime).
        _content_sha256(final, content)
        logger.info("downloaded and verified %s (%d bytes) in %.1f s", final, final.stat().st_size,
                    time.monotonic() - t0)
        return arr
    finally:
        if not done:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:  # pragma: no cover
                logger.warning("could not remove partial download %s: %s", tmp, e)


# --------------------------------------------------------------------------- npz / csv

def _load_npz(path: Path, source: str, *, limit: int | None, seed: int, val_fraction: float) -> TaskData:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled objects), OSError, EOFError ...
        raise DataError(f"cannot read npz file {source!r}: {type(e).__name__}: {e}. Expected an .npz archive "
                        f"(np.savez) with numeric arrays x, y and optionally x_val, y_val, x_test, y_test") from e
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"npz file {source!r} must contain arrays 'x' and 'y' (optional: x_val, y_val, x_test, "
                        f"y_test); it has {sorted(arrays)}")
    for a, b in (("x_val", "y_val"), ("x_test", "y_test")):
        if (a in arrays) != (b in arrays):
            raise DataError(f"npz file {source!r}: {a} and {b} must be given together")
    extra = sorted(set(arrays) - {"x", "y", "x_val", "y_val", "x_test", "y_test"})
    if extra:
        logger.info("npz file %s: ignoring arrays %s", source, extra)

    def feats(key: str) -> np.ndarray:
        x = arrays[key]
        if x.dtype.kind not in "biuf":
            raise DataError(f"npz file {source!r}: {key} has dtype {x.dtype}; features must be numeric")
        if x.ndim < 2:
            raise DataError(f"npz file {source!r}: {key} has shape {x.shape}; features must be (N, *feature_shape)")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"npz file {source!r}: {key} contains NaN or infinite values (as float32)")
        return x

    def labels(key: str, n: int) -> np.ndarray:
        y = arrays[key]
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or len(y) != n:
            raise DataError(f"npz file {source!r}: {key} has shape {y.shape}, expected ({n},) to match "
                            f"x{key[1:]}")
        if y.dtype.kind in "biu":
            return y.astype(np.int64)
        if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
            return y.astype(np.int64)
        raise DataError(f"npz file {source!r}: {key} must hold integer labels, got dtype {y.dtype}")

    x = feats("x")
    y = labels("y", len(x))
    splits = {}
    for s in ("val", "test"):
        if f"x_{s}" in arrays:
            xs = feats(f"x_{s}")
            if xs.shape[1:] != x.shape[1:]:
                raise DataError(f"npz file {source!r}: x_{s} feature shape {xs.shape[1:]} differs from x's "
                                f"{x.shape[1:]}")
            splits[s] = (xs, labels(f"y_{s}", len(xs)))
    return _finish_tabular(source, f"npz file {source!r}", x, y, splits.get("val"), splits.get("test"),
                           limit=limit, seed=seed, val_fraction=val_fraction)


def _load_csv(path: Path, source: str, *, label_column: str | None, limit: int | None, seed: int,
              val_fraction: float) -> TaskData:
    where = f"CSV file {source!r}"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(f"{where} is empty; a header row naming the columns is required")
            header = [h.strip() for h in header]
            if all(_is_number(h) for h in header):
                raise DataError(f"{where}: the first row {header[:5]} looks like data; a header row naming the "
                                f"columns is required")
            if label_column is None:
                raise DataError(f"{where}: label_column is required for CSV sources (--label-column); "
                                f"columns: {header}")
            lc = label_column.strip()
            hits = [i for i, h in enumerate(header) if h == lc]
            if not hits:
                raise DataError(f"{where}: label column {label_column!r} not found; columns: {header}")
            if len(hits) > 1:
                raise DataError(f"{where}: label column {label_column!r} appears {len(hits)} times in the header")
            li = hits[0]
            if len(header) < 2:
                raise DataError(f"{where}: no feature columns besides the label column {label_column!r}")
            fcols = [i for i in range(len(header)) if i != li]
            rows: list[list[float]] = []
            raw_labels: list[str] = []
            for row in reader:
                if not row:
                    continue
                line = reader.line_num
                if len(row) != len(header):
                    raise DataError(f"{where}: line {line} has {len(row)} fields, the header has {len(header)}")
                lab = row[li].strip()
                if not lab:
                    raise DataError(f"{where}: line {line}: empty label in column {label_column!r}")
                vals = []
                for i in fcols:
                    cell = row[i]
                    try:
                        v = float(cell)
                    except ValueError:
                        v = None
                    if v is None or not math.isfinite(v):
                        raise DataError(f"{where}: line {line}, column {header[i]!r}: value {cell!r} is not a "
                                        f"finite number; every column except the label column "
                                        f"{label_column!r} must be numeric")
                    vals.append(v)
                rows.append(vals)
                raw_labels.append(lab)
    except OSError as e:
        raise DataError(f"cannot read {where}: {e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text: {e}") from e
    except csv.Error as e:
        raise DataError(f"{where}: malformed CSV: {e}") from e
    if not rows:
        raise DataError(f"{where} has a header but no data rows")

    x = np.asarray(rows, dtype=np.float64).astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: some feature values overflow float32")
    ints = [_as_int(s) for s in raw_labels]
    if all(v is not None for v in ints):
        y: np.ndarray = np.asarray(ints, dtype=np.int64)
    else:
        y = np.asarray(raw_labels, dtype=str)
    return _finish_tabular(source, where, x, y, None, None, limit=limit, seed=seed, val_fraction=val_fraction)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _as_int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        return None
    return int(f) if math.isfinite(f) and f == int(f) else None


def _finish_tabular(source: str, where: str, x: np.ndarray, y: np.ndarray, val, test, *, limit, seed,
                    val_fraction) -> TaskData:
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(f"{where}: the training labels have {len(classes)} distinct value(s) "
                        f"{[str(c) for c in classes]}; at least 2 classes are needed")
    class_names = tuple(str(c) for c in classes.tolist())

    def remap(labels: np.ndarray, split: str) -> np.ndarray:
        known = np.isin(labels, classes)
        if not known.all():
            bad = np.unique(labels[~known])
            raise DataError(f"{where}: {split} labels {[str(b) for b in bad[:10].tolist()]} do not occur in the "
                            f"training labels {list(class_names)}")
        return np.searchsorted(classes, labels).astype(np.int64)

    y = remap(y, "training")
    train_idx, val_idx = _plan_split(len(y), given_val=None if val is None else len(val[0]),
                                     val_fraction=val_fraction, seed=seed, limit=limit, what=where)
    if val is None:
        x_val, y_val = x[val_idx], y[val_idx]
    else:
        x_val, y_val = val[0][val_idx], remap(val[1], "validation")[val_idx]
    x_train, y_train = x[train_idx], y[train_idx]
    x_test = y_test = None
    if test is not None:
        x_test, y_test = test[0], remap(test[1], "test")

    xt = x_train.astype(np.float64)
    mean = xt.mean(axis=0)
    std = xt.std(axis=0)
    tiny = std < 1e-8
    safe = np.where(tiny, 1.0, std)
    scale = np.where(tiny, 1.0, 1.0 / safe)
    shift = np.where(tiny, -mean, -mean / safe)
    data = TaskData(source=source, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
                    x_test=x_test, y_test=y_test, class_names=class_names,
                    preprocessing=Preprocessing(scale=scale.astype(np.float32), shift=shift.astype(np.float32)))
    _warn_missing_classes(source, y_train, class_names)
    logger.info("loaded %s: %d train, %d val, %s test samples, %d classes, features %s", source, len(y_train),
                len(y_val), "no" if y_test is None else len(y_test), len(class_names), data.feature_shape)
    return data
