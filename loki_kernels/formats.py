"""KVA attribution files: HDF5 with one dataset ``"dataset"`` of shape ``[num_samples, num_layers, hidden_size]``.

The layout is the original LoKI one (``src/loki/utils/hdf5_manager.py``), so files written by either side
read on the other:

- dataset ``"dataset"``, shape ``(N, L, H)``, ``maxshape=(None, L, H)``, gzip level 4; one row per
  sample holds the signed attribution of every ``down_proj`` output row of every layer;
- metadata as attributes of that dataset named ``metadata_<key>`` (``model_name``, ``ig_steps``, ...,
  ``created_at``; ``num_samples_processed`` and ``completed_at`` once the run is complete).

Differences from the original writer:

- float32 by default (float16 on request); the original's HEAD cast everything to float16, where tiny
  attributions underflow and become ties. Files of the original's first commit are float32 too. Both read.
- fill value NaN (never stored), so a row a damaged chunk index has lost reads as NaN, not as zeros.
- chunks of one sample, ``(1, L, H)``, instead of h5py's automatic chunking (reads of whole samples,
  which is what selection does, then touch nothing else).
- a batch is checked (shape, NaN/inf, float16 overflow) before anything is written, and is written with
  one resize and one assignment followed by a flush, so the row count is always the number of complete
  samples; NaN/inf are refused instead of stored.
- an existing file is never silently truncated or appended to: ``resume=True`` to continue it,
  ``overwrite=True`` to replace it. Concatenating files writes a new one (atomically) instead of appending to one.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Union

import h5py
import numpy as np

__all__ = [
    "DATASET",
    "METADATA_PREFIX",
    "STORAGE_DTYPES",
    "AttributionWriter",
    "open_attributions",
    "read_attributions",
    "read_metadata",
    "concat_attribution_files",
]

DATASET = "dataset"
METADATA_PREFIX = "metadata_"
COMPRESSION, COMPRESSION_LEVEL = "gzip", 4
# What a row whose chunk cannot be found reads as (HDF5 returns the fill value, silently, when a damaged chunk
# index loses a chunk): NaN, which is never stored, so reading the file back tells such a row from a sample.
FILL_VALUE = np.nan
_STORAGE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
STORAGE_DTYPES = tuple(_STORAGE_DTYPES)  # what attributions may be stored as

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------- reading
@contextmanager
def open_attributions(path: PathLike, *, dataset: str = DATASET) -> Iterator[h5py.Dataset]:
    """Open an attribution file read-only and yield its validated ``[N, L, H]`` h5py Dataset.

    Nothing is loaded: slice the dataset (``dset[a:b]``) to read samples. The file is closed when the
    ``with`` block ends. Raises ``ValueError`` (naming the file) when the file is missing, not HDF5 or damaged,
    when ``dataset`` is missing (listing the datasets the file has), or when it is not 3-D and numeric.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ValueError(f"attribution file {name!r} does not exist")
    try:
        file = _open_h5(name, "r")
    except OSError as e:
        raise ValueError(f"attribution file {name!r} is not a readable HDF5 file: {e}") from None
    with file:
        try:
            dset = _checked_dataset(file, dataset, name)
        except (OSError, RuntimeError, KeyError) as e:  # h5py: damaged metadata past the superblock
            raise ValueError(f"attribution file {name!r} is damaged: cannot read its dataset {dataset!r} "
                             f"({str(e).strip(chr(39))})") from None
        yield dset


def read_attributions(
    path: PathLike, *, dataset: str = DATASET, start: int | None = None, stop: int | None = None
) -> np.ndarray:
    """Load samples ``start:stop`` (default: all) of an attribution file into memory, in the stored dtype.

    For files larger than memory use :func:`open_attributions` (or pass the path to
    :func:`loki_kernels.selection.select_target_pos`, which streams).
    """
    with open_attributions(path, dataset=dataset) as dset:
        return dset[start:stop]


def read_metadata(path: PathLike, *, dataset: str = DATASET) -> dict[str, Any]:
    """The ``metadata_<key>`` attributes of the dataset as ``{key: value}`` (prefix stripped).

    Values come back as Python scalars; strings holding a JSON list or object (how lists and dicts are
    stored) are decoded. ``None`` was stored as the string ``"None"`` (as the original did) and stays one.
    """
    with open_attributions(path, dataset=dataset) as dset:
        try:
            return {
                key[len(METADATA_PREFIX):]: _decode_attr(value)
                for key, value in dset.attrs.items()
                if key.startswith(METADATA_PREFIX)
            }
        except (OSError, RuntimeError, KeyError, TypeError) as e:  # h5py on a damaged object header
            raise ValueError(f"attribution file {os.fspath(path)!r} is damaged: cannot read its metadata ({e})"
                             ) from None


