"""The IDX file format (MNIST's): a strict parser, re-exported as
:func:`fgrad_jax.datasets.load_idx`."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

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
