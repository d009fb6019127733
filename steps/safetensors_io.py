"""Safetensors I/O shared by the stages: reading headers, streaming writes.

`read_header` gives a file's tensor table (names, dtypes, shapes, byte ranges) without loading any
weights, with errors that name the file; tensors themselves are read with safetensors' safe_open.

safetensors.torch.save_file needs a whole shard in memory. When every tensor's name, shape and
dtype is known up front, the header can be written first and each tensor's bytes appended as it
is produced, so peak memory is one tensor. The files are plain safetensors (8-byte little-endian
header length, JSON header with data_offsets, padded to 8 bytes, then the raw buffer).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import NamedTuple

ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
             "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
             "BOOL": "bool"}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1}

Spec = tuple[str, tuple[int, ...], str]   # (name, shape, torch dtype name e.g. "bfloat16")


class TensorInfo(NamedTuple):
    dtype: str                  # as the file spells it, e.g. "BF16" (ST_DTYPES maps it to torch's)
    shape: tuple[int, ...]
    offsets: tuple[int, int]    # [start, end) in the data buffer after the header

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def _raw_header(path: Path) -> dict:
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes; header length "
                             f"{n if n >= 0 else 'missing'}): truncated, or an HTML/error page")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    data = size - 8 - n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = e["data_offsets"]
            ok = isinstance(e["dtype"], str) and 0 <= start <= end and \
                all(isinstance(s, int) and s >= 0 for s in e["shape"])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: not a safetensors file (bad header entry for {name!r})")
        if end > data:
            raise ValueError(f"{path}: truncated: tensor {name!r} ends at data byte {end}, the "
                             f"file holds {data}")
    return header


def read_header(path: Path) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of a .safetensors file, names sorted (as safe_open's keys() lists them),
    from its header alone (no weights read). ValueError naming the file when it is truncated or
    not safetensors at all."""
    header = _raw_header(path)
    header.pop("__metadata__", None)
    return {name: TensorInfo(e["dtype"], tuple(e["shape"]), tuple(e["data_offsets"]))
            for name, e in sorted(header.items())}


def read_metadata(path: Path) -> dict[str, str] | None:
    """The file's `__metadata__` (string to string), or None when it has none (as safe_open)."""
    return _raw_header(path).get("__metadata__")


def _header_bytes(specs: list[Spec], metadata: dict[str, str] | None = None) -> bytes:
    """8-byte little-endian length + the JSON header (padded with spaces to 8 bytes) of a file
    holding `specs` in that order."""
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, shape, dtype in specs:
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _check(spec: Spec, name: str, tensor) -> None:
    want, shape, dtype = spec
    if name != want or tuple(tensor.shape) != tuple(shape) or str(tensor.dtype) != f"torch.{dtype}":
        raise RuntimeError(f"writer expected {want} {shape} {dtype}, got {name} "
                           f"{tuple(tensor.shape)} {tensor.dtype} (plan and producer disagree)")


def _write_tensor(fh, tensor) -> None:
    import torch

    fh.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)


def write_safetensors(path: Path, specs: list[Spec], tensors, metadata: dict[str, str] | None = None
                      ) -> None:
    """Write one .safetensors file a tensor at a time: the header from `specs`, then each
    (name, tensor) of `tensors`, which must come in `specs` order."""
    with open(path, "wb") as fh:
        fh.write(_header_bytes(specs, metadata))
        n = 0
        for spec, (name, tensor) in zip(specs, tensors):
            _check(spec, name, tensor)
            _write_tensor(fh, tensor)
            n += 1
    if n != len(specs):
        raise RuntimeError(f"{path}: wrote {n} of {len(specs)} tensors")


class StreamingSafetensorsWriter:
    """Writes tensors, in the planned order, into pre-planned shards of at most max_shard_bytes
    (`model.safetensors`, or `model-0000k-of-0000n.safetensors` + index as transformers names
    them)."""

    def __init__(self, out_dir: Path, specs: list[Spec], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        shards: list[list[Spec]] = [[]]
        size = 0
        for spec in specs:
            n = math.prod(spec[1]) * ITEMSIZE[spec[2]]
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += n
        total = len(shards)
        self.files = ["model.safetensors"] if total == 1 else [
            f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self.shards = shards
        self.total_size = sum(math.prod(s[1]) * ITEMSIZE[s[2]] for s in specs)
        self._queue = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self._pos = 0
        self._fh = None
        self._shard = -1

    def _open(self, i: int) -> None:
        if self._fh:
            self._fh.close()
        self._fh = open(self.out_dir / self.files[i], "wb")
        self._fh.write(_header_bytes(self.shards[i]))
        self._shard = i

    def write(self, name: str, tensor) -> None:
        shard, spec = self._queue[self._pos]
        _check(spec, name, tensor)
        if shard != self._shard:
            self._open(shard)
        _write_tensor(self._fh, tensor)
        self._pos += 1

    def close(self) -> list[Path]:
        if self._pos != len(self._queue):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._queue)} tensors")
        if self._fh:
            self._fh.close()
        if len(self.files) > 1:
            weight_map = {name: self.files[i] for i, shard in enumerate(self.shards)
                          for name, _, _ in shard}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, indent=2))
        return [self.out_dir / f for f in self.files]
