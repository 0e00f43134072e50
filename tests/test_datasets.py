"""Tests of fgrad_jax.datasets: the IDX parser on generated files, MNIST download
verification with local file:// mirrors, and the real Fashion-MNIST files from Debian."""

import gzip
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fgrad_jax import datasets


def write_idx(path, array, compress=None, code=None):
    """Writes ``array`` as an IDX file (gzip if the name ends in .gz)."""
    array = np.asarray(array)
    codes = {
        np.uint8: 0x08,
        np.int8: 0x09,
        np.int16: 0x0B,
        np.int32: 0x0C,
        np.float32: 0x0D,
        np.float64: 0x0E,
    }
    if code is None:
        code = codes[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    if compress if compress is not None else path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_idx_dir(directory, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 4, 3), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 4, 3), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for role, name in datasets.MNIST_FILES.items():
        write_idx(directory / (name if gz else name[:-3]), arrays[role])
    return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    a = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype == np.uint8:
        a = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / f"x-idx3{suffix}", a)
    b = datasets.load_idx(path)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    np.testing.assert_array_equal(a, b)


def test_gzip_detected_by_content(tmp_path):
    a = np.arange(6, dtype=np.uint8)
    path = write_idx(tmp_path / "no-suffix", a, compress=True)
    np.testing.assert_array_equal(datasets.load_idx(path), a)


