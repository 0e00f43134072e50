"""The IDX file format (MNIST's): a strict parser and the directory loader, re-exported
as :func:`fgrad_jax.datasets.load_idx` and :func:`fgrad_jax.datasets.load_idx_dataset`."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

# IDX type codes (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def corrupt_file_error(path: Path | str, what: str) -> ValueError:
    return ValueError(
        f"{path}: not a valid IDX file: {what}. The file is probably corrupt or truncated "
        "(an interrupted download?). Delete it and download it again (for MNIST, delete it "
        "from the cache and call load_mnist() again)."
    )


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (the MNIST format), raw or gzip-compressed.

    The file is validated strictly: two zero bytes, a known type code, the number of
    dimensions, the big-endian dimension sizes, and a payload of exactly
    ``prod(dims) * itemsize`` bytes (no more, no less). Gzip is detected from the content,
    not from the file name.

    Args:
        path: Path of the file.

    Returns:
        The array in native byte order, with the file's dtype and shape.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is corrupt, truncated, or not an IDX file; the message
            names the file, says what is wrong and how to fix it.

    Example:
        >>> import pathlib, tempfile
        >>> from fgrad_jax import datasets
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = pathlib.Path(tmp.name) / "labels-idx1-ubyte"
        >>> header = bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big")  # uint8, 1 dim of size 3
        >>> _ = path.write_bytes(header + bytes([7, 2, 1]))
        >>> datasets.load_idx(path)
        array([7, 2, 1], dtype=uint8)
        >>> tmp.cleanup()
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise corrupt_file_error(
                path, f"the gzip stream is damaged or truncated ({e})"
            ) from None
    if len(raw) < 4:
        raise corrupt_file_error(
            path, f"only {len(raw)} bytes, shorter than the 4-byte magic number"
        )
    if raw[0] != 0 or raw[1] != 0:
        raise corrupt_file_error(
            path, f"bad magic number {raw[:4].hex()} (the first two bytes must be 00 00)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise corrupt_file_error(path, f"unknown data type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise corrupt_file_error(path, "zero dimensions in the magic number")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise corrupt_file_error(
            path, f"header truncated: {ndim} dimensions need {header} bytes, file has {len(raw)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise corrupt_file_error(
            path,
            f"{kind}: shape {dims} of {dtype.newbyteorder('=').name} needs {expected} bytes "
            f"after decompression, found {len(raw)}",
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


#: The four IDX files of an MNIST-style data set, by role.
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


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

    Example:
        A tiny data set of zero images, written as the four gzip-compressed files:

        >>> import gzip, math, pathlib, tempfile
        >>> from fgrad_jax import datasets
        >>> def idx(shape):  # an all-zero uint8 IDX file
        ...     dims = b"".join(n.to_bytes(4, "big") for n in shape)
        ...     return bytes([0, 0, 0x08, len(shape)]) + dims + bytes(math.prod(shape))
        >>> shapes = {"train_images": (5, 2, 2), "train_labels": (5,),
        ...           "test_images": (3, 2, 2), "test_labels": (3,)}
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = pathlib.Path(tmp.name)
        >>> for role, file_name in datasets.MNIST_FILES.items():
        ...     _ = (root / file_name).write_bytes(gzip.compress(idx(shapes[role])))
        >>> ds = datasets.load_idx_dataset(tmp.name, name="tiny", num_classes=10)
        >>> ds.train_images.shape, ds.train_images.dtype.name, ds.test_labels.dtype.name, ds.name
        ((5, 2, 2), 'float32', 'int32', 'tiny')
        >>> tmp.cleanup()
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


# Public as fgrad_jax.datasets.X: tracebacks and the API reference name them there.
for _public in (DataUnavailableError, Dataset, load_idx, load_idx_dataset):
    _public.__module__ = "fgrad_jax.datasets"
