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
from typing import NamedTuple

import numpy as np

from fgrad_jax._idx import load_idx

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
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

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


class DataUnavailableError(FileNotFoundError):
    """A data set is neither on disk nor downloadable; the message says how to get it."""


class Dataset(NamedTuple):
    """A classification data set with a train and a test split.

    Attributes:
        train_images: ``float32`` array in ``[0, 1]``, shape ``(N, H, W)`` or ``(N, D)``.
        train_labels: ``int32`` array of shape ``(N,)``.
        test_images: ``float32`` array in ``[0, 1]``, shape ``(M, H, W)`` or ``(M, D)``.
        test_labels: ``int32`` array of shape ``(M,)``.
        name: A short name, e.g. ``"mnist"``.
        num_classes: Number of classes (labels are ``0 .. num_classes - 1``).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    name: str
    num_classes: int


def _channels_last(ds: Dataset, channel_axis: bool) -> Dataset:
    """Adds a trailing channel axis, ``(N, H, W) -> (N, H, W, 1)``, as convolutions expect."""
    if not channel_axis:
        return ds
    return ds._replace(
        train_images=ds.train_images[..., None], test_images=ds.test_images[..., None]
    )


def cache_dir() -> Path:
    """Returns the data cache directory: ``$FGRAD_JAX_DATA`` or ``~/.cache/fgrad_jax``.

    Returns:
        The directory (not created).
    """
    env = os.environ.get("FGRAD_JAX_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fgrad_jax"


def _find_file(data_dir: Path, gz_name: str) -> Path | None:
    """Finds ``gz_name`` or its common uncompressed spellings in ``data_dir``."""
    stem = gz_name[: -len(".gz")]
    # LeCun's unpacked files are sometimes called e.g. "train-images.idx3-ubyte".
    dotted = stem.replace("-idx", ".idx")
    for name in (gz_name, stem, dotted, dotted + ".gz"):
        candidate = data_dir / name
        if candidate.is_file():
            return candidate
    return None


def _to_split(images: np.ndarray, labels: np.ndarray, path_i: Path, path_l: Path):
    if images.ndim < 2:
        raise ValueError(
            f"{path_i}: expected images with >= 2 dimensions, got shape {images.shape}."
        )
    if labels.ndim != 1:
        raise ValueError(f"{path_l}: expected a 1-D label array, got shape {labels.shape}.")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path_i} has {images.shape[0]} images but {path_l} has {labels.shape[0]} labels; "
            "the files do not belong together (re-download them)."
        )
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / np.float32(255.0)
    else:
        x = images.astype(np.float32)
    return x, labels.astype(np.int32)


def load_idx_dataset(
    data_dir: str | os.PathLike,
    name: str | None = None,
    num_classes: int | None = None,
    *,
    channel_axis: bool = False,
) -> Dataset:
    """Loads the four MNIST-style IDX files from a directory.

    The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally ``.gz``
    (the dotted spelling ``train-images.idx3-ubyte`` is accepted too). ``uint8`` images are
    scaled to ``[0, 1]``.

    Args:
        data_dir: The directory.
        name: Name stored in the result (default: the directory's name).
        num_classes: Number of classes (default: ``max(label) + 1``).
        channel_axis: Add a trailing channel axis to the images (``(N, H, W, 1)``, the
            layout of ``flax`` convolutions).

    Returns:
        A :class:`Dataset`.

    Raises:
        DataUnavailableError: If a file is missing (the message lists what was looked for).
        ValueError: If a file is corrupt (see :func:`load_idx`).
    """
    data_dir = Path(data_dir).expanduser()
    paths: dict[str, Path] = {}
    missing: list[str] = []
    for role, gz_name in MNIST_FILES.items():
        found = _find_file(data_dir, gz_name)
        if found is None:
            missing.append(gz_name)
        else:
            paths[role] = found
    if missing:
        raise DataUnavailableError(
            f"{data_dir}: missing IDX file(s) {', '.join(missing)} (with or without .gz). "
            "A data directory must hold the four files train-images-idx3-ubyte, "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte."
        )
    arrays = {role: load_idx(p) for role, p in paths.items()}
    xtr, ytr = _to_split(
        arrays["train_images"], arrays["train_labels"], paths["train_images"], paths["train_labels"]
    )
    xte, yte = _to_split(
        arrays["test_images"], arrays["test_labels"], paths["test_images"], paths["test_labels"]
    )
    if num_classes is None:
        num_classes = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    ds = Dataset(xtr, ytr, xte, yte, name or data_dir.name, int(num_classes))
    return _channels_last(ds, channel_axis)


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
