"""The embedding cache: instruction-encoder contexts of a whole data set, keyed by example id.

Layout of a cache folder:
  meta.json                         {"format", "dim", "context_length", "dtype", "encoder": fingerprint}
  shard-00000.array_record          one record per example (below)
  shard-00000.ids.json              the ids of that shard in record order; written last, atomically,
                                    so a shard without it is incomplete and is rewritten on resume (and
                                    so is a published one shown damaged: below)
  writer.lock                       while a `CacheWriter` is open (one writer per folder): its host, pid,
                                    boot and pid namespace; a lock of this host, boot and namespace
                                    whose process is gone is taken over
  part-00003-of-00008/              what part 3 of a precompute split into 8 wrote: a cache folder of its
                                    own (the layout above); the parts' writers run at once, so a folder
                                    of a whole run or of another split is refused while its writer is open

A record is `uint32 header length | JSON header | contexts`: the header holds `id`, `length` (the
number of valid tokens T), `text` (the example's text), `rewrite` (the VLM's two-stage description,
or null) and, when the encoder read an image, `image` (`image_digest`: its shape, dtype and a hash of its
pixels); the contexts are the `(T, dim)` valid token states in `dtype` (bfloat16 by default).
`lookup(id, text, image)` pads them back to `(context_length, dim)` float32 with a prefix mask.
The reader takes the records of the folder and of its part folders together (their meta.json files must
agree). One writer writes an id once; two parts may both hold one (sets that share an example, such as a
training split that is also an evaluation split): the first folder's record is read.
An example the encoder failed on (an image the processor refuses) has a record with `skip` (the reason)
in place of `length` and no contexts: `lookup` raises `SkippedExample`, a bad example that the
pipelines skip as they skip it when they run the encoder themselves (a reader older than skip records
fails on the missing `length`, which its pipelines skip too).

The cache is checked, not trusted: opening it compares its encoder fingerprint
(`genmask_jax.encoders.fingerprint`) with the config's, a record's header must carry the id it is
read for, a lookup with the example's text must find that text in the record and one with its image
an image of the shape encoded (another `data.resolution`, other images; a record written before digests
has none and its image is not checked), and a damaged shard is named. Each failure, and an id that is not
cached (`CacheMiss`), is a `ContextError`: the pipelines stop on it instead of skipping the example.
An image of that shape with other pixels only logs a warning (`EmbeddingCache.pixel_mismatches`): the
same files decoded by another JPEG decoder (a cache written on one machine and read on another) differ
in a few pixels, and refusing them would stop training over contexts that are right.

A shard is damaged only on evidence that it is: an ids.json that reads but is not a JSON list of ids, a
shard file that is gone, a record count other than its ids.json's, or an array_record error that is not
a failed system call on a file that reads. A file the file system does not let us read (permissions, an
I/O error) raises `CacheUnreadable` naming it, and a resumed writer deletes nothing: re-encoding a
shard of a 7B encoder costs GPU hours.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import logging
import os
import re
import socket
import struct
import threading

import ml_dtypes
import numpy as np

from genmask_jax.data.skips import BadExample, io_errno
from genmask_jax.encoders.base import ContextError

log = logging.getLogger(__name__)

PIXEL_WARNING_EVERY = 1000  # `EmbeddingCache._check_image` logs the 1st, 1000th, 2000th, ... mismatch
FORMAT = 2  # 1: records indexed by unique id and a partial fingerprint (misreads after a repeated id)
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_PRECOMPUTE = "python -m genmask_jax.encoders.precompute"
# The advice for records the data no longer gives: a rerun into the same folder resumes it, skipping ids
# already there, so it would keep them.
NEW_CACHE = (
    f"write a new cache (`{_PRECOMPUTE} --config=... --out=NEW_FOLDER`, or delete this folder first): a "
    "rerun into this folder keeps its records"
)
# Fingerprint fields that a machine without the model files cannot compute (the Qwen folder's digests and
# the processor's pixel bounds on a host that only reads the cache): compared only where both sides have
# them.
_WHEN_KNOWN = ("model_digest", "prompt_files_digest", "min_pixels", "max_pixels")
# Fingerprint fields that this code sets, not a config (`encoders.fingerprint`): no config gives the
# contexts of a cache that differs in one of them. The rewrite's follow `rewrite_reasoning`, which a config
# sets, where that differs as well.
_CODE_FIELDS = ("prompt_version", "rewrite_prompt", "rewrite_decoding")


class CacheMiss(ContextError, KeyError):
    """An example id the cache does not hold (its split was not precomputed)."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class CacheMismatch(ContextError, ValueError):
    """The cache does not match the config or the data (other encoder settings, texts, a bad index)."""


