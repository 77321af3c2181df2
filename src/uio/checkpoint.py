"""Read and write Unified-IO checkpoints.

The released ``.bin`` files are ``flax.serialization.to_bytes(params)``: a msgpack map of maps
whose leaves are msgpack extension objects (type code 1) holding ``(shape, dtype_name, raw)``.
We walk that structure over a memory map ourselves, so every leaf becomes a zero-copy numpy
view of the file: loading never holds a second copy of the weights besides the model.

Parameter paths are the flax ones joined by ``/`` (``encoder/layers_0/mlp/wi_0/kernel``).
:func:`torch_key` maps such a path to the state-dict key of our torch modules, whose names
mirror flax's (``layers_0`` becomes ``layers.0``; ``kernel``/``scale``/``embedding`` become
``weight``); :func:`to_torch_layout` transposes dense and conv kernels to torch's layout.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import warnings
from pathlib import Path
from typing import Iterator, Mapping

import msgpack
import torch
import numpy as np

from .tree import nest_paths

NDARRAY_EXT = 1  # flax's msgpack extension code for numpy arrays
_LAYER_INDEX = re.compile(r"^layers_(\d+)$")
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not match the model."""


class _Reader:
    """Minimal msgpack walker over a buffer: maps, strings, ints, arrays, bin and ext."""

    def __init__(self, buf, name: str):
        self.buf, self.pos, self.name = buf, 0, name

    def _take(self, n: int) -> int:
        start = self.pos
        if start + n > len(self.buf):
            raise CheckpointError(f"{self.name}: file is truncated (needs byte {start + n}, has {len(self.buf)})")
        self.pos += n
        return start

    def _uint(self, n: int) -> int:
        start = self._take(n)
        return int.from_bytes(self.buf[start:start + n], "big")

    def header(self) -> tuple[str, int]:
        """Return (kind, length-or-value) of the next object and advance past its header."""
        b = self.buf[self._take(1)]
        if b <= 0x7F:
            return "int", b
        if 0x80 <= b <= 0x8F:
            return "map", b & 0x0F
        if 0x90 <= b <= 0x9F:
            return "array", b & 0x0F
        if 0xA0 <= b <= 0xBF:
            return "str", b & 0x1F
        sized = {0xD9: ("str", 1), 0xDA: ("str", 2), 0xDB: ("str", 4), 0xC4: ("bin", 1), 0xC5: ("bin", 2),
                 0xC6: ("bin", 4), 0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4),
                 0xCC: ("int", 1), 0xCD: ("int", 2), 0xCE: ("int", 4), 0xCF: ("int", 8),
                 0xC7: ("ext", 1), 0xC8: ("ext", 2), 0xC9: ("ext", 4)}
        fixext = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
        if b in sized:
            kind, n = sized[b]
            return kind, self._uint(n)
        if b in fixext:
            return "ext", fixext[b]
        raise CheckpointError(f"{self.name}: unexpected msgpack byte 0x{b:02x} at offset {self.pos - 1}; "
                              "not a Unified-IO .bin checkpoint (or it is corrupt)")

    def expect(self, kind: str, where: str) -> int:
        got, n = self.header()
        if got != kind:
            raise CheckpointError(f"{self.name}: expected a {kind} at '{where}', found a {got}")
        return n

    def string(self, where: str) -> str:
        n = self.expect("str", where)
        start = self._take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def ndarray(self, path: str) -> np.ndarray:
        ext_len = self.expect("ext", path)
        code = self.buf[self._take(1)]
        end = self.pos + ext_len
        if code != NDARRAY_EXT:
            raise CheckpointError(f"{self.name}: leaf '{path}' has msgpack extension type {code}, not an array")
        if self.expect("array", path) != 3:
            raise CheckpointError(f"{self.name}: leaf '{path}' is not a (shape, dtype, data) triple")
        shape = tuple(self.header()[1] for _ in range(self.expect("array", path)))
        dtype = self.string(path)
        nbytes = self.expect("bin", path)
        start = self._take(nbytes)
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise CheckpointError(f"{self.name}: leaf '{path}' has unknown dtype {dtype!r}") from None
        if nbytes != dt.itemsize * int(np.prod(shape, dtype=np.int64)) or self.pos != end:
            raise CheckpointError(f"{self.name}: leaf '{path}' holds {nbytes} bytes, which does not fit "
                                  f"shape {shape} of {dtype}")
        return np.frombuffer(self.buf, dtype=dt, count=int(np.prod(shape)), offset=start).reshape(shape)

    def peek_kind(self) -> str:
        start = self.pos
        kind, _ = self.header()
        self.pos = start
        return kind

    def leaves(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for _ in range(self.expect("map", prefix or "<root>")):
            key = self.string(prefix or "<root>")
            path = f"{prefix}/{key}" if prefix else key
            kind = self.peek_kind()
            if kind == "map":
                yield from self.leaves(path)
            elif kind == "ext":
                yield path, self.ndarray(path)
            else:
                raise CheckpointError(f"{self.name}: '{path}' is a msgpack {kind}, expected a map or an array")


def read_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a flax ``.bin`` checkpoint into ``{"a/b/kernel": array}`` without copying the data.

    The arrays are read-only views of a memory map of the file; copy them (as loading into a
    model does) before the returned dict is dropped if they must outlive it.
    """
    path = Path(path)
    buf = _map_file(path)
    reader = _Reader(buf, str(path))
    params = BinLeaves(reader.leaves(), buf)
    if reader.pos != len(buf):
        raise CheckpointError(f"{path}: {len(buf) - reader.pos} unexpected bytes after the parameter tree")
    return params


def _map_file(path: Path) -> mmap.mmap:
    """A read-only memory map of the checkpoint file ``path``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _drop_pages(buf: mmap.mmap, start: int, nbytes: int) -> None:
    """Drop the whole pages of ``buf[start:start + nbytes]`` from this process's memory (they stay
    in the OS page cache): once a leaf is copied, loading need not hold the file and the model."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and hasattr(buf, "madvise"):
        buf.madvise(mmap.MADV_DONTNEED, first, last - first)


class BinLeaves(dict):
    """:func:`read_bin`'s result: leaves that are views of one memory map of the file."""

    def __init__(self, leaves, buf: mmap.mmap):
        super().__init__(leaves)
        self._buf = buf
        self._base = np.frombuffer(buf, dtype=np.uint8).ctypes.data

    def release(self, path: str) -> None:
        """Drop the pages of leaf ``path`` from this process's memory once it has been copied."""
        leaf = self[path]
        _drop_pages(self._buf, leaf.ctypes.data - self._base, leaf.nbytes)


def write_bin(params: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write ``{"a/b/kernel": array}`` in the released ``.bin`` format (keys sorted, as flax does).

    The file is written one leaf at a time, and each value of ``params`` is read only when its
    leaf is written, so a lazy mapping that makes its arrays on access never holds more than one.
    """
    tree = nest_paths({key: key for key in params})
    packer = msgpack.Packer(use_bin_type=True)

    def write(node, f) -> None:
        if not isinstance(node, dict):
            value = np.require(params[node], requirements="C")  # keeps 0-d arrays 0-d
            raw = packer.pack((value.shape, value.dtype.name, value.tobytes()))
            f.write(packer.pack(msgpack.ExtType(NDARRAY_EXT, raw)))
            return
        f.write(packer.pack_map_header(len(node)))
        for name in sorted(node):
            f.write(packer.pack(name))
            write(node[name], f)

    tmp = Path(f"{path}.partial")
    try:
        with open(tmp, "wb") as f:
            write(tree, f)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def torch_key(flax_path: str) -> str:
    """Map a flax parameter path to the state-dict key of the matching torch module."""
    *modules, leaf = flax_path.split("/")
    modules = [_LAYER_INDEX.sub(r"layers.\1", m) for m in modules]
    return ".".join(modules + [_TORCH_LEAF.get(leaf, leaf)])


def to_torch_layout(flax_path: str, array):
    """Dense kernels (in, out) -> (out, in); conv kernels HWIO -> OIHW; others unchanged.

    Works on numpy arrays and torch tensors alike and returns a view (no copy).
    """
    if flax_path.endswith("/kernel"):
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.permute(3, 2, 0, 1) if isinstance(array, torch.Tensor) else array.transpose(3, 2, 0, 1)
    return array


def flax_path(torch_name: str, leaf_kind: str) -> str:
    """Inverse of :func:`torch_key` given the flax leaf name (``kernel``, ``scale``, ...)."""
    *modules, leaf = torch_name.split(".")
    path = re.sub(r"(^|/)layers/(\d+)(?=/|$)", r"\1layers_\2", "/".join(modules))
    return f"{path}/{leaf_kind if leaf == 'weight' else leaf}"


def expected_params(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """The flax paths, shapes and dtypes a checkpoint for ``model`` must hold (works on ``meta``)."""
    spec = {}
    for module_name, module in model.named_modules():
        kind = ("kernel" if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
                else "embedding" if isinstance(module, torch.nn.Embedding) else "scale")
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            shape = tuple(param.shape)
            if kind == "kernel" and name == "weight":
                shape = shape[::-1] if len(shape) == 2 else (shape[2], shape[3], shape[1], shape[0])
            spec[flax_path(full, kind)] = (shape, "float32")
    return spec


def _shape_and_dtype(leaf) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a numpy array, a torch tensor, or an already-made pair."""
    if isinstance(leaf, torch.Tensor):
        return tuple(leaf.shape), str(leaf.dtype).removeprefix("torch.")
    if isinstance(leaf, np.ndarray):
        return leaf.shape, leaf.dtype.name
    return tuple(leaf[0]), leaf[1]


def validate(params: Mapping[str, np.ndarray] | Mapping[str, tuple], expected: Mapping[str, tuple], name: str) -> None:
    """Raise :class:`CheckpointError` naming the first missing, extra, misshaped or mistyped leaf."""
    for path in sorted(set(expected) | set(params)):
        if path not in params:
            raise CheckpointError(f"{name}: missing parameter '{path}' (expected shape {expected[path][0]})")
        if path not in expected:
            raise CheckpointError(f"{name}: unexpected parameter '{path}'; is this a checkpoint for another "
                                  "model size or config?")
        shape, dtype = _shape_and_dtype(params[path])
        if tuple(shape) != expected[path][0]:
            raise CheckpointError(f"{name}: parameter '{path}' has shape {tuple(shape)}, expected "
                                  f"{expected[path][0]}; is this a checkpoint for another model size?")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise CheckpointError(f"{name}: parameter '{path}' has dtype {dtype}, expected a float type")


class Placement:
    """Where :func:`load_into` puts each weight: here a plain contiguous tensor, copied into with
    torch (the reference); :mod:`uio.accel` lays weights out for speed instead."""

    def empty(self, path: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """An uninitialised tensor for checkpoint leaf ``path`` of (torch) ``shape``."""
        return torch.empty(shape, dtype=dtype, device=device)

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``target.copy_(source)``."""
        return target.copy_(source)


def load_into(model: torch.nn.Module, params: Mapping[str, np.ndarray], name: str,
              dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              placement: Placement | None = None) -> torch.nn.Module:
    """Validate ``params`` against ``model`` (which may live on ``meta``) and assign them to it.

    Each leaf is converted one at a time (layout, dtype, device) into a tensor of ``placement``
    (default :class:`Placement`), so peak memory stays at about one copy of the weights beyond
    what ``params`` itself holds (nothing for a memory map). Parameters the model already holds
    off ``meta`` (the fused matrices :func:`uio.accel.layout.lay_out` allocates) are filled in place.
    """
    validate(params, expected_params(model), name)
    dtype, placement = dtype or torch.float32, placement or Placement()
    state = {}
    with warnings.catch_warnings(), torch.no_grad():
        # The memory-mapped leaves are read-only; they are copied right away, never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for path, leaf in params.items():
            key = torch_key(path)
            target = model.get_parameter(key)
            if target.is_meta:
                target = placement.empty(path, tuple(target.shape), dtype, device)
            state[key] = _filled(target, path, leaf, dtype, device, placement)
            if isinstance(params, (BinLeaves, SafetensorsLeaves)):
                params.release(path)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _filled(target: torch.Tensor, path: str, leaf: np.ndarray | torch.Tensor, dtype: torch.dtype,
            device: str | torch.device, placement: Placement) -> torch.Tensor:
    """``target``, an allocated parameter, holding ``leaf``."""
    if target.dtype != dtype or target.device.type != torch.device(device).type:
        raise ValueError(f"parameter for '{path}' was allocated as {target.dtype} on {target.device}, "
                         f"but loading was asked for {dtype} on {device}")
    # Moved as stored first: one contiguous transfer to an accelerator, then a copy there.
    return placement.copy(target, to_torch_layout(path, _as_tensor(leaf).to(target.device)))


def _as_tensor(leaf: np.ndarray | torch.Tensor) -> torch.Tensor:
    return leaf if isinstance(leaf, torch.Tensor) else torch.from_numpy(leaf)


_SAFETENSORS_DTYPES = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16, "F64": np.float64, "I32": np.int32,
                       "I64": np.int64}  # BF16's bits are read as uint16, then viewed as torch.bfloat16


class SafetensorsLeaves(Mapping):
    """The leaves of a converted checkpoint: read-only views of one memory map of the file, as
    :func:`read_bin`'s are (bf16 ones as torch tensors: numpy has no bf16). Never write to them.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's
    dtype, shape and byte range, then the data.
    """

    def __init__(self, path: str | os.PathLike):
        self._path = Path(path)
        self._buf = _map_file(self._path)
        header, data_start = self._header()
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self._entries = {key: self._entry(key, info, data_start) for key, info in header.items()}

    def _error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self._path}: not a readable safetensors checkpoint ({what})")

    def _header(self) -> tuple[dict, int]:
        """The JSON header, and where the data starts."""
        size = int.from_bytes(self._buf[:8], "little") if len(self._buf) >= 8 else -1
        if not 0 < size <= len(self._buf) - 8:
            raise self._error(f"header length {size} in a file of {len(self._buf)} bytes")
        try:
            header = json.loads(self._buf[8:8 + size])
        except ValueError as err:  # JSON and UTF-8 decoding errors
            raise self._error(f"header is not JSON: {err}") from None
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        return header, 8 + size

    def _entry(self, key: str, info, data_start: int) -> tuple[str, tuple[int, ...], int]:
        try:
            kind, shape, (start, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
            itemsize = np.dtype(_SAFETENSORS_DTYPES[kind]).itemsize
        except (KeyError, TypeError, ValueError):
            raise self._error(f"tensor '{key}' has the entry {info!r}") from None
        if not (0 <= start and end - start == math.prod(shape) * itemsize and data_start + end <= len(self._buf)):
            raise self._error(f"tensor '{key}' has data_offsets {[start, end]} that do not fit its shape "
                              f"{list(shape)} and {kind}, or the file")
        return kind, shape, data_start + start

    def __getitem__(self, key: str) -> np.ndarray | torch.Tensor:
        kind, shape, offset = self._entries[key]
        array = np.frombuffer(self._buf, _SAFETENSORS_DTYPES[kind], math.prod(shape), offset).reshape(shape)
        if kind != "BF16":
            return array
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array).view(torch.bfloat16)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def release(self, key: str) -> None:
        """Drop the pages of leaf ``key`` from this process's memory once it has been copied."""
        _drop_pages(self._buf, self._entries[key][2], self[key].nbytes)


def load_checkpoint_file(path: str | os.PathLike) -> Mapping[str, np.ndarray | torch.Tensor]:
    """Read a ``.bin`` (flax msgpack) or ``.safetensors`` checkpoint into flat flax paths."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return SafetensorsLeaves(path) if path.suffix == ".safetensors" else read_bin(path)


def write_safetensors(params: Mapping[str, np.ndarray | torch.Tensor], path: str | os.PathLike,
                      dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> None:
    """Write a checkpoint as safetensors (flax paths as keys, original layout), optionally cast.

    Memory-mapped leaves are written without a copy (a cast makes one of the target size); the
    file is written as ``path.partial`` and renamed when complete.
    """
    from safetensors.torch import save_file

    tensors = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for key, leaf in params.items():
            tensor = leaf if isinstance(leaf, torch.Tensor) else torch.from_numpy(np.require(leaf, requirements="C"))
            tensors[key] = tensor.to(dtype) if dtype is not None else tensor
    tmp = Path(f"{path}.partial")
    save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # save_file creates owner-only files; a shared cache needs more
    os.replace(tmp, path)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors file (empty for a ``.bin``)."""
    return SafetensorsLeaves(path).metadata if Path(path).suffix == ".safetensors" else {}


def infer_size(params: Mapping[str, np.ndarray | torch.Tensor]) -> str | None:
    """The released size (``small``...``xl``) whose parameter tree ``params`` has, or None."""
    from .config import CONFIGS, VAE_CONFIG
    from .model.transformer import UnifiedIO

    shapes = {path: _shape_and_dtype(leaf)[0] for path, leaf in params.items()}
    for size, config in CONFIGS.items():
        with torch.device("meta"):
            spec = expected_params(UnifiedIO(config, VAE_CONFIG))
        if shapes == {path: shape for path, (shape, _) in spec.items()}:
            return size
    return None


def params_from_model(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The flat flax-path tree of ``model``'s weights, in the checkpoint layout (for writing)."""
    state = model.state_dict()
    params = {}
    for path in expected_params(model):
        tensor = state[torch_key(path)].detach().float()
        if path.endswith("/kernel"):
            tensor = tensor.t() if tensor.ndim == 2 else tensor.permute(2, 3, 1, 0)
        params[path] = tensor.contiguous().numpy()
    return params