def _open_h5(name: PathLike, mode: str) -> h5py.File:
    """``h5py.File(name, mode)``; a file another process holds open (HDF5's own lock) is a ``ValueError``."""
    try:
        return h5py.File(name, mode)
    except OSError as e:
        if "unable to lock file" in str(e):
            raise ValueError(f"attribution file {os.fspath(name)!r} is in use by another process (HDF5 holds a "
                             f"lock on it); wait for it to finish") from None
        raise


def _checked_dataset(file: h5py.File, dataset: str, name: str) -> h5py.Dataset:
    obj = file.get(dataset)
    if not isinstance(obj, h5py.Dataset):
        found: list[str] = []
        file.visititems(lambda key, item: found.append(key) if isinstance(item, h5py.Dataset) else None)
        listing = ", ".join(repr(k) for k in found) if found else "none"
        raise ValueError(f"attribution file {name!r} has no dataset {dataset!r} (its datasets: {listing})")
    if obj.ndim != 3:
        raise ValueError(
            f"dataset {dataset!r} in {name!r} has shape {obj.shape}; expected 3-D [samples, layers, hidden_size]"
        )
    if obj.dtype.kind not in "fiu":
        raise ValueError(f"dataset {dataset!r} in {name!r} has dtype {obj.dtype}; expected a real numeric type")
    return obj


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