def test_truncated_file(tmp_path):
    path = write_idx(tmp_path / "t", np.zeros((10, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"t: not a valid IDX file: truncated.*Delete it"):
        datasets.load_idx(path)


def test_trailing_bytes(tmp_path):
    path = write_idx(tmp_path / "t", np.zeros((10, 4), np.uint8))
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        datasets.load_idx(path)


def test_truncated_gzip(tmp_path):
    path = write_idx(tmp_path / "t.gz", np.arange(1000, dtype=np.uint8).reshape(10, 100))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"t\.gz.*gzip stream is damaged or truncated"):
        datasets.load_idx(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "h"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 1]))
    with pytest.raises(ValueError, match="header truncated"):
        datasets.load_idx(path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "m"
    path.write_bytes(b"PK\x03\x04" + bytes(20))
    with pytest.raises(ValueError, match=r"m: not a valid IDX file: bad magic number 504b0304"):
        datasets.load_idx(path)


def test_unknown_dtype_code(tmp_path):
    path = write_idx(tmp_path / "c", np.zeros(3, np.uint8), code=0x07)
    with pytest.raises(ValueError, match="unknown data type code 0x07"):
        datasets.load_idx(path)


def test_load_idx_dataset_scales_and_casts(tmp_path):
    arrays = make_idx_dir(tmp_path, gz=False)
    ds = datasets.load_idx_dataset(tmp_path, num_classes=10)
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    assert ds.train_images.shape == (12, 4, 3) and ds.test_images.shape == (5, 4, 3)
    np.testing.assert_allclose(ds.train_images * 255, arrays["train_images"], atol=1e-4)
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
    assert ds.train_images.min() >= 0.0 and ds.train_images.max() <= 1.0


def test_load_idx_dataset_missing_and_mismatched(tmp_path):
    with pytest.raises(datasets.DataUnavailableError, match="missing IDX file"):
        datasets.load_idx_dataset(tmp_path)
    make_idx_dir(tmp_path)
    write_idx(tmp_path / datasets.MNIST_FILES["test_labels"], np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="do not belong together"):
        datasets.load_idx_dataset(tmp_path)


@pytest.fixture
def fake_mirror(tmp_path, monkeypatch):
    """A file:// mirror holding small fake MNIST files, with their digests patched in."""
    src = tmp_path / "mirror"
    make_idx_dir(src)
    digests = {
        name: hashlib.sha256((src / name).read_bytes()).hexdigest()
        for name in datasets.MNIST_FILES.values()
    }
    monkeypatch.setattr(datasets, "MNIST_SHA256", digests)
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", [src.as_uri() + "/"])
    return src


def test_mnist_download_into_cache(tmp_path, fake_mirror, monkeypatch):
    monkeypatch.setenv("FGRAD_JAX_DATA", str(tmp_path / "cache"))
    ds = datasets.load_mnist()
    assert ds.name == "mnist" and ds.train_images.shape == (12, 4, 3)
    for name in datasets.MNIST_FILES.values():
        assert (tmp_path / "cache" / "mnist" / name).is_file()
    assert not list((tmp_path / "cache" / "mnist").glob("*.part"))
    # A second load reads the cache (the mirror is gone).
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", [(tmp_path / "nowhere").as_uri() + "/"])
    ds2 = datasets.load_mnist()
    np.testing.assert_array_equal(ds.train_labels, ds2.train_labels)


def test_mnist_checksum_mismatch_on_download(tmp_path, fake_mirror, monkeypatch):
    bad = dict(datasets.MNIST_SHA256)
    bad["train-labels-idx1-ubyte.gz"] = "0" * 64
    monkeypatch.setattr(datasets, "MNIST_SHA256", bad)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.*SHA-256 matches no"):
        datasets.load_mnist(out)
    assert not (out / "train-labels-idx1-ubyte.gz").exists()
    assert not list(out.glob("*.part"))


def test_mnist_checksum_mismatch_in_cache(tmp_path, fake_mirror, monkeypatch):
    out = tmp_path / "out"
    datasets.load_mnist(out)
    bad = dict(datasets.MNIST_SHA256)
    bad["t10k-images-idx3-ubyte.gz"] = "f" * 64
    monkeypatch.setattr(datasets, "MNIST_SHA256", bad)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: SHA-256 mismatch.*Delete it"):
        datasets.load_mnist(out)


def test_mnist_offline_message(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", [(tmp_path / "offline").as_uri() + "/"])
    with pytest.raises(datasets.DataUnavailableError) as info:
        datasets.load_mnist(tmp_path / "empty")
    msg = str(info.value)
    assert "Could not download" in msg and "--data-dir" in msg and "FGRAD_JAX_DATA" in msg
    assert "train-images-idx3-ubyte.gz" in msg
    with pytest.raises(datasets.DataUnavailableError, match="download=False"):
        datasets.load_mnist(tmp_path / "empty", download=False)


def test_published_mnist_digests_are_well_formed():
    assert set(datasets.MNIST_SHA256) == set(datasets.MNIST_FILES.values())
    for digest in datasets.MNIST_SHA256.values():
        assert len(digest) == 64 and int(digest, 16) >= 0
    assert all(m.startswith("https://") for m in datasets.MNIST_MIRRORS)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FGRAD_JAX_DATA", str(tmp_path))
    assert datasets.cache_dir() == tmp_path
    monkeypatch.delenv("FGRAD_JAX_DATA")
    assert datasets.cache_dir() == Path.home() / ".cache" / "fgrad_jax"


def test_fashion_mnist_missing_message(tmp_path):
    with pytest.raises(
        datasets.DataUnavailableError, match="apt-get install dataset-fashion-mnist"
    ):
        datasets.load_fashion_mnist(tmp_path)


@pytest.mark.usefixtures("fashion_mnist")
def test_real_fashion_mnist():
    # CI installs Debian's dataset-fashion-mnist (.ci/run) and sets CI: mandatory there.
    ds = datasets.load_fashion_mnist()
    assert ds.train_images.shape == (60000, 28, 28) and ds.test_images.shape == (10000, 28, 28)
    assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
    assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
    assert set(np.unique(ds.train_labels)) == set(range(10))
    assert set(np.unique(ds.test_labels)) == set(range(10))
    assert ds.train_images.min() == 0.0 and ds.train_images.max() == 1.0
    # Fashion-MNIST is balanced: 6,000 train and 1,000 test images per class.
    assert (np.bincount(ds.train_labels) == 6000).all()
    assert (np.bincount(ds.test_labels) == 1000).all()


def test_digits_deterministic():
    a, b = datasets.load_digits(), datasets.load_digits()
    assert a.train_images.shape == (1437, 8, 8) and a.test_images.shape == (360, 8, 8)
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    np.testing.assert_array_equal(a.test_images, b.test_images)
    assert a.train_images.dtype == np.float32 and a.train_labels.dtype == np.int32
    assert a.train_images.min() >= 0.0 and a.train_images.max() <= 1.0
    assert set(np.unique(a.test_labels)) == set(range(10))


@pytest.mark.parametrize("ci", [None, "true"])
def test_missing_fashion_mnist_skips_outside_ci_and_fails_in_ci(monkeypatch, tmp_path, ci):
    from conftest import require_fashion_mnist

    monkeypatch.setattr(datasets, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
        expected = pytest.skip.Exception
    else:
        monkeypatch.setenv("CI", ci)
        expected = pytest.fail.Exception
    with pytest.raises(expected, match="apt-get install dataset-fashion-mnist"):
        require_fashion_mnist()


def test_channel_axis(tmp_path):
    make_idx_dir(tmp_path)
    ds = datasets.load_idx_dataset(tmp_path, channel_axis=True)
    plain = datasets.load_idx_dataset(tmp_path)
    assert ds.train_images.shape == (12, 4, 3, 1) and ds.test_images.shape == (5, 4, 3, 1)
    np.testing.assert_array_equal(ds.train_images[..., 0], plain.train_images)
    digits = datasets.load_digits(channel_axis=True)
    assert digits.train_images.shape == (1437, 8, 8, 1)


def test_datasets_is_an_attribute_of_the_package():
    """``import fgrad_jax`` alone gives ``fgrad_jax.datasets`` (fresh interpreter)."""
    code = "import fgrad_jax; print(fgrad_jax.datasets.DEFAULT_FASHION_MNIST_DIR)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == datasets.DEFAULT_FASHION_MNIST_DIR
