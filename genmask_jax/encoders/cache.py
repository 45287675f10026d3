"""The embedding cache: instruction-encoder contexts of a whole data set, keyed by example id.

Layout of a cache folder:
  meta.json                         {"dim", "context_length", "dtype", "encoder": fingerprint}
  shard-00000.array_record          one record per example (below)
  shard-00000.ids.json              the ids of that shard in record order; written last, atomically,
                                    so a shard without it is incomplete and is rewritten on resume

A record is `uint32 header length | JSON header | contexts`: the header holds `id`, `length` (the
number of valid tokens T), `text` (what was encoded) and `rewrite` (the VLM's two-stage description,
or null); the contexts are the `(T, dim)` valid token states in `dtype` (bfloat16 by default).
`lookup(id)` pads them back to `(context_length, dim)` float32 with a prefix mask.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def encode_record(
    example_id: str, states: np.ndarray, dtype: str, text: str = "", rewrite: str | None = None
) -> bytes:
    header = json.dumps({"id": example_id, "length": int(states.shape[0]), "text": text, "rewrite": rewrite})
    header_bytes = header.encode("utf-8")
    payload = np.ascontiguousarray(states, dtype=_DTYPES[dtype]).tobytes()
    return struct.pack("<I", len(header_bytes)) + header_bytes + payload


def decode_record(record: bytes, dim: int, dtype: str) -> tuple[dict, np.ndarray]:
    (n,) = struct.unpack("<I", record[:4])
    header = json.loads(record[4 : 4 + n].decode("utf-8"))
    states = np.frombuffer(record[4 + n :], dtype=_DTYPES[dtype]).reshape(header["length"], dim)
    return header, states.astype(np.float32)


def completed_shards(folder: str) -> list[tuple[str, list[str]]]:
    """(shard path, ids) of every complete shard, in shard order."""
    out = []
    for ids_path in sorted(glob.glob(os.path.join(folder, "shard-*.ids.json"))):
        shard = ids_path[: -len(".ids.json")] + ".array_record"
        with open(ids_path) as f:
            out.append((shard, json.load(f)))
    return out


class CacheWriter:
    """Appends shards to a cache folder; `done` holds the ids already cached (resume skips them)."""

    def __init__(
        self,
        folder: str,
        dim: int,
        context_length: int,
        dtype: str = "bfloat16",
        fingerprint: dict | None = None,
        shard_size: int = 1000,
    ):
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        os.makedirs(folder, exist_ok=True)
        self.folder, self.dim, self.dtype, self.shard_size = folder, dim, dtype, shard_size
        meta = {"dim": dim, "context_length": context_length, "dtype": dtype, "encoder": fingerprint or {}}
        meta_path = os.path.join(folder, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                existing = json.load(f)
            if existing != meta:
                raise ValueError(f"cache {folder} was written with {existing}, not {meta}: use another --out")
        else:
            _write_json_atomic(meta_path, meta)
        shards = completed_shards(folder)
        self.done = {i for _, ids in shards for i in ids}
        self.next_shard = len(shards)
        for stale in glob.glob(os.path.join(folder, "shard-*.array_record")):
            if stale not in {s for s, _ in shards}:
                os.remove(stale)
        self._writer, self._ids = None, []

    def _open(self):
        from array_record.python.array_record_module import ArrayRecordWriter

        path = os.path.join(self.folder, f"shard-{self.next_shard:05d}.array_record")
        self._writer = ArrayRecordWriter(path, "group_size:1")

    def add(self, example_id: str, states: np.ndarray, text: str = "", rewrite: str | None = None) -> None:
        """`states` float `(T, dim)`: the valid tokens only."""
        if states.ndim != 2 or states.shape[1] != self.dim:
            raise ValueError(f"states {states.shape} do not match dim {self.dim}")
        if self._writer is None:
            self._open()
        self._writer.write(encode_record(example_id, states, self.dtype, text, rewrite))
        self._ids.append(example_id)
        self.done.add(example_id)
        if len(self._ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Closes the current shard and publishes its ids (the shard is complete from here on)."""
        if self._writer is None:
            return
        self._writer.close()
        _write_json_atomic(os.path.join(self.folder, f"shard-{self.next_shard:05d}.ids.json"), self._ids)
        self._writer, self._ids = None, []
        self.next_shard += 1

    def close(self) -> None:
        self.flush()


def _write_json_atomic(path: str, value) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


class EmbeddingCache:
    """Random-access reader: `lookup(example_id) -> (context (L, D) float32, mask (L,) bool)`."""

    def __init__(self, folder: str, context_length: int | None = None):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        meta_path = os.path.join(folder, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(
                f"{folder} is not an embedding cache (no meta.json); write one with "
                "`python -m genmask_jax.encoders.precompute`"
            )
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.dim, self.dtype = self.meta["dim"], self.meta["dtype"]
        self.context_length = context_length or self.meta["context_length"]
        if self.context_length != self.meta["context_length"]:
            raise ValueError(
                f"cache {folder} has context_length {self.meta['context_length']}, "
                f"the config asks for {self.context_length}"
            )
        shards = completed_shards(folder)
        self.index: dict[str, int] = {}
        for _, ids in shards:
            offset = len(self.index)
            for k, example_id in enumerate(ids):
                self.index[example_id] = offset + k
        self._shards = [s for s, _ in shards]
        self._source = ArrayRecordDataSource(self._shards) if self._shards else None

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.index

    def record(self, example_id: str) -> tuple[dict, np.ndarray]:
        """(header with text / rewrite, states float32 (T, D)) of one example."""
        if example_id not in self.index:
            raise KeyError(f"example {example_id!r} is not in the embedding cache")
        data = self._source[self.index[example_id]]
        return decode_record(data, self.dim, self.dtype)

    def lookup(self, example_id: str) -> tuple[np.ndarray, np.ndarray]:
        _, states = self.record(example_id)
        n = min(states.shape[0], self.context_length)
        context = np.zeros((self.context_length, self.dim), np.float32)
        context[:n] = states[:n]
        mask = np.zeros((self.context_length,), bool)
        mask[:n] = True
        return context, mask