# ---------------------------------------------------------------------------------------------- writing
class AttributionWriter:
    """Append KVA attributions to an HDF5 file, one sample per row; use as a context manager.

    ``with AttributionWriter(path, L, H, metadata={...}) as w: w.append(batch)``

    - A new file gets an empty dataset ``(0, L, H)`` (``maxshape=(None, L, H)``, chunks ``(1, L, H)``,
      gzip 4) of ``dtype`` (``"float32"``, default, or ``"float16"``) and the metadata as ``metadata_<key>``
      attributes; ``created_at`` (ISO time) is added unless given. Values may be str, int, float, bool,
      None (stored as ``"None"``, like the original), paths (stored as str), or lists/dicts (stored as JSON).
    - An existing file raises ``FileExistsError``, unless ``resume=True`` (reopen it, check that L, H and
      dtype match, and append after its rows; metadata already stored is kept, new keys are added) or
      ``overwrite=True`` (replace it). ``resume=True`` on a missing file creates it.
    - :meth:`close` (called on leaving the ``with`` block) stores ``num_samples_processed`` and, unless the
      block ended with an exception, ``completed_at``.
    """

    def __init__(
        self,
        path: PathLike,
        num_layers: int,
        hidden_size: int,
        *,
        dtype: Any = "float32",
        metadata: dict[str, Any] | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.num_layers, self.hidden_size = _positive(num_layers, "num_layers"), _positive(hidden_size, "hidden_size")
        self.dtype = _storage_dtype(dtype)
        attrs = _metadata_attrs(metadata or {})
        if resume and overwrite:
            raise ValueError("AttributionWriter: pass resume=True or overwrite=True, not both")
        if self.path.exists() and resume:
            self._file = self._reopen(attrs)
        elif self.path.exists() and not overwrite:
            raise FileExistsError(
                f"attribution file {os.fspath(self.path)!r} already exists; pass resume=True to continue it "
                f"or overwrite=True to replace it"
            )
        else:
            self._file = self._create(attrs)
        self._dset = self._file[DATASET]

    # -- opening
    def _create(self, attrs: dict[str, Any]) -> h5py.File:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        shape = (self.num_layers, self.hidden_size)
        if self.path.exists():  # HDF5 truncates before it locks: take the lock first, so a file in use survives
            try:
                _open_h5(self.path, "r+").close()
            except OSError:
                pass  # not an HDF5 file: replaced below
        file = _open_h5(self.path, "w")
        try:
            dset = file.create_dataset(
                DATASET, shape=(0, *shape), maxshape=(None, *shape), chunks=(1, *shape), dtype=self.dtype,
                compression=COMPRESSION, compression_opts=COMPRESSION_LEVEL, fillvalue=FILL_VALUE,
            )
            attrs.setdefault(METADATA_PREFIX + "created_at", datetime.now().isoformat())
            dset.attrs.update(attrs)
            file.flush()
        except BaseException:
            file.close()
            raise
        return file

    def _reopen(self, attrs: dict[str, Any]) -> h5py.File:
        name = os.fspath(self.path)
        try:
            file = _open_h5(name, "r+")
        except OSError as e:
            raise ValueError(f"cannot resume {name!r}: not a writable HDF5 file ({e})") from None
        try:
            dset = _checked_dataset(file, DATASET, name)
            expected = (self.num_layers, self.hidden_size)
            if dset.shape[1:] != expected:
                raise ValueError(
                    f"cannot resume {name!r}: it holds [samples, layers, hidden] = {dset.shape}, but this run "
                    f"writes {self.num_layers} layers x {self.hidden_size} hidden"
                )
            if dset.dtype != self.dtype:
                raise ValueError(
                    f"cannot resume {name!r}: it is stored as {dset.dtype}, but dtype={self.dtype} was asked for"
                )
            if dset.maxshape[0] is not None:
                raise ValueError(f"cannot resume {name!r}: its dataset is not resizable (maxshape {dset.maxshape})")
            for key, value in attrs.items():
                if key not in dset.attrs:
                    dset.attrs[key] = value
            dset.attrs.pop(METADATA_PREFIX + "completed_at", None)  # being extended: no longer complete
            file.flush()
        except BaseException:
            file.close()
            raise
        return file

    # -- writing
    @property
    def num_samples(self) -> int:
        """Rows (complete samples) in the file, including those there before a resume."""
        return int(self._dset.shape[0])

    def append(self, batch) -> None:
        """Append samples: ``[B, L, H]`` (or one sample ``[L, H]``), numpy or torch, any real dtype.

        The batch is checked first (shape, NaN/inf, and values that overflow float16 storage): on
        ``ValueError`` nothing is written. Then it is written in one resize + assignment and flushed.
        """
        if self._file is None:
            raise ValueError(f"AttributionWriter for {os.fspath(self.path)!r} is closed")
        data = self._prepare(batch)
        if data.shape[0] == 0:
            return
        start = self.num_samples
        try:
            self._dset.resize(start + data.shape[0], axis=0)
            self._dset[start:] = data
        except BaseException:
            self._dset.resize(start, axis=0)  # never leave unwritten rows counted as samples
            raise
        self._file.flush()

    def _prepare(self, batch) -> np.ndarray:
        data = _to_numpy(batch)
        expected = (self.num_layers, self.hidden_size)
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3 or data.shape[1:] != expected:
            raise ValueError(
                f"append to {os.fspath(self.path)!r}: expected a batch of shape [B, {expected[0]}, {expected[1]}] "
                f"(or one sample [{expected[0]}, {expected[1]}]), got {list(np.shape(batch))}"
            )
        if data.dtype.kind not in "fiu":
            raise ValueError(f"append to {os.fspath(self.path)!r}: expected real numbers, got dtype {data.dtype}")
        bad = _first_nonfinite(data)
        if bad is not None:
            raise ValueError(f"append to {os.fspath(self.path)!r}: batch row {bad[0]} (layer {bad[1]}, "
                             f"hidden {bad[2]}) is {data[bad]}; attributions must be finite")
        with np.errstate(over="ignore"):
            stored = data.astype(self.dtype)
        bad = _first_nonfinite(stored)
        if bad is not None:
            raise ValueError(f"append to {os.fspath(self.path)!r}: batch row {bad[0]} (layer {bad[1]}, "
                             f"hidden {bad[2]}) = {data[bad]} overflows {self.dtype} storage")
        return stored

    # -- closing
    def close(self) -> None:
        """Store ``num_samples_processed`` and ``completed_at``, and close the file (idempotent)."""
        self._close(completed=True)

    def _close(self, completed: bool) -> None:
        if self._file is None:
            return
        try:
            self._dset.attrs[METADATA_PREFIX + "num_samples_processed"] = self.num_samples
            if completed:
                self._dset.attrs[METADATA_PREFIX + "completed_at"] = datetime.now().isoformat()
        finally:
            self._file.close()
            self._file = None

    def __enter__(self) -> "AttributionWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(completed=exc_type is None)

    def __repr__(self) -> str:
        state = "closed" if self._file is None else f"{self.num_samples} samples"
        return (f"AttributionWriter({os.fspath(self.path)!r}, layers={self.num_layers}, "
                f"hidden={self.hidden_size}, dtype={self.dtype}, {state})")


# ---------------------------------------------------------------------------------------- concatenating
def concat_attribution_files(
    inputs: Sequence[PathLike], output: PathLike, *, overwrite: bool = False, chunk_size: int = 256
) -> int:
    """Concatenate attribution files along the sample axis, in the order given; returns the sample count.

    All inputs must have the same ``[L, H]`` and dtype (else ``ValueError`` naming the file). Samples are
    copied ``chunk_size`` at a time, so inputs larger than memory are fine. The output gets the writer's
    layout, the first input's metadata, ``concatenated_from`` (the input names) and ``num_samples_processed``.
    It is written to a temporary file in the output's folder and renamed into place, so a failure leaves
    no partial output. An existing ``output`` raises ``FileExistsError`` unless ``overwrite=True`` (the
    original ``merge_files`` appended to it instead).
    """
    inputs = [Path(p) for p in inputs]
    output = Path(output)
    if not inputs:
        raise ValueError("concat_attribution_files: no input files given")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {os.fspath(output)!r} already exists; pass overwrite=True to replace it")

    ref_shape, ref_dtype, total, metadata = None, None, 0, {}
    for path in inputs:
        with open_attributions(path) as dset:
            if ref_shape is None:
                ref_shape, ref_dtype = dset.shape[1:], dset.dtype
                metadata = {k: v for k, v in dset.attrs.items() if k.startswith(METADATA_PREFIX)}
            elif dset.shape[1:] != ref_shape or dset.dtype != ref_dtype:
                raise ValueError(
                    f"cannot concatenate {os.fspath(path)!r}: it holds [layers, hidden] = {list(dset.shape[1:])} as "
                    f"{dset.dtype}, but {os.fspath(inputs[0])!r} holds {list(ref_shape)} as {ref_dtype}"
                )
            total += dset.shape[0]

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{secrets.token_hex(4)}.tmp")
    try:
        with h5py.File(tmp, "w-") as out:
            dset_out = out.create_dataset(
                DATASET, shape=(total, *ref_shape), maxshape=(None, *ref_shape), chunks=(1, *ref_shape),
                dtype=ref_dtype, compression=COMPRESSION, compression_opts=COMPRESSION_LEVEL,
                fillvalue=FILL_VALUE if ref_dtype.kind == "f" else None,
            )
            dset_out.attrs.update(metadata)
            dset_out.attrs[METADATA_PREFIX + "concatenated_from"] = json.dumps([os.fspath(p) for p in inputs])
            dset_out.attrs[METADATA_PREFIX + "num_samples_processed"] = total
            pos = 0
            for path in inputs:
                with open_attributions(path) as dset:
                    for start in range(0, dset.shape[0], chunk_size):
                        block = dset[start:start + chunk_size]
                        dset_out[pos:pos + len(block)] = block
                        pos += len(block)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return total


# ---------------------------------------------------------------------------------------------- helpers
def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"AttributionWriter: {name} must be a positive integer, got {value!r}")
    return int(value)


