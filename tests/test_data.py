"""Tests of trainer/data.py against the real MNIST / Fashion-MNIST files in ../shared/data."""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import http.server
import shutil
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

import trainer.data as data_mod
from trainer.data import DataError, Preprocessing, TaskData, load_source

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

if not (DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file():  # pragma: no cover
    pytest.skip(f"real data not found in {DATA}", allow_module_level=True)


# --------------------------------------------------------------------------- helpers / fixtures

@functools.lru_cache(maxsize=None)
def raw_bytes(ds: str, name: str) -> bytes:
    """Uncompressed content of a real idx file, read independently of the loader."""
    return gzip.decompress((DATA / ds / f"{name}.gz").read_bytes())


def raw_images(ds: str, split: str) -> np.ndarray:
    return np.frombuffer(raw_bytes(ds, f"{split}-images-idx3-ubyte"), np.uint8, offset=16).reshape(-1, 28, 28)


def raw_labels(ds: str, split: str) -> np.ndarray:
    return np.frombuffer(raw_bytes(ds, f"{split}-labels-idx1-ubyte"), np.uint8, offset=8)


def canonical_sha(ds: str) -> dict[str, str]:
    out = {}
    for line in (DATA / ds / "SHA256SUMS.uncompressed").read_text().splitlines():
        if line.strip():
            sha, name = line.split()
            out[name] = sha
    return out


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    for var in ("CLNP_DATA_DIR", "CLNP_MNIST_URL", "CLNP_FASHION_MNIST_URL"):
        monkeypatch.delenv(var, raising=False)
    # Never touch ~/.cache/clnp from the tests.
    monkeypatch.setenv("CLNP_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def mnist() -> TaskData:
    return load_source("mnist", data_dir=DATA, download=False)


def mnist_dir_with(tmp_path: Path, replace: dict[str, bytes], ds: str = "mnist") -> Path:
    """A data dir whose ds/ folder links the real files except those in ``replace`` (written uncompressed)."""
    root = tmp_path / "data"
    (root / ds).mkdir(parents=True)
    for name in NAMES:
        if name in replace:
            (root / ds / name).write_bytes(replace[name])
        else:
            (root / ds / f"{name}.gz").symlink_to(DATA / ds / f"{name}.gz")
    return root


# --------------------------------------------------------------------------- MNIST family

def test_mnist_shapes_dtypes_ranges(mnist):
    assert mnist.source == "mnist"
    assert mnist.x_train.shape == (54000, 28, 28) and mnist.x_val.shape == (6000, 28, 28)
    assert mnist.x_test.shape == (10000, 28, 28)
    for x in (mnist.x_train, mnist.x_val, mnist.x_test):
        assert x.dtype == np.float32
        assert x.min() == 0.0 and x.max() == 255.0
        assert np.array_equal(x, np.round(x))  # raw pixel values, not normalised
    for y in (mnist.y_train, mnist.y_val, mnist.y_test):
        assert y.dtype == np.int64
        assert set(np.unique(y).tolist()) == set(range(10))
    assert mnist.class_names == tuple(str(i) for i in range(10))
    assert mnist.num_classes == 10 and mnist.feature_shape == (28, 28)
    assert isinstance(mnist.preprocessing, Preprocessing)
    assert mnist.preprocessing.scale.dtype == np.float32 and mnist.preprocessing.shift.dtype == np.float32
    assert mnist.preprocessing.scale.shape == (28, 28)
    np.testing.assert_allclose(mnist.preprocessing.scale, 1 / (255 * 0.3081), rtol=1e-6)
    np.testing.assert_allclose(mnist.preprocessing.shift, -0.1307 / 0.3081, rtol=1e-6)
    z = mnist.preprocessing.apply(mnist.x_train[:2000])
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05
    normed = mnist.preprocessing.apply(mnist.x_test)
    assert normed.dtype == np.float32
    assert normed.min() == pytest.approx(-0.1307 / 0.3081) and normed.max() == pytest.approx((1 - 0.1307) / 0.3081)


def test_mnist_matches_files_and_holdout_partitions_training_set(mnist):
    # Test split: exactly the t10k file, in order, unlimited.
    np.testing.assert_array_equal(mnist.x_test, raw_images("mnist", "t10k"))
    np.testing.assert_array_equal(mnist.y_test, raw_labels("mnist", "t10k"))
    # Train + val together are the 60000 training samples; val = the seed-0 permutation's first 10 %,
    # train = the rest in file order.
    xs, ys = raw_images("mnist", "train"), raw_labels("mnist", "train")
    perm = np.random.default_rng(0).permutation(60000)
    np.testing.assert_array_equal(mnist.x_val, xs[perm[:6000]])
    np.testing.assert_array_equal(mnist.y_val, ys[perm[:6000]])
    rest = np.sort(perm[6000:])
    np.testing.assert_array_equal(mnist.x_train, xs[rest])
    np.testing.assert_array_equal(mnist.y_train, ys[rest])
    assert np.array_equal(np.bincount(mnist.y_train) + np.bincount(mnist.y_val), np.bincount(ys))


def test_holdout_depends_on_seed_and_is_deterministic(mnist):
    again = load_source("mnist", data_dir=DATA, download=False, limit=600)
    other = load_source("mnist", data_dir=DATA, download=False, limit=600, seed=1)
    np.testing.assert_array_equal(again.x_val, mnist.x_val[:500])  # limit only truncates
    np.testing.assert_array_equal(again.x_train, mnist.x_train[:600])
    assert not np.array_equal(other.y_val, again.y_val)


@pytest.mark.parametrize("limit,n_val", [(1000, 500), (5000, 1000), (10**6, 6000)])
def test_limit_and_validation_cap(mnist, limit, n_val):
    d = load_source("mnist", data_dir=DATA, download=False, limit=limit)
    assert len(d.x_train) == len(d.y_train) == min(limit, 54000)
    assert len(d.x_val) == len(d.y_val) == n_val
    assert len(d.x_test) == 10000  # never limited
    np.testing.assert_array_equal(d.x_train, mnist.x_train[:limit])
    np.testing.assert_array_equal(d.y_val, mnist.y_val[:n_val])


def test_val_fraction():
    d = load_source("mnist", data_dir=DATA, download=False, val_fraction=0.25, limit=100_000)
    assert (len(d.y_train), len(d.y_val)) == (45000, 15000)
    d0 = load_source("mnist", data_dir=DATA, download=False, val_fraction=0.0)
    assert (len(d0.y_train), len(d0.y_val)) == (60000, 0)
    assert d0.x_val.shape == (0, 28, 28)
    np.testing.assert_array_equal(d0.y_train, raw_labels("mnist", "train"))
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(DataError, match="val_fraction"):
            load_source("mnist", data_dir=DATA, download=False, val_fraction=bad)


def test_fashion_mnist():
    d = load_source(" Fashion-MNIST ", data_dir=DATA, download=False, limit=2000)
    assert d.source == "fashion-mnist"
    assert d.class_names[0] == "T-shirt/top" and d.class_names[9] == "Ankle boot" and d.num_classes == 10
    np.testing.assert_array_equal(d.x_test, raw_images("fashion-mnist", "t10k"))
    assert not np.array_equal(d.x_test, raw_images("mnist", "t10k"))
    np.testing.assert_allclose(d.preprocessing.scale, 1 / (255 * 0.3530), rtol=1e-6)
    np.testing.assert_allclose(d.preprocessing.shift, -0.2860 / 0.3530, rtol=1e-6)


def test_files_directly_in_data_dir_and_env_var(monkeypatch, tmp_path):
    # data_dir itself holds the files, uncompressed for one of them.
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in NAMES[1:]:
        (flat / f"{name}.gz").symlink_to(DATA / "mnist" / f"{name}.gz")
    (flat / NAMES[0]).write_bytes(raw_bytes("mnist", NAMES[0]))
    monkeypatch.setenv("CLNP_DATA_DIR", str(flat))
    d = load_source("mnist", download=False, limit=10)
    np.testing.assert_array_equal(d.x_test, raw_images("mnist", "t10k"))
    # ... but those MNIST files are not taken for Fashion-MNIST (which is then looked for elsewhere).
    with pytest.raises(DataError, match="not the Fashion-MNIST") as ei:
        load_source("fashion-mnist", download=False)
    assert "--data-dir" in str(ei.value)


def test_sha256_verification_is_cached(mnist, monkeypatch):
    calls = []
    real = hashlib.sha256

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(data_mod.hashlib, "sha256", counting)
    load_source("mnist", data_dir=DATA, download=False, limit=10)
    assert calls == []


def test_permuted_mnist():
    plain = load_source("mnist", data_dir=DATA, download=False, limit=1000)
    p1 = load_source("permuted-mnist:1", data_dir=DATA, download=False, limit=1000)
    p1b = load_source("permuted-mnist: 01", data_dir=DATA, download=False, limit=1000)
    p2 = load_source("permuted-mnist:2", data_dir=DATA, download=False, limit=1000)
    p0 = load_source("permuted-mnist:0", data_dir=DATA, download=False, limit=1000)
    assert p1.source == p1b.source == "permuted-mnist:1"
    np.testing.assert_array_equal(p1.x_train, p1b.x_train)
    np.testing.assert_array_equal(p1.x_test, p1b.x_test)
    assert not np.array_equal(p1.x_train, p2.x_train)
    assert not np.array_equal(p0.x_train, plain.x_train)  # seed 0 is permuted too
    for p in (p0, p1, p2):
        assert p.x_train.shape == (1000, 28, 28) and p.x_test.shape == (10000, 28, 28)
        np.testing.assert_array_equal(p.y_train, plain.y_train)  # same samples, same labels
        np.testing.assert_array_equal(p.y_test, plain.y_test)
        for a, b in ((p.x_train, plain.x_train), (p.x_val, plain.x_val), (p.x_test, plain.x_test)):
            # the same pixel multiset per image
            np.testing.assert_array_equal(np.sort(a.reshape(len(a), -1), axis=1), np.sort(b.reshape(len(b), -1), axis=1))
    perm = np.random.default_rng(1).permutation(784)
    np.testing.assert_array_equal(p1.x_test.reshape(-1, 784), plain.x_test.reshape(-1, 784)[:, perm])
    np.testing.assert_array_equal(p1.x_val.reshape(-1, 784), plain.x_val.reshape(-1, 784)[:, perm])


def test_split_mnist():
    d = load_source("split-mnist: 3 , 7", data_dir=DATA, download=False)
    assert d.source == "split-mnist:3,7"
    assert d.class_names == ("3", "7") and d.num_classes == 2
    ys, yt = raw_labels("mnist", "train"), raw_labels("mnist", "t10k")
    assert len(d.y_train) + len(d.y_val) == np.isin(ys, [3, 7]).sum()
    assert len(d.y_val) == round(0.1 * np.isin(ys, [3, 7]).sum())
    sel = np.isin(yt, [3, 7])
    np.testing.assert_array_equal(d.x_test, raw_images("mnist", "t10k")[sel])
    np.testing.assert_array_equal(d.y_test, (yt[sel] == 7).astype(np.int64))
    for y in (d.y_train, d.y_val, d.y_test):
        assert y.dtype == np.int64 and set(np.unique(y).tolist()) == {0, 1}

    rev = load_source("split-mnist:7,3", data_dir=DATA, download=False)
    assert rev.class_names == ("7", "3")
    np.testing.assert_array_equal(rev.y_test, 1 - d.y_test)

    f = load_source("split-fashion-mnist:0,9,5", data_dir=DATA, download=False, limit=300)
    assert f.class_names == ("T-shirt/top", "Ankle boot", "Sandal")
    assert len(f.y_train) == 300 and len(f.y_val) == 500 and len(f.y_test) == 3000
    np.testing.assert_array_equal(np.bincount(f.y_test), [1000, 1000, 1000])


# --------------------------------------------------------------------------- npz / csv

def _tabular(rng, n=400, labels=(-5, 3, 10)):
    x = rng.normal(loc=[1.0, -20.0, 300.0, 7.0], scale=[1.0, 0.5, 40.0, 0.0], size=(n, 4))
    y = rng.choice(labels, size=n)
    return x, y


def _check_standardised(d: TaskData, const_col: int | None = None):
    p = d.preprocessing
    assert p.scale.dtype == np.float32 and p.shift.dtype == np.float32
    assert p.scale.shape == p.shift.shape == d.feature_shape
    z = p.apply(d.x_train).astype(np.float64)
    mean, std = z.mean(axis=0), z.std(axis=0)
    for j in range(d.feature_shape[0]):
        assert abs(mean[j]) < 1e-4
        if j == const_col:
            assert p.scale[j] == 1.0 and p.shift[j] == pytest.approx(-d.x_train[0, j])
        else:
            assert std[j] == pytest.approx(1.0, abs=1e-4)


def test_npz_without_validation(tmp_path):
    rng = np.random.default_rng(5)
    x, y = _tabular(rng)
    path = tmp_path / "task.npz"
    np.savez(path, x=x, y=y)
    d = load_source(str(path))
    assert d.source == str(path.resolve())
    assert d.class_names == ("-5", "3", "10")
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert (len(d.y_train), len(d.y_val)) == (360, 40)
    assert d.x_test is None and d.y_test is None
    perm = np.random.default_rng(0).permutation(400)
    np.testing.assert_allclose(d.x_val, x[perm[:40]].astype(np.float32))
    np.testing.assert_allclose(d.x_train, x[np.sort(perm[40:])].astype(np.float32))
    mapping = {-5: 0, 3: 1, 10: 2}
    np.testing.assert_array_equal(d.y_val, [mapping[v] for v in y[perm[:40]]])
    _check_standardised(d, const_col=3)

    lim = load_source(path, limit=50, seed=3)
    assert len(lim.y_train) == 50 and len(lim.y_val) == 40  # cap max(10, 500) > 40
    _check_standardised(lim, const_col=3)  # statistics of the final (limited) training split


def test_npz_with_validation_and_test(tmp_path):
    rng = np.random.default_rng(6)
    x, y = _tabular(rng, n=300)
    xv, yv = _tabular(rng, n=50, labels=(3, 10))
    xt, yt = _tabular(rng, n=70)
    path = tmp_path / "task.npz"
    np.savez(path, x=x.reshape(300, 2, 2), y=y, x_val=xv.reshape(50, 2, 2), y_val=yv,
             x_test=xt.reshape(70, 2, 2), y_test=yt.astype(np.float64))
    d = load_source(str(path), val_fraction=0.5)  # ignored: the file has a validation split
    assert d.feature_shape == (2, 2) and d.num_classes == 3
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (300, 50, 70)
    np.testing.assert_allclose(d.x_train, x.reshape(300, 2, 2).astype(np.float32))
    np.testing.assert_allclose(d.x_val, xv.reshape(50, 2, 2).astype(np.float32))
    np.testing.assert_array_equal(d.y_val, np.searchsorted([-5, 3, 10], yv))
    np.testing.assert_array_equal(d.y_test, np.searchsorted([-5, 3, 10], yt))
    assert d.preprocessing.scale.shape == (2, 2)
    np.testing.assert_allclose(d.preprocessing.apply(d.x_train).reshape(300, 4).mean(axis=0), 0, atol=1e-4)

    bad = tmp_path / "bad.npz"
    np.savez(bad, x=x, y=y, x_val=xv, y_val=np.full(50, 4))
    with pytest.raises(DataError, match=r"validation labels \['4'\]"):
        load_source(bad)
    np.savez(bad, x=x, y=y, x_val=xv)
    with pytest.raises(DataError, match="x_val and y_val"):
        load_source(bad)
    np.savez(bad, features=x, y=y)
    with pytest.raises(DataError, match="'x' and 'y'"):
        load_source(bad)
    np.savez(bad, x=x, y=y + 0.5)
    with pytest.raises(DataError, match="integer labels"):
        load_source(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read npz"):
        load_source(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="not found"):
        load_source(tmp_path / "missing.npz")


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_csv_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    x, y = _tabular(rng, n=200, labels=(2, 4))
    path = tmp_path / "task.csv"
    _write_csv(path, ["a", "b", "label", "c", "d"],
               [[*r[:2], lab, *r[2:]] for r, lab in zip(x.tolist(), y.tolist())])
    d = load_source(str(path), label_column="label", val_fraction=0.2)
    assert d.class_names == ("2", "4") and d.feature_shape == (4,)
    assert (len(d.y_train), len(d.y_val)) == (160, 40) and d.x_test is None
    perm = np.random.default_rng(0).permutation(200)
    np.testing.assert_allclose(d.x_val, x[perm[:40]].astype(np.float32))
    np.testing.assert_array_equal(d.y_val, (y[perm[:40]] == 4).astype(np.int64))
    _check_standardised(d, const_col=3)

    # String labels are allowed in CSV: sorted, names are the strings.
    spath = tmp_path / "iris.csv"
    _write_csv(spath, ["f1", "species"], [[1.0, "virginica"], [2.0, "setosa"], [3.0, "setosa"],
                                           [4.0, "versicolor"]] * 5)
    s = load_source(spath, label_column="species", val_fraction=0.0)
    assert s.class_names == ("setosa", "versicolor", "virginica")
    np.testing.assert_array_equal(s.y_train[:4], [2, 0, 0, 1])


def test_csv_errors(tmp_path):
    path = tmp_path / "t.csv"
    _write_csv(path, ["x1", "x2", "y"], [[1, 2, 0], [3, 4, 1], [5, 6, 1]])
    with pytest.raises(DataError, match="label_column is required") as ei:
        load_source(path)
    assert "'x1'" in str(ei.value)
    with pytest.raises(DataError, match="label column 'target' not found.*'y'"):
        load_source(path, label_column="target")
    _write_csv(path, ["x1", "x2", "y"], [[1, 2, 0], [3, "abc", 1], [5, 6, 1]])
    with pytest.raises(DataError, match=r"line 3, column 'x2': value 'abc' is not a finite number"):
        load_source(path, label_column="y")
    _write_csv(path, ["x1", "x2", "y"], [[1, 2, 0], [3, 4]])
    with pytest.raises(DataError, match="line 3 has 2 fields"):
        load_source(path, label_column="y")
    _write_csv(path, ["1.0", "2.0", "0"], [[1, 2, 0]])
    with pytest.raises(DataError, match="header row"):
        load_source(path, label_column="0")
    _write_csv(path, ["x1", "y"], [[1, 0], [2, 0]])
    with pytest.raises(DataError, match="at least 2 classes"):
        load_source(path, label_column="y")


# --------------------------------------------------------------------------- bad specs / arguments

@pytest.mark.parametrize("spec,expect", [
    ("cifar10", "unknown data source 'cifar10'; allowed sources: 'mnist'"),
    ("mnist:3", "unknown data source"),
    ("data.txt", "path ending in '.npz'"),
    ("", "empty data source spec"),
    ("permuted-mnist", "SEED a non-negative integer"),
    ("permuted-mnist:-1", "SEED a non-negative integer"),
    ("permuted-mnist:abc", "SEED a non-negative integer"),
    ("permuted-mnist:1.5", "SEED a non-negative integer"),
    ("split-mnist", "at least two distinct digits"),
    ("split-mnist:3", "at least two distinct digits"),
    ("split-mnist:3,3", "digit 3 is listed twice"),
    ("split-mnist:3,10", "'10' is not a digit 0-9"),
    ("split-mnist:a,b", "'a' is not a digit 0-9"),
    ("split-fashion-mnist:1,", "'' is not a digit 0-9"),
])
def test_bad_specs(spec, expect):
    with pytest.raises(DataError) as ei:
        load_source(spec, data_dir=DATA, download=False)
    assert expect in str(ei.value)


def test_bad_arguments(tmp_path):
    for kw, what in (({"limit": 0}, "limit"), ({"limit": -3}, "limit"), ({"seed": -1}, "seed"),
                     ({"limit": True}, "limit")):
        with pytest.raises(DataError, match=what):
            load_source("mnist", data_dir=DATA, download=False, **kw)
    with pytest.raises(DataError, match="does not exist"):
        load_source("mnist", data_dir=tmp_path / "nope", download=False)
    with pytest.raises(DataError, match="unknown keys"):
        load_source("mnist", cache_dir=tmp_path, base_urls={"cifar": "http://x/"})


def test_missing_files_without_download(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as ei:
        load_source("mnist", data_dir=empty, cache_dir=tmp_path / "cache", download=False)
    msg = str(ei.value)
    assert "train-images-idx3-ubyte not found" in msg and "download is disabled" in msg
    assert "--data-dir" in msg and "CLNP_DATA_DIR" in msg


# --------------------------------------------------------------------------- corrupt idx files

def _with_header(content: bytes, magic: int | None = None, count: int | None = None) -> bytes:
    m, c = struct.unpack(">II", content[:8])
    return struct.pack(">II", m if magic is None else magic, c if count is None else count) + content[8:]


def _changed_label(content: bytes) -> bytes:
    b = bytearray(content)
    b[8] = (b[8] + 1) % 10
    return bytes(b)


@pytest.mark.parametrize("name,make,expect", [
    ("t10k-labels-idx1-ubyte", lambda c: _with_header(c, magic=1234), "wrong idx magic number 1234"),
    ("t10k-labels-idx1-ubyte", lambda c: _with_header(c, magic=2051), "magic of an idx images file"),
    ("t10k-images-idx3-ubyte", lambda c: c[: len(c) // 2], "truncated"),
    ("t10k-images-idx3-ubyte", lambda c: c[:10], "too short for an idx header"),
    ("t10k-labels-idx1-ubyte", lambda c: c + b"\0", "trailing data"),
    ("t10k-labels-idx1-ubyte", lambda c: _with_header(c, count=9999)[:-1], "declares 9999 labels, expected 10000"),
    ("t10k-labels-idx1-ubyte", _changed_label, "sha256 of the uncompressed content is"),
])
def test_corrupt_idx_files(tmp_path, name, make, expect):
    root = mnist_dir_with(tmp_path, {name: make(raw_bytes("mnist", name))})
    with pytest.raises(DataError) as ei:
        load_source("mnist", data_dir=root, download=False)
    msg = str(ei.value)
    assert expect in msg
    assert name in msg and str(root / "mnist" / name) in msg


def test_truncated_gzip_and_wrong_dataset(tmp_path):
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    for name in NAMES:
        (root / "mnist" / f"{name}.gz").symlink_to(DATA / "mnist" / f"{name}.gz")
    target = root / "mnist" / "t10k-images-idx3-ubyte.gz"
    target.unlink()
    target.write_bytes((DATA / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()[:100_000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz': corrupt gzip data"):
        load_source("mnist", data_dir=root, download=False)
    # A Fashion-MNIST file in the mnist/ folder is named as such.
    target.unlink()
    target.symlink_to(DATA / "fashion-mnist" / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="this is the Fashion-MNIST t10k-images-idx3-ubyte file, not the MNIST"):
        load_source("mnist", data_dir=root, download=False)


# --------------------------------------------------------------------------- download

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def http_root(tmp_path):
    """(folder, base URL) of a local HTTP server on 127.0.0.1 serving the folder."""
    root = tmp_path / "srv"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/files"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _serve_real(root: Path, ds: str = "mnist", skip=()) -> Path:
    (root / "files").mkdir(exist_ok=True)
    for name in NAMES:
        if name not in skip:
            shutil.copy(DATA / ds / f"{name}.gz", root / "files" / f"{name}.gz")
    return root / "files"


def _prefill_cache(cache: Path, skip=()) -> None:
    (cache / "mnist").mkdir(parents=True)
    for name in NAMES:
        if name not in skip:
            shutil.copy(DATA / "mnist" / f"{name}.gz", cache / "mnist" / f"{name}.gz")


def test_download_success_fills_cache(http_root, tmp_path, mnist):
    root, url = http_root
    _serve_real(root)
    cache = tmp_path / "cache"
    d = load_source("mnist", cache_dir=cache, base_urls={"mnist": url}, limit=100)
    files = sorted(p.name for p in (cache / "mnist").iterdir())
    assert files == sorted(f"{n}.gz" for n in NAMES)  # nothing else (no temp files)
    sums = canonical_sha("mnist")
    for name in NAMES:
        content = gzip.decompress((cache / "mnist" / f"{name}.gz").read_bytes())
        assert hashlib.sha256(content).hexdigest() == sums[name]
    np.testing.assert_array_equal(d.x_test, mnist.x_test)
    np.testing.assert_array_equal(d.x_train, mnist.x_train[:100])
    # The cache is used afterwards: no server needed.
    again = load_source("mnist", cache_dir=cache, base_urls={"mnist": "http://127.0.0.1:9/"}, download=False)
    np.testing.assert_array_equal(again.y_train, mnist.y_train)


def test_download_env_url_and_corrupted_bytes_leave_nothing(http_root, tmp_path, monkeypatch):
    root, url = http_root
    files = _serve_real(root, skip=("t10k-labels-idx1-ubyte",))
    # Valid gzip, valid idx structure, one label changed: only the sha256 can tell.
    (files / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_changed_label(raw_bytes("mnist", "t10k-labels-idx1-ubyte"))))
    cache = tmp_path / "cache"
    _prefill_cache(cache, skip=("t10k-labels-idx1-ubyte",))
    monkeypatch.setenv("CLNP_MNIST_URL", url + "/")
    monkeypatch.setenv("CLNP_CACHE_DIR", str(cache))
    with pytest.raises(DataError) as ei:
        load_source("mnist")
    msg = str(ei.value)
    assert f"{url}/t10k-labels-idx1-ubyte.gz" in msg and "sha256" in msg and "--data-dir" in msg
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(
        f"{n}.gz" for n in NAMES if n != "t10k-labels-idx1-ubyte")


def test_download_garbage_and_missing_file(http_root, tmp_path):
    root, url = http_root
    files = _serve_real(root, skip=("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    (files / "t10k-images-idx3-ubyte.gz").write_bytes(np.random.default_rng(0).bytes(50_000))
    cache = tmp_path / "cache"
    _prefill_cache(cache, skip=("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz from .*does not verify: .*wrong idx magic"):
        load_source("mnist", cache_dir=cache, base_urls={"mnist": url})
    assert not any(p.name.startswith("t10k") or p.name.startswith(".") for p in (cache / "mnist").iterdir())
    # A real .gz with bytes flipped in the middle: the gzip CRC / deflate stream fails.
    gz = bytearray((DATA / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    gz[len(gz) // 2: len(gz) // 2 + 64] = bytes(64)
    (files / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(gz))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz from .*does not verify: .*corrupt gzip data"):
        load_source("mnist", cache_dir=cache, base_urls={"mnist": url})
    assert not any(p.name.startswith("t10k") or p.name.startswith(".") for p in (cache / "mnist").iterdir())
    (files / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="HTTP 404"):
        load_source("mnist", cache_dir=cache, base_urls={"mnist": url})
    assert len(list((cache / "mnist").iterdir())) == 2


def test_download_unreachable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The port is closed now: connection refused.
    url = f"http://127.0.0.1:{port}/mnist/"
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as ei:
        load_source("mnist", cache_dir=cache, base_urls={"mnist": url})
    msg = str(ei.value)
    assert f"{url}train-images-idx3-ubyte.gz" in msg and "cannot connect" in msg
    assert "--data-dir" in msg and "CLNP_DATA_DIR" in msg
    assert list((cache / "mnist").iterdir()) == []