class CacheUnreadable(ContextError, OSError):
    """A cache file that the file system does not let us read (permissions, an I/O error): not damage,
    nothing is deleted."""


class CacheLocked(RuntimeError):
    """Another writer holds the cache folder."""


class SkippedExample(BadExample):
    """An example the precompute could not encode (`CacheWriter.add_skip`); `kind` is its error's."""


def image_digest(image) -> str:
    """`"<shape> <dtype> <blake2b-128 of its pixels>"` of an image an encoder reads: "56x56x3 uint8 9f0c…"."""
    pixels = np.ascontiguousarray(image)
    shape = "x".join(str(n) for n in pixels.shape)
    return f"{shape} {pixels.dtype} {hashlib.blake2b(pixels.data, digest_size=16).hexdigest()}"


def _header(example_id: str, text: str, rewrite: str | None, image: str | None, **fields) -> bytes:
    header = {"id": example_id, **fields, "text": text, "rewrite": rewrite}
    if image is not None:  # absent, not null: the records of text-only examples are as before
        header["image"] = image
    return json.dumps(header).encode("utf-8")


def encode_record(
    example_id: str,
    states: np.ndarray,
    dtype: str,
    text: str = "",
    rewrite: str | None = None,
    image: str | None = None,
) -> bytes:
    """`image`: the `image_digest` of the image the encoder read (None: it read none)."""
    header = _header(example_id, text, rewrite, image, length=int(states.shape[0]))
    payload = np.ascontiguousarray(states, dtype=_DTYPES[dtype]).tobytes()
    return struct.pack("<I", len(header)) + header + payload


def encode_skip_record(example_id: str, reason: str, text: str = "", image: str | None = None) -> bytes:
    """The record of an example that was not encoded: `reason` ("kind: detail") in place of contexts."""
    header = _header(example_id, text, None, image, skip=reason)
    return struct.pack("<I", len(header)) + header


def decode_record(record: bytes, dim: int, dtype: str) -> tuple[dict, np.ndarray]:
    """(header, states float32 `(T, dim)`); T = 0 for a skip record."""
    (n,) = struct.unpack("<I", record[:4])
    header = json.loads(record[4 : 4 + n].decode("utf-8"))
    states = np.frombuffer(record[4 + n :], dtype=_DTYPES[dtype]).reshape(header.get("length", 0), dim)
    return header, states.astype(np.float32)


def published_shards(folder: str) -> list[tuple[str, str]]:
    """(shard path, ids.json path) of every published shard (one with an ids.json), in shard order."""
    return [
        (ids_path[: -len(".ids.json")] + ".array_record", ids_path)
        for ids_path in sorted(glob.glob(os.path.join(glob.escape(folder), "shard-*.ids.json")))
    ]