def _storage_dtype(dtype: Any) -> np.dtype:
    """``"float32"``/``"float16"``, a numpy dtype, or torch.float32/float16 (read by name: no torch import)."""
    if not isinstance(dtype, str) and str(dtype).startswith("torch."):
        dtype = str(dtype)[len("torch."):]
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _STORAGE_DTYPES:
        raise ValueError(f"AttributionWriter: dtype must be one of {tuple(_STORAGE_DTYPES)}, got {dtype!r}")
    return _STORAGE_DTYPES[name]


def _metadata_attrs(metadata: dict[str, Any]) -> dict[str, Any]:
    attrs = {}
    for key, value in metadata.items():
        if value is None:
            value = "None"
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, (list, tuple, dict)):
            value = json.dumps(value)
        elif isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(
                f"metadata {key!r}: {type(value).__name__} values cannot be stored "
                f"(use str, int, float, bool, None, a path, or a JSON-able list/dict)"
            )
        attrs[f"{METADATA_PREFIX}{key}"] = value
    return attrs


def _to_numpy(batch) -> np.ndarray:
    if hasattr(batch, "detach"):  # torch.Tensor, without importing torch
        batch = batch.detach().cpu()
        if batch.dtype.is_floating_point and batch.dtype.itemsize < 4:  # bfloat16 has no numpy type
            batch = batch.float()
        return batch.numpy()
    return np.asarray(batch)


def _first_nonfinite(data: np.ndarray) -> tuple[int, ...] | None:
    if data.dtype.kind != "f":
        return None
    finite = np.isfinite(data)
    if finite.all():
        return None
    return tuple(int(i) for i in np.argwhere(~finite)[0])
