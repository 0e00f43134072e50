"""Small, dependency-free loaders for the data sets used by the experiments.

Everything here returns NumPy arrays: images as ``float32`` in ``[0, 1]`` and labels as
``int32``, in a :class:`Dataset` named tuple with a train and a test split.

* :func:`load_idx` parses one IDX file (the MNIST file format, raw or gzip-compressed)
  and validates it strictly (magic number, dtype code, dimensions, exact byte length).
* :func:`load_idx_dataset` reads any directory holding the four MNIST-style IDX files.
* :func:`load_mnist` downloads MNIST from the canonical mirrors into a cache
  (``$FGRAD_JAX_DATA``, default ``~/.cache/fgrad_jax``) and verifies SHA-256 digests.
* :func:`load_fashion_mnist` reads Fashion-MNIST from Debian's ``dataset-fashion-mnist``
  package (``/usr/share/datasets/fashion-mnist``) or any directory.
* :func:`load_digits` returns scikit-learn's bundled 8x8 digits (offline, real data) with a
  fixed, deterministic train/test split.

Example:
    >>> from fgrad_jax import datasets
    >>> ds = datasets.load_digits()
    >>> ds.train_images.shape[1:], ds.train_images.dtype.name, ds.num_classes
    ((8, 8), 'float32', 10)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fgrad_jax import _idx
from fgrad_jax._idx import (
    Dataset,
    DataUnavailableError,
    _channels_last,
    _find_file,
    load_idx,
    load_idx_dataset,
)

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "MNIST_SHA256",
    "DataUnavailableError",
    "Dataset",
    "cache_dir",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_idx_dataset",
    "load_mnist",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the four IDX files.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: The four IDX files of an MNIST-style data set, by role.
MNIST_FILES: dict[str, str] = _idx.MNIST_FILES

#: Mirrors tried in order (the files' original home, yann.lecun.com, now often refuses
#: downloads; these two are the mirrors torchvision and TensorFlow use).
MNIST_MIRRORS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]

#: SHA-256 of the four gzip files as published (sizes 9,912,422 / 28,881 / 1,648,877 /
#: 4,542 bytes). Not computed here (no network when this was written): taken from public
#: code that pins them and agrees on all four, e.g. torch.rb's MNIST loader
#: (ankane/torch-rb, ``lib/torch/vision/datasets/mnist.rb``) and several independent
#: download scripts on GitHub. They match the md5 sums torchvision records for the same
#: files (f68b3c2d..., d53e105e..., 9fb629c4..., ec29112d...) in that all of these
#: projects download the identical archives from the same mirrors.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

_DOWNLOAD_TIMEOUT_S = 30.0


def cache_dir() -> Path:
    """Returns the data cache directory: ``$FGRAD_JAX_DATA`` or ``~/.cache/fgrad_jax``.

    Returns:
        The directory (not created).
    """
    env = os.environ.get("FGRAD_JAX_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fgrad_jax"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checksum_error(path: Path, expected: str, got: str) -> ValueError:
    return ValueError(
        f"{path}: SHA-256 mismatch: expected {expected}, got {got}. The file is corrupt, "
        f"truncated or not the published MNIST file. Delete it ({path}) and run again to "
        "download it afresh."
    )


def _download(name: str, dest: Path, mirrors: Sequence[str]) -> None:
    """Downloads ``name`` into ``dest``, trying each mirror; verifies its SHA-256."""
    expected = MNIST_SHA256[name]
    errors = []
    dest.parent.mkdir(parents=True, exist_ok=True)
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        fd, tmp_name = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp,
            ):
                shutil.copyfileobj(resp, out)
            got = _sha256(tmp)
            if got != expected:
                errors.append(f"{url}: SHA-256 mismatch (expected {expected}, got {got})")
                continue
            os.replace(tmp, dest)
            return
        except (urllib.error.URLError, OSError, ValueError) as e:
            errors.append(f"{url}: {e}")
        finally:
            if tmp.exists():
                tmp.unlink()
    if errors and all("SHA-256 mismatch" in e for e in errors):
        raise ValueError(
            f"Downloaded {name} but its SHA-256 matches no published digest:\n  "
            + "\n  ".join(errors)
            + "\nA mirror may serve a different or damaged file; nothing was written to "
            f"{dest.parent}."
        )
    raise DataUnavailableError(
        f"Could not download {name} (offline?):\n  "
        + "\n  ".join(errors)
        + "\n"
        + _how_to_get_mnist(dest.parent, mirrors)
    )


def _how_to_get_mnist(data_dir: Path, mirrors: Sequence[str]) -> str:
    urls = "\n".join(f"    {mirrors[0] if mirrors else ''}{n}" for n in MNIST_FILES.values())
    return (
        "To get MNIST, on a machine with internet access download the four files\n"
        f"{urls}\n"
        f"(or the same names from {', '.join(mirrors[1:]) or 'another mirror'}) and either put "
        f"them in {data_dir}, or point to their directory with data_dir=... (the experiment "
        "scripts: --data-dir DIR), or set the environment variable FGRAD_JAX_DATA to a cache "
        "directory whose 'mnist' subdirectory holds them."
    )


def load_mnist(
    data_dir: str | os.PathLike | None = None, download: bool = True, *, channel_axis: bool = False
) -> Dataset:
    """Loads MNIST (60,000 train / 10,000 test images of 28x28), downloading it if needed.

    Files are looked up in ``data_dir`` (default: ``cache_dir() / "mnist"``, i.e.
    ``$FGRAD_JAX_DATA/mnist`` or ``~/.cache/fgrad_jax/mnist``). Missing ones are
    downloaded from :data:`MNIST_MIRRORS` when ``download`` is true. Every gzip file with
    its published name is checked against :data:`MNIST_SHA256`, on download and on every
    load; uncompressed files you placed there yourself are validated by the IDX parser.

    Args:
        data_dir: Directory of the four IDX files (created when downloading).
        download: Whether to download missing files.
        channel_axis: Return images of shape ``(N, 28, 28, 1)`` (for convolutions).

    Returns:
        A :class:`Dataset` with images ``(N, 28, 28)`` in ``[0, 1]``.

    Raises:
        DataUnavailableError: If files are missing and cannot be downloaded; the message
            says where to get them and where to put them.
        ValueError: On a checksum mismatch or a corrupt file.

    Example:
        The first call downloads about 11 MB, so it is not run here (it needs the internet):

        >>> from fgrad_jax import datasets
        >>> ds = datasets.load_mnist(channel_axis=True)  # doctest: +SKIP
        >>> ds.train_images.shape, ds.test_images.shape  # doctest: +SKIP
        ((60000, 28, 28, 1), (10000, 28, 28, 1))

        Without the files and without downloading, the error says how to get them:

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as empty:
        ...     datasets.load_mnist(empty, download=False)
        Traceback (most recent call last):
        ...
        fgrad_jax.datasets.DataUnavailableError: MNIST file ... not found in ...
    """
    data_dir = Path(data_dir).expanduser() if data_dir is not None else cache_dir() / "mnist"
    mirrors = list(MNIST_MIRRORS)
    for name in MNIST_FILES.values():
        found = _find_file(data_dir, name)
        if found is None:
            if not download:
                raise DataUnavailableError(
                    f"MNIST file {name} not found in {data_dir} and download=False.\n"
                    + _how_to_get_mnist(data_dir, mirrors)
                )
            _download(name, data_dir / name, mirrors)
            continue
        if found.name in MNIST_SHA256:
            got = _sha256(found)
            if got != MNIST_SHA256[found.name]:
                raise _checksum_error(found, MNIST_SHA256[found.name], got)
    return load_idx_dataset(data_dir, name="mnist", num_classes=10, channel_axis=channel_axis)


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None, *, channel_axis: bool = False
) -> Dataset:
    """Loads Fashion-MNIST (60,000 / 10,000 images of 28x28, 10 classes).

    By default it reads the files installed by Debian's ``dataset-fashion-mnist`` package
    in :data:`DEFAULT_FASHION_MNIST_DIR`.

    Args:
        data_dir: Directory of the four IDX files (default: the Debian package's).
        channel_axis: Return images of shape ``(N, 28, 28, 1)`` (for convolutions).

    Returns:
        A :class:`Dataset` with images ``(N, 28, 28)`` in ``[0, 1]``.

    Raises:
        DataUnavailableError: If the files are missing (the message says to run
            ``apt-get install dataset-fashion-mnist`` or pass ``data_dir``).

    Example:
        With Debian's ``dataset-fashion-mnist`` package installed (not run here: the
        example must pass where the package is missing):

        >>> from fgrad_jax import datasets
        >>> ds = datasets.load_fashion_mnist()  # doctest: +SKIP
        >>> ds.train_images.shape, ds.test_images.shape, ds.num_classes  # doctest: +SKIP
        ((60000, 28, 28), (10000, 28, 28), 10)

        Without the files, the error says how to get them:

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as empty:
        ...     datasets.load_fashion_mnist(empty)
        Traceback (most recent call last):
        ...
        fgrad_jax.datasets.DataUnavailableError: Fashion-MNIST not found: ...
    """
    path = Path(data_dir).expanduser() if data_dir is not None else Path(DEFAULT_FASHION_MNIST_DIR)
    try:
        return load_idx_dataset(
            path, name="fashion_mnist", num_classes=10, channel_axis=channel_axis
        )
    except DataUnavailableError as e:
        raise DataUnavailableError(
            f"Fashion-MNIST not found: {e}\nInstall it with `apt-get install "
            f"dataset-fashion-mnist` (Debian/Ubuntu; files go to {DEFAULT_FASHION_MNIST_DIR}), "
            "or pass data_dir= a directory holding the four IDX files."
        ) from None


def load_digits(test_size: int = 360, seed: int = 0, *, channel_axis: bool = False) -> Dataset:
    """Loads scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline).

    Pixel values (0..16) are scaled to ``[0, 1]``. The split is stratified and fixed by
    ``seed``, so the same arguments always give the same arrays.

    Args:
        test_size: Number of test images (the default leaves 1,437 for training).
        seed: Seed of the split.
        channel_axis: Return images of shape ``(N, 8, 8, 1)`` (for convolutions).

    Returns:
        A :class:`Dataset` with images ``(N, 8, 8)``.

    Raises:
        ImportError: If scikit-learn is not installed (``pip install scikit-learn``).

    Example:
        >>> from fgrad_jax import datasets
        >>> ds = datasets.load_digits(channel_axis=True)
        >>> ds.train_images.shape, ds.test_images.shape, ds.train_labels.dtype.name
        ((1437, 8, 8, 1), (360, 8, 8, 1), 'int32')
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits needs scikit-learn: pip install scikit-learn "
            "(or pip install 'fgrad-jax[experiments]')."
        ) from e
    bunch = _sk_load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(
        images, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    ds = Dataset(np.ascontiguousarray(xtr), ytr, np.ascontiguousarray(xte), yte, "digits", 10)
    return _channels_last(ds, channel_axis)