def part_folder(folder: str, part: int, num_parts: int) -> str:
    """The folder that part `part` (0-based) of a precompute split into `num_parts` writes in `folder`."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} of {num_parts}: a part is 0 ... num_parts - 1")
    return os.path.join(folder, f"part-{part:05d}-of-{num_parts:05d}")


def _part_of(path: str) -> tuple[int, int] | None:
    """(3, 8) for ".../part-00003-of-00008"; None for a folder that is not a part folder."""
    match = re.fullmatch(r"part-(\d{5})-of-(\d{5})", os.path.basename(os.path.normpath(path)))
    return (int(match.group(1)), int(match.group(2))) if match else None


def cache_folders(folder: str) -> list[str]:
    """The folders whose shards make up the cache at `folder`: `folder` itself when it has a meta.json,
    then its part folders that have one (a part's writer writes it first), in name order."""
    parts = [
        p
        for p in sorted(glob.glob(os.path.join(glob.escape(folder), "part-*-of-*")))
        if _part_of(p) is not None and os.path.exists(os.path.join(p, "meta.json"))
    ]
    return ([folder] if os.path.exists(os.path.join(folder, "meta.json")) else []) + parts


def cache_metas(folder: str, folders: list[str] | None = None) -> dict[str, dict]:
    """{folder: its meta.json} of the cache at `folder` (its `cache_folders`, or `folders`), which must
    agree; raises as `read_meta` for a folder that is no cache, and CacheMismatch for parts written with
    other settings (every pair compared: a field one side does not know is not compared)."""
    metas = {f: read_meta(f) for f in (folders if folders is not None else cache_folders(folder)) or [folder]}
    label = lambda f: "the top folder" if f == folder else os.path.basename(f)  # noqa: E731
    for i, (one, meta) in enumerate(metas.items()):
        for other in list(metas)[i + 1 :]:
            diff = meta_differences(meta, metas[other], names=(label(one), label(other)))
            if diff:
                raise CacheMismatch(
                    f"embedding cache {folder}: {label(other)} was written with other settings than "
                    f"{label(one)} ({'; '.join(diff)}): delete the one written with the wrong settings and "
                    "precompute it again"
                )
    return metas


def cache_meta(folder: str) -> dict:
    """The meta.json of the cache at `folder` (of its first folder; `cache_metas` checks they agree)."""
    return next(iter(cache_metas(folder).values()))


def unreadable(path: str, error: BaseException) -> CacheUnreadable:
    """The error of a cache file that a system call failed on (`io_errno`, or any OSError)."""
    folder = os.path.dirname(path)
    return CacheUnreadable(
        f"embedding cache {folder}: {os.path.basename(path)} does not read ({_first_line(error)}): a "
        "permission or file system problem, not damage (nothing deleted); make it readable by this user, "
        "or wait for the storage to read again, and rerun"
    )


def read_ids(ids_path: str) -> list[str] | None:
    """The ids an ids.json lists; None when it reads but is not a JSON list of strings (emptied, cut
    short). Raises `CacheUnreadable` when it does not read (permissions, an I/O error)."""
    try:
        with open(ids_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise unreadable(ids_path, e) from e
    try:
        ids = json.loads(data)
    except ValueError:  # UnicodeDecodeError included: bytes that are not UTF-8 are damage too
        return None
    return ids if isinstance(ids, list) and all(isinstance(i, str) for i in ids) else None


def shard_damage(shard: str, ids: list[str] | None, count: bool = True) -> str | None:
    """Why a published shard cannot be read as its ids.json lists `ids` (None: it can). `count` opens
    the shard and compares its number of records (reads its footer, not its records). Only evidence of
    damage is returned; a shard that the file system does not let us read raises `CacheUnreadable`."""
    if ids is None:
        return "its ids.json is not a JSON list of ids"
    try:
        os.stat(shard)
    except FileNotFoundError:  # its folder lists (its ids.json was found): the file is gone
        return "its file is missing"
    except OSError as e:
        raise unreadable(shard, e) from e
    if not count:
        return None
    try:
        with open(shard, "rb") as f:  # array_record reads a file it may not open as one without records
            f.read(1)
        records = _num_records(shard)
    except Exception as e:  # noqa: BLE001  (sorted below)
        if isinstance(e, OSError) or io_errno(e) is not None:
            raise unreadable(shard, e) from e
        return f"it does not open: {_first_line(e)}"
    return None if records == len(ids) else f"it holds {records} records, its ids.json lists {len(ids)}"


def damaged_shard(shard: str, reason: str, found_by_writer: bool = True) -> CacheMismatch:
    """The error of a damaged published shard. `found_by_writer`: a resumed precompute finds the damage
    itself (`shard_damage`); one inside a record it does not (it reads no records), so the message then
    says to delete the shard first."""
    folder = os.path.dirname(shard)
    rerun = f"`{_PRECOMPUTE} --config=... {_out_flags(folder)}` with the flags that wrote it"
    repair = (
        f"rerun the precompute ({rerun}): it encodes a damaged shard's examples again"
        if found_by_writer
        else f"delete it and {os.path.basename(shard)[: -len('.array_record')]}.ids.json, then rerun the "
        f"precompute ({rerun}): it encodes their examples again"
    )
    return CacheMismatch(
        f"embedding cache {folder}: {os.path.basename(shard)} is damaged ({reason}): {repair}"
    )


def _out_flags(folder: str) -> str:
    """The precompute flags that write `folder`: `--out=...`, with the part flags for a part folder."""
    part = _part_of(folder)
    if part is None:
        return f"--out={folder}"
    top = os.path.dirname(os.path.normpath(folder)) or "."
    return f"--out={top} --part={part[0]} --num_parts={part[1]}"


def completed_shards(folder: str) -> list[tuple[str, list[str]]]:
    """(shard path, ids) of every published shard, in shard order; raises CacheMismatch naming a shard
    whose ids.json does not read or whose file is gone (`shard_damage` without opening the shards)."""
    out = []
    for shard, ids_path in published_shards(folder):
        ids = read_ids(ids_path)
        reason = shard_damage(shard, ids, count=False)
        if reason is not None:
            raise damaged_shard(shard, reason)
        out.append((shard, ids))
    return out


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def differences(
    cached: dict, expected: dict, prefix: str = "", names: tuple[str, str] = ("cache", "config")
) -> list[str]:
    """`"<prefix>field: cache A, config B"` (`names`) for every field where two fingerprints differ."""
    return [
        f"{prefix}{k}: {names[0]} {cached.get(k)!r}, {names[1]} {expected.get(k)!r}"
        for k in sorted(set(cached) | set(expected))
        if cached.get(k) != expected.get(k)
        and not (k in _WHEN_KNOWN and None in (cached.get(k), expected.get(k)))
    ]


def written_by_other_code(cached: dict, expected: dict) -> str:
    """Why no config matches a cache's encoder fingerprint `cached` when `expected` (this code's) differs
    from it in a field the code sets (`_CODE_FIELDS`); "" when no such field differs, or the encoders do."""
    if cached.get("encoder") != expected.get("encoder"):
        return ""
    same_rewrite = cached.get("rewrite_reasoning") == expected.get("rewrite_reasoning")
    changed = [
        k
        for k in _CODE_FIELDS
        if cached.get(k) != expected.get(k) and (same_rewrite or not k.startswith("rewrite_"))
    ]
    if not changed:
        return ""
    if changed == ["rewrite_decoding"] and cached.get("rewrite_decoding") is None:
        how = (
            "an older version of this code wrote it, whose rewrites followed the model folder's "
            "generation_config.json (e.g. its repetition_penalty)"
        )
    else:
        how = f"another version of this code wrote it (its {', '.join(changed)})"
    return f"{how}, and no config setting gives its contexts"


def meta_differences(cached: dict, expected: dict, names: tuple[str, str] = ("cache", "config")) -> list[str]:
    """Differences of two meta.json dicts: the storage fields by name, the encoder fingerprint's as
    `encoder.<field>` (Qwen's fingerprint has a `dtype` of its own, the torch dtype; merged into one
    dict it hid the stored contexts' `dtype`)."""
    storage = lambda meta: {k: v for k, v in meta.items() if k != "encoder"}  # noqa: E731
    return differences(storage(cached), storage(expected), names=names) + differences(
        cached.get("encoder", {}), expected.get("encoder", {}), prefix="encoder.", names=names
    )


def read_meta(folder: str) -> dict:
    """meta.json of a cache folder; raises for a missing one and for an older format."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"{folder} is not an embedding cache (no meta.json); write one with `{_PRECOMPUTE}`"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CacheMismatch(
            f"embedding cache {folder} has format {meta.get('format', 1)}, this code reads format {FORMAT} "
            f"(older caches can serve another example's context and record too little of the encoder "
            f"settings to be checked): write a new cache with `{_PRECOMPUTE} --out=NEW_FOLDER`"
        )
    return meta


class CacheWriter:
    """Appends shards to a cache folder; `done` holds the ids already cached (resume skips them).

    Holds `writer.lock` (created exclusively) from construction to `close()`: a second writer on the
    same folder fails instead of deleting the first one's open shard or writing the same shard name.
    Use it as a context manager, or call `close()`. A shard is published only when it holds exactly
    the ids it lists: one interrupted between a record's write and its id is discarded (resume redoes
    it) instead of leaving a cache that no reader accepts.

    `part=(i, n)`: writes `part_folder(folder, i, n)` instead, beside the writers of the other parts of
    the same `n`; a writer of the whole folder or of another `n` is refused while one is open (theirs
    would encode the same examples twice). `done` holds the ids of the whole cache (`own`: of this
    writer's folder, `elsewhere`: {folder: ids} of the others), so that no writer encodes again what a
    part or a whole run published before.
    """

    def __init__(
        self,
        folder: str,
        dim: int,
        context_length: int,
        dtype: str = "bfloat16",
        fingerprint: dict | None = None,
        shard_size: int = 1000,
        part: tuple[int, int] | None = None,
    ):
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.top = folder = os.path.normpath(folder)  # "cache/" is "cache": the writers' folders compare
        folder = folder if part is None else part_folder(folder, *part)
        os.makedirs(folder, exist_ok=True)
        self.folder, self.dim, self.dtype, self.shard_size = folder, dim, dtype, shard_size
        self._writer, self._ids = None, []
        self._lock = _acquire_lock(os.path.join(folder, "writer.lock"))
        try:
            _check_other_writers(self.top, self.folder)
            self._open_folder(context_length, fingerprint or {})
        except BaseException:
            os.remove(self._lock)
            raise

    def _open_folder(self, context_length: int, fingerprint: dict) -> None:
        meta = {
            "format": FORMAT,
            "dim": self.dim,
            "context_length": context_length,
            "dtype": self.dtype,
            "encoder": fingerprint,
        }
        meta_path = os.path.join(self.folder, "meta.json")
        others = [f for f in cache_folders(self.top) if f != self.folder]
        # a part's settings are those of the cache it is part of
        for written in ([self.folder] if os.path.exists(meta_path) else []) + others:
            cached = read_meta(written)
            diff = meta_differences(cached, meta)
            if diff:
                why = written_by_other_code(cached.get("encoder", {}), fingerprint)
                raise CacheMismatch(
                    f"cache {written} was written with other settings ({'; '.join(diff)}): "
                    f"{why + ': ' if why else ''}use another --out"
                )
        if not os.path.exists(meta_path):
            _write_json_atomic(meta_path, meta)
        shards = self._readable_shards()
        self.own = {i for _, ids in shards for i in ids}  # published in this writer's folder
        self.elsewhere = {f: _published_ids(f) for f in others}  # by the cache's other writers
        self.done = self.own.union(*self.elsewhere.values())
        # after the last one, not at their count: a shard deleted from the middle leaves a gap
        self.next_shard = 1 + max((_shard_number(s) for s, _ in shards), default=-1)
        for stale in glob.glob(os.path.join(glob.escape(self.folder), "shard-*.array_record")):
            if stale not in {s for s, _ in shards}:
                os.remove(stale)  # an interrupted shard of this folder's (single) writer
        for tmp in glob.glob(os.path.join(glob.escape(self.folder), "*.tmp-*")):
            os.remove(tmp)  # an interrupted `_write_json_atomic`

    def _readable_shards(self) -> list[tuple[str, list[str]]]:
        """(shard, ids) of the published shards that read as their ids.json lists. Any other is
        unpublished (both files deleted, with a warning), so that this run encodes its examples again."""
        readable = []
        for shard, ids_file in published_shards(self.folder):
            ids = read_ids(ids_file)
            reason = shard_damage(shard, ids)
            if reason is None:
                readable.append((shard, ids))
                continue
            log.warning(
                "%s is damaged (%s): unpublished (%s deleted), its examples are encoded again",
                shard,
                reason,
                ids_file,
            )
            for path in (ids_file, shard):  # the ids first: a shard without them is unpublished
                if os.path.exists(path):
                    os.remove(path)
        return readable

    def _open(self):
        from array_record.python.array_record_module import ArrayRecordWriter

        path = os.path.join(self.folder, f"shard-{self.next_shard:05d}.array_record")
        self._writer = ArrayRecordWriter(path, "group_size:1")

    def add(
        self,
        example_id: str,
        states: np.ndarray,
        text: str = "",
        rewrite: str | None = None,
        image: np.ndarray | None = None,
    ) -> None:
        """`states` float `(T, dim)`: the valid tokens only; `image`: the one the encoder read (None:
        none), whose digest a lookup compares. An id already in the cache is refused."""
        if states.ndim != 2 or states.shape[1] != self.dim:
            raise ValueError(f"states {states.shape} do not match dim {self.dim}")
        self._check_new(example_id)
        with np.errstate(over="ignore"):
            finite = np.isfinite(np.asarray(states, _DTYPES[self.dtype])).all()
        if not finite:
            raise ContextError(
                f"the context of {example_id!r} is not finite in {self.dtype} (the cache's dtype): not "
                "cached; float16 overflows Qwen2.5's activations: encode and store in bfloat16 or float32"
            )
        digest = None if image is None else image_digest(image)
        self._write(example_id, encode_record(example_id, states, self.dtype, text, rewrite, digest))

    def add_skip(self, example_id: str, reason: str, text: str = "", image: np.ndarray | None = None) -> None:
        """Records that `example_id` could not be encoded (`reason`: "kind: detail", `skip_reason`):
        readers raise `SkippedExample` for it, and a resume does not try it again."""
        self._check_new(example_id)
        digest = None if image is None else image_digest(image)
        self._write(example_id, encode_skip_record(example_id, reason, text, digest))

    def _check_new(self, example_id: str) -> None:
        if example_id in self.done:
            raise ValueError(f"example {example_id!r} is already in cache {self.folder}: ids must be unique")

    def _write(self, example_id: str, record: bytes) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(record)
        self._ids.append(example_id)
        self.done.add(example_id)
        self.own.add(example_id)
        if len(self._ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Closes the current shard and publishes its ids (the shard is complete from here on)."""
        if self._writer is None:
            return
        self._writer.close()
        path = os.path.join(self.folder, f"shard-{self.next_shard:05d}.array_record")
        _fsync(path)  # on disk before its ids.json publishes it: a crash must not leave it short
        records = _num_records(path)
        if records == len(self._ids):
            _write_json_atomic(path[: -len(".array_record")] + ".ids.json", self._ids)
            self.next_shard += 1
        else:  # interrupted between a write and its id: neither list can be trusted
            log.warning(
                "%s holds %d records for %d ids: discarded, not published", path, records, len(self._ids)
            )
            os.remove(path)
            self.done.difference_update(self._ids)
            self.own.difference_update(self._ids)
        self._writer, self._ids = None, []

    def close(self) -> None:
        """Publishes the last shard and releases the folder."""
        if self._lock is None:
            return
        try:
            self.flush()
        finally:
            if _read_lock(self._lock) == _lock_line():  # not a lock another writer took over
                os.remove(self._lock)
            self._lock = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _published_ids(folder: str) -> set[str]:
    """The ids of the shards of `folder` (another writer's folder of the same cache) that are published
    and not shown damaged; their damage is left to their own writer, which unpublishes and redoes it."""
    done = set()
    for shard, ids_path in published_shards(folder):
        ids = read_ids(ids_path)
        if shard_damage(shard, ids, count=False) is None:
            done.update(ids)
    return done


def _check_other_writers(top: str, folder: str) -> None:
    """Raises CacheLocked when a writer of the cache `top` other than the one of `folder` is open and its
    examples may be `folder`'s too: the whole folder's writer, or one of a part of another split."""
    mine = _part_of(folder) if folder != top else None
    for lock in [os.path.join(top, "writer.lock")] + glob.glob(
        os.path.join(glob.escape(top), "part-*-of-*", "writer.lock")
    ):
        other = os.path.dirname(lock)
        theirs = _part_of(other) if other != top else None
        if other == folder or (other != top and theirs is None):
            continue
        if mine is not None and theirs is not None and theirs[1] == mine[1]:
            continue  # another part of the same split
        holder = _read_lock(lock)
        if os.path.exists(lock) and not _is_stale(holder):
            split = "the whole cache" if theirs is None else f"part {os.path.basename(other)}"
            raise CacheLocked(
                f"{lock} exists: another precompute (host and pid: {holder}) is writing {split}, and would "
                "encode examples of this one too; run every part with the same --num_parts, one after the "
                "other otherwise (if it is no longer running, delete the lock file and rerun)"
            )


def _shard_number(path: str) -> int:
    """5 for ".../shard-00005.array_record"."""
    return int(os.path.basename(path)[len("shard-") :].split(".", 1)[0])


def _num_records(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        return reader.num_records()  # 0 for a file that failed to open: close() raises its error
    finally:
        reader.close()


def _acquire_lock(path: str) -> str:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        holder = _read_lock(path)
        if not _is_stale(holder):
            raise _locked(path, holder) from None
        _take_over(path, holder)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # another writer took it over first
            raise _locked(path, _read_lock(path)) from None
        log.warning("%s: took over the lock of %s, a process of this host that is gone", path, holder)
    with os.fdopen(fd, "w") as f:
        f.write(_lock_line() + "\n")
    return path


def _lock_line() -> str:
    """`host pid boot=<boot id> pidns=<pid namespace>`: a pid means a process only within one boot
    and one pid namespace (containers sharing a host name each have their own)."""
    boot = _read_lock("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()} {os.getpid()} boot={boot} pidns={_pid_namespace()}"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "unknown"


def _read_lock(path: str) -> str:
    """A lock file's (or a one-line system file's) text; "unknown" when it is empty or unreadable."""
    try:
        with open(path) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


def _locked(path: str, holder: str) -> CacheLocked:
    return CacheLocked(
        f"{path} exists: another precompute (host and pid: {holder}) is writing this cache; if it is "
        "no longer running, delete the lock file and rerun (the rerun resumes)"
    )


def _is_stale(holder: str) -> bool:
    """Whether a lock (`_lock_line`) names a process of this boot and pid namespace that is gone (a hard
    kill leaves the lock behind). Another host's, boot's or container's lock is never stale: its
    processes cannot be checked from here; nor is a lock without boot and namespace (an older writer's)."""
    mine = _lock_line().split(" ")
    fields = holder.split(" ")
    if len(fields) != 4 or fields[2:] != mine[2:] or "unknown" in " ".join(mine[2:]):
        return False
    host, pid = fields[:2]
    if host != mine[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def _take_over(path: str, holder: str) -> None:
    """Moves the stale lock `path` of `holder` aside. Of two writers taking it over at once, the second
    would move the first one's fresh lock: it puts that back and fails."""
    aside = f"{path}.stale-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another writer moved it: the exclusive create decides
    moved = _read_lock(aside)
    if moved != holder:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        os.remove(aside)
        raise _locked(path, moved)
    os.remove(aside)


def _write_json_atomic(path: str, value) -> None:
    """Writes `value` to `path` whole or not at all, on disk when it returns (a power loss after an
    unsynced rename can leave an empty file under the new name)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(os.path.dirname(path) or ".", directory=True)


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems (network mounts) refuse to sync a directory
            raise
    finally:
        os.close(fd)


class EmbeddingCache:
    """Random-access reader: `lookup(example_id, text) -> (context (L, D) float32, mask (L,) bool)`.

    Args:
      folder: the cache folder.
      fingerprint: the config's `genmask_jax.encoders.fingerprint(data.encoder)`; opening fails with
        the differing fields when the cache was written with other settings. None skips the check.
      context_length: checked against the cache's when given (implied by `fingerprint`).
    """

    def __init__(
        self,
        folder: str,
        fingerprint: dict | None = None,
        context_length: int | None = None,
        parts: bool = True,
    ):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.folder = folder
        folders = cache_folders(folder) if parts else [folder]
        metas = cache_metas(folder, folders)
        self.meta = next(iter(metas.values()))
        self.dim, self.dtype = self.meta["dim"], self.meta["dtype"]
        self.context_length = self.meta["context_length"]
        for meta in metas.values() if fingerprint is not None else []:
            diff = differences(meta["encoder"], fingerprint)
            if diff:
                why = written_by_other_code(meta["encoder"], fingerprint)
                advice = f"{why}: write" if why else "set these fields as the cache has them, or write"
                raise CacheMismatch(
                    f"embedding cache {folder} was written with other encoder settings ({'; '.join(diff)}): "
                    f"{advice} a new cache with `{_PRECOMPUTE} --config=... --out=NEW_FOLDER`"
                )
        if context_length is not None and context_length != self.context_length:
            raise CacheMismatch(
                f"embedding cache {folder} has context_length {self.context_length}, the config asks for "
                f"{context_length}"
            )
        by_folder = [completed_shards(f) for f in metas]
        shards = [shard for in_folder in by_folder for shard in in_folder]
        self.index: dict[str, int] = {}
        position = 0  # ArrayRecord numbers records across all shards
        for in_folder in by_folder:
            before = set(self.index)
            for shard, ids in in_folder:
                for example_id in ids:
                    if example_id not in before:  # else an earlier folder's: parts whose sets share an id
                        if example_id in self.index:  # one writer never writes an id twice
                            raise CacheMismatch(
                                f"embedding cache {folder} holds {example_id!r} twice ({shard})"
                            )
                        self.index[example_id] = position
                    position += 1
        self._shards = [s for s, _ in shards]
        self.pixel_mismatches, self._first_pixel_mismatch = 0, None  # `_check_image`
        self._mismatch_lock = threading.Lock()
        # the first position of each shard, to name the shard of a record that does not read
        self._starts = np.cumsum([0] + [len(ids) for _, ids in shards[:-1]]).tolist()
        try:
            self._source = ArrayRecordDataSource(self._shards) if self._shards else None
        except Exception as e:  # noqa: BLE001  (a shard that does not open; named below)
            raise _find_damage(folder, shards, _first_line(e)) from e
        records = len(self._source) if self._source is not None else 0
        if position != records:
            raise _find_damage(
                folder, shards, f"its ids.json files list {position} ids, its shards {records}"
            )

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.index

    def missing(self, ids) -> list[str]:
        """The ids (in the given order) that the cache does not hold; no record is read."""
        return [i for i in ids if i not in self.index]

    def record(self, example_id: str) -> tuple[dict, np.ndarray]:
        """(header with text / rewrite, states float32 (T, D)) of one example."""
        if example_id not in self.index:
            raise CacheMiss(f"example {example_id!r} is not in the embedding cache {self.folder}")
        position = self.index[example_id]
        try:
            header, states = decode_record(self._source[position], self.dim, self.dtype)
        except Exception as e:  # noqa: BLE001  (a record cut short or overwritten: its shard is damaged)
            shard = self._shards[bisect.bisect_right(self._starts, position) - 1]
            if os.path.exists(shard) and (isinstance(e, OSError) or io_errno(e) is not None):
                raise unreadable(shard, e) from e  # a shard gone since the cache opened is damage
            reason = f"the record of {example_id!r} does not read: {_first_line(e)}"
            raise damaged_shard(shard, reason, found_by_writer=False) from e
        if header["id"] != example_id:
            raise CacheMismatch(
                f"embedding cache {self.folder}: the record indexed as {example_id!r} holds "
                f"{header['id']!r} (shards and ids.json files do not match)"
            )
        return header, states

    def lookup(
        self, example_id: str, text: str | None = None, image: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`text`: the example's text, checked against the one that was encoded; `image`: the image the
        encoder reads (`encoder_input(...)[0]`), checked against the digest of the one it read where the
        record has one (records written before digests have none): another shape is refused, other
        pixels are a logged warning (`_check_image`). None: unchecked.
        Raises `SkippedExample` for an example the precompute could not encode."""
        header, states = self.record(example_id)
        if text is not None and header["text"] != text:
            raise CacheMismatch(
                f"embedding cache {self.folder}: {example_id!r} was encoded from {header['text'][:120]!r}, "
                f"the data now gives {text[:120]!r}: the data changed since the precompute; {NEW_CACHE}"
            )
        if image is not None and "image" in header:
            self._check_image(example_id, header["image"], image_digest(image))
        if "skip" in header:
            kind, _, detail = header["skip"].partition(": ")
            raise SkippedExample(kind, f"{detail} (the precompute could not encode it)")
        n = min(states.shape[0], self.context_length)
        context = np.zeros((self.context_length, self.dim), np.float32)
        context[:n] = states[:n]
        mask = np.zeros((self.context_length,), bool)
        mask[:n] = True
        return context, mask

    def _check_image(self, example_id: str, cached: str, given: str) -> None:
        """Compares two `image_digest`s: raises CacheMismatch when the shapes (or dtypes) differ; when only
        the pixels do, counts it in `pixel_mismatches` and logs a warning at the first and every
        `PIXEL_WARNING_EVERY`th: another JPEG decoder (another Pillow or libjpeg build, TFDS's decoder)
        gives the same file slightly other pixels, so this is no proof that the data changed."""
        if cached == given:
            return
        cached_shape, given_shape = (digest.rsplit(" ", 1)[0] for digest in (cached, given))
        if cached_shape != given_shape:
            raise CacheMismatch(
                f"embedding cache {self.folder}: {example_id!r} was encoded from a {cached_shape} image, the "
                f"data now gives {given_shape}: the images changed since the precompute (another "
                f"data.resolution, other files); {NEW_CACHE}"
            )
        with self._mismatch_lock:
            self.pixel_mismatches += 1
            count = self.pixel_mismatches
            self._first_pixel_mismatch = self._first_pixel_mismatch or example_id
        if count == 1 or count % PIXEL_WARNING_EVERY == 0:
            log.warning(
                "embedding cache %s: %d looked-up images (the first: %r) have other pixels than the images "
                "of the same shapes that their contexts were encoded from: replaced images, or another JPEG "
                "decoder on this machine than on the one that ran the precompute; contexts may be stale: if "
                "the images changed, %s [logged at the first, then every %d]",
                self.folder, count, self._first_pixel_mismatch, NEW_CACHE, PIXEL_WARNING_EVERY,
            )


def _find_damage(folder: str, shards: list[tuple[str, list[str]]], detail: str) -> CacheMismatch:
    """The error naming the first shard that does not read as its ids.json lists; `detail` (what went
    wrong with all of them together) where each shard alone reads."""
    for shard, ids in shards:
        reason = shard_damage(shard, ids)
        if reason is not None:
            return damaged_shard(shard, reason)
    return CacheMismatch(
        f"embedding cache {folder} does not read ({detail}): rerun the precompute that wrote it "
        f"(`{_PRECOMPUTE} --config=... --out={folder}`)"
    )


def missing_from_sample(cache: EmbeddingCache, source, num_samples: int) -> tuple[list[str], int]:
    """(ids the cache lacks, number checked) among `num_samples` examples spread evenly over `source`.

    An id counts as missing only if its example reads: precompute leaves out the examples it cannot
    read, and the pipelines skip those as bad examples. Reads the ids, and the missing examples."""
    n = len(source)
    indices = sorted({int(i) for i in np.linspace(0, n - 1, min(num_samples, n))}) if n else []
    missing = [i for i in indices if source.example_id(i) not in cache]
    return [source.example_id(i) for i in missing if readable(source, i)], len(indices)


def readable(source, index: int) -> bool:
    """Whether example `index` of `source` reads (precompute leaves out those that do not)."""
    try:
        source[index]
    except Exception:  # noqa: BLE001  (any failure to read is the example's)
        return False
    return True
