"""Reading PyTorch-side checkpoints tensor by tensor, and writing/reading our Flax checkpoints.

Shared by the DiT and VAE converters. Reading streams: one tensor is materialised at a time from a
memory-mapped safetensors file, so converting the DiT holds about one copy of the weights on the host.
The VAE converter reads all its tensors before laying them out: two copies for a moment (about 1 GB
for WAN 2.1's VAE).
Our checkpoint is a folder: `params/` (orbax) + `config.json`, written to a temporary sibling and
renamed into place, so a failed (or interrupted) conversion leaves nothing behind; its folders and files
get the permissions the umask gives new ones. A process killed outright (SIGKILL, the OOM killer) leaves
its hidden `.DST.tmp-HOST.PID-*` sibling, which the next write of DST on that host removes
(`remove_stale_temporaries`). One whose files were deleted or cut short since (a half-synced
copy) is named in one ConversionError line when it is read (`reporting_damage`).
"""

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

logger = logging.getLogger(__name__)


class ConversionError(Exception):
    """A checkpoint that cannot be converted; the message says why in one line per problem."""


# ---------------------------------------------------------------------------------------------
# Reading PyTorch-side files.


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a file path or a folder (sharded with an index, or plain).

    A folder holding more than one copy of the weights (diffusers' `*.fp16.*` variants beside the
    weights; each index counts as one, and so do the files no index names that share a variant tag) is
    read from the copy without a variant in its file names, as diffusers' `from_pretrained` loads by
    default; with no such copy, or several, it is refused.
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    copies: dict[str, tuple[list[Path], bool]] = {}  # name -> (files, without a variant)
    indexed: set[Path] = set()
    for index in sorted(p for p in path.glob("*.safetensors*.json") if ".index" in p.name):
        try:
            with open(index) as f:
                files = [path / name for name in sorted(set(json.load(f)["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{index}: not a safetensors index ({e!r})") from e
        copies[index.name] = (files, bool(_PLAIN_INDEX.fullmatch(index.name)))
        indexed.update(files)
    by_variant: dict[str | None, list[Path]] = {}
    for file in sorted(path.glob("*.safetensors")):
        if file not in indexed:
            match = _FILE_NAME.fullmatch(file.name)  # None: an odd name (`a..safetensors`), its own copy
            by_variant.setdefault(match.group(2) if match else file.name, []).append(file)
    for variant, files in by_variant.items():
        copies[" and ".join(f.name for f in files)] = (files, variant is None)
    if not copies:
        raise ConversionError(f"{path}: no .safetensors files (nor one {'/'.join(TORCH_SUFFIXES)} file)")
    chosen = next(iter(copies))
    if len(copies) > 1:
        plain = [name for name, (_, is_plain) in copies.items() if is_plain]
        if len(plain) != 1:
            raise ConversionError(f"{path}: {'; '.join(copies)} each hold the weights (two copies of the "
                                  "weights?); keep one copy in the folder or point SRC at one file")
        chosen = plain[0]
        logger.info("%s: reading %s, not the variant(s) %s", path, chosen,
                    "; ".join(name for name in copies if name != chosen))
    files = copies[chosen][0]
    if not indexed.intersection(files):  # files no index names: each tensor must be in one of them
        _check_no_repeated_keys(files)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ConversionError(f"{path / chosen} names missing shards: {', '.join(missing)}")
    return files


# Names without a variant: `diffusion_pytorch_model.safetensors(.index.json)`, shards
# `diffusion_pytorch_model-00001-of-00002.safetensors`. Variants add a name such as fp16 after the stem
# (`diffusion_pytorch_model.fp16-00001-of-00002.safetensors`), or (diffusers' own index naming, current
# and legacy) before or after `index`. _FILE_NAME's group 2 is a file's variant (None without one).
_PLAIN_INDEX = re.compile(r"[^.]+\.safetensors\.index\.json")
_FILE_NAME = re.compile(r"([^.]*)(?:\.(.+?))?(?:-\d{5}-of-\d{5})?\.safetensors")


def _check_no_repeated_keys(files: list[Path]) -> None:
    """Files of one copy without an index must hold disjoint tensors: two copies of the weights under
    names without a variant (`weights.safetensors` beside `weights_copy.safetensors`) would be read
    twice, the last one silently winning."""
    owner: dict[str, Path] = {}
    for file in files:
        for key in safetensors_shapes([file]):
            if key in owner:
                raise ConversionError(f"{file.parent}: {owner[key].name} and {file.name} both hold {key!r} "
                                      "(two copies of the weights?); point SRC at one file")
            owner[key] = file


# safetensors' numpy reader looks fp8 up as `numpy.float8_*`, which numpy does not have.
_FP8_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def iter_safetensors(files: list[Path], select: Callable[[str], bool] | None = None
                     ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) one tensor at a time (only keys where `select(key)`, if given); bf16 and
    fp8 come back as ml_dtypes arrays."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            handle = safe_open(str(file), framework="numpy")
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{file}: not a readable safetensors file ({e})") from e
        with handle as f:
            header = None
            for key in f.keys():
                if select is not None and not select(key):
                    continue
                try:
                    dtype = f.get_slice(key).get_dtype()
                    if dtype not in _FP8_DTYPES:
                        yield key, f.get_tensor(key)
                        continue
                    header = header or _safetensors_header(file)
                    yield key, _read_fp8(file, header, key)
                except (SafetensorError, OSError, ValueError, KeyError) as e:
                    raise ConversionError(f"{file}: tensor {key!r} unreadable ({e})") from e


def _safetensors_header(file: Path) -> tuple[int, dict]:
    """(offset of the data, the JSON header) of a safetensors file: an 8-byte little-endian header
    length, then the header, which gives each tensor's dtype, shape and data_offsets in the data."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return 8 + length, json.loads(f.read(length))


def _read_fp8(file: Path, header: tuple[int, dict], key: str) -> np.ndarray:
    """One fp8 tensor, memory-mapped, as an ml_dtypes array."""
    import ml_dtypes

    start, entries = header
    entry = entries[key]
    begin, end = entry["data_offsets"]
    data = np.memmap(file, np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
    return data.view(getattr(ml_dtypes, _FP8_DTYPES[entry["dtype"]])).reshape(entry["shape"])


# safetensors' dtype names -> numpy / ml_dtypes names, as `tensor_entries` reports them.
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool", **_FP8_DTYPES}


def safetensors_entries(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype name) from the headers alone (nothing is read)."""
    from safetensors import SafetensorError, safe_open

    entries = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():
                    info = f.get_slice(key)
                    entries[key] = (tuple(info.get_shape()), _SAFETENSORS_DTYPES.get(info.get_dtype(),
                                                                                     info.get_dtype()))
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{file}: not a readable safetensors file ({e})") from e
    return entries


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape from the headers alone (nothing is read)."""
    return {key: shape for key, (shape, _) in safetensors_entries(files).items()}


def torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as numpy, keeping bf16 and fp8 (via ml_dtypes) instead of upcasting."""
    import ml_dtypes
    import torch

    # torch dtype -> (an integer type of its width, which numpy takes, and the ml_dtypes type to view as)
    views = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
             torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
             torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    tensor = tensor.detach().cpu()
    if tensor.dtype in views:
        bits, dtype = views[tensor.dtype]
        return tensor.view(bits).numpy().view(dtype)
    return tensor.numpy()


def iter_torch_file(path: str | os.PathLike, select: Callable[[str], bool] | None = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) from a `.pth`/`.pt`/`.bin` state dict (weights only), only keys where
    `select(key)` if given. Memory-mapped, except files in torch's legacy (pre-1.6, not zip) format,
    which torch cannot memory-map: those are read whole."""
    try:
        import torch
    except ImportError as e:
        raise ConversionError(
            f"{path}: reading PyTorch .pth files needs torch (pip install torch); "
            "or convert the file to safetensors first") from e
    try:
        mmap = _is_zip(path)  # what torch.load(mmap=True) checks before refusing
        if not mmap:
            logger.info("%s: legacy torch format (not zip), read into memory, not memory-mapped", path)
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for corrupt or truncated files
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path}: expected a state dict, found {type(state).__name__}")
    others = {key: value for key, value in state.items() if not torch.is_tensor(value)}
    if others:  # checked before yielding, so a converter fails before it reads a tensor
        raise ConversionError(f"{path}: {_not_tensors_message(others)}")
    for key in list(state.keys()):
        if select is None or select(key):
            yield key, torch_to_numpy(state[key])


def _not_tensors_message(others: Mapping[str, Any]) -> str:
    """Why a torch file's non-tensor entries stop the conversion, and what to pass instead."""
    listed = ", ".join(f"{key!r} ({type(value).__name__})" for key, value in others.items())
    nested = [key for key, value in others.items() if isinstance(value, Mapping)]
    how = (f"torch.save(checkpoint[{nested[0]!r}], 'weights.pth')" if nested
           else "torch.save({k: v for k, v in checkpoint.items() if torch.is_tensor(v)}, 'weights.pth')")
    entry = "entry" if len(others) == 1 else "entries"
    verb = "is not a tensor" if len(others) == 1 else "are not tensors"
    return f"{entry} {listed} {verb}; a training checkpoint? pass its weights dict ({how})"


def _is_zip(path: str | os.PathLike) -> bool:
    """Whether the file starts with a zip local-file header, as torch.save's format since 1.6 does."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def torch_file(path: Path) -> Path | None:
    """The PyTorch file to read for `path`: `path` itself if it is one, or the one PyTorch file of a
    folder without safetensors files (diffusers' `save_pretrained(safe_serialization=False)` writes
    `diffusion_pytorch_model.bin`); None when `path` is read as safetensors."""
    if path.is_file():
        return path if path.suffix in TORCH_SUFFIXES else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    files = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
    if len(files) > 1:
        raise ConversionError(f"{path}: {' and '.join(f.name for f in files)} may each hold weights (sharded "
                              "or variant PyTorch files are not read); point SRC at one file")
    return files[0] if files else None


def iter_checkpoint(path: str | os.PathLike, select: Callable[[str], bool] | None = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """Streams tensors from safetensors (file or folder) or a torch file (or a folder holding one); only
    keys where `select(key)`, if given."""
    path = Path(path)
    torch_path = torch_file(path)
    if torch_path is not None:
        return iter_torch_file(torch_path, select)
    return iter_safetensors(safetensors_files(path), select)


def tensor_entries(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype name, e.g. 'bfloat16' or 'float8_e4m3fn') of a checkpoint's tensors:
    from the headers for safetensors; a torch file is memory-mapped and its tensors' metadata read."""
    path = Path(path)
    torch_path = torch_file(path)
    if torch_path is not None:
        return {k: (tuple(v.shape), v.dtype.name) for k, v in iter_torch_file(torch_path)}
    return safetensors_entries(safetensors_files(path))


def check_keys(found: set[str], expected: set[str], what: str) -> None:
    """Raises one ConversionError listing every missing and unexpected key."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        lines = [f"{what}: keys do not match the expected layout"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
        raise ConversionError("\n".join(lines))


def check_shapes(mismatches: list[tuple[str, tuple, tuple]], what: str) -> None:
    """Raises one ConversionError listing (key, found shape, expected shape) mismatches."""
    if mismatches:
        lines = [f"{what}: {len(mismatches)} tensor shapes do not match the config"]
        lines += [f"  {k}: found {tuple(a)}, expected {tuple(b)}" for k, a, b in mismatches]
        raise ConversionError("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# PyTorch <-> Flax tensor layouts.


def linear_to_flax(w: np.ndarray) -> np.ndarray:
    """nn.Linear weight (out, in) -> Dense kernel (in, out)."""
    return np.ascontiguousarray(w.T)


def conv_to_flax(w: np.ndarray) -> np.ndarray:
    """Conv weight (O, I, *spatial) -> (*spatial, I, O)."""
    nd = w.ndim - 2
    return np.ascontiguousarray(np.transpose(w, (*range(2, 2 + nd), 1, 0)))


def conv_from_flax(w: np.ndarray) -> np.ndarray:
    """(*spatial, I, O) -> (O, I, *spatial)."""
    nd = w.ndim - 2
    return np.ascontiguousarray(np.transpose(w, (nd + 1, nd, *range(nd))))


# ---------------------------------------------------------------------------------------------
# Our checkpoints: orbax params + config.json, written atomically.


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


# Arrays are stored in chunks of at most this size: writing or reading one holds a chunk-sized buffer,
# so whole-array chunks of scanned (stacked) weights held up to 3 GiB more for the 1.3B DiT.
SAVE_CHUNK_BYTES = 64 * 2**20


def chunked_save_args(tree: Any) -> Any:
    """orbax SaveArgs for every leaf of `tree`: stored in chunks of at most SAVE_CHUNK_BYTES."""
    import jax

    ocp = _orbax()
    return jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=SAVE_CHUNK_BYTES), tree)


def _host_array_checkpointer():
    """A synchronous orbax checkpointer for trees of numpy arrays that adds little to their one copy.

    orbax's defaults would hold two more: its numpy handler copies every array before writing, and
    the OCDBT driver buffers the written data until the end. The 1.3B DiT (5.3 GiB) then peaked at
    14 GiB; without both, 5.6-5.8 GiB (BENCHMARKS.md). Any orbax reader restores the result.
    """
    import jax

    ocp = _orbax()
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.ArrayHandler()))  # never used; orbax warns when it is missing
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=registry))


class _NoOcdbtMergeNotice(logging.Filter):
    """orbax tries to merge OCDBT files after every save and warns when, as here, there are none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT" not in record.getMessage()


# What our writers leave in a folder: `save_flax_checkpoint` params/ + config.json (and vae_pretrain's
# record, pretrain.json); `write_safetensors_folder` config.json, safetensors files (+ their index) and
# EXPORT_MARKER, which lists them all.
FLAX_CHECKPOINT_ENTRIES = frozenset({"config.json", "params", "pretrain.json"})
# A diffusers folder downloaded from the Hub holds the same files as one we exported; only this file
# (which diffusers' from_pretrained ignores) tells them apart, so that --overwrite never deletes a download.
EXPORT_MARKER = "genmask_export.json"
_SAFETENSORS_FOLDER_ENTRY = re.compile(r"config\.json|.+\.safetensors|.+\.safetensors\.index\.json")


def folder_names(path: str | os.PathLike) -> set[str] | None:
    """The names in the folder `path`; None when it is not a folder, or is a link to one."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return None
    return {p.name for p in path.iterdir()}


def is_safetensors_folder(path: str | os.PathLike) -> bool:
    """A diffusers-style folder, ours or not: config.json + safetensors files (+ their index), only."""
    names = folder_names(path) or set()
    return ("config.json" in names and any(n.endswith(".safetensors") for n in names)
            and all(_SAFETENSORS_FOLDER_ENTRY.fullmatch(n) for n in names))


def is_exported_folder(path: str | os.PathLike) -> bool:
    """A folder `write_safetensors_folder` wrote: exactly the files its EXPORT_MARKER lists, and it."""
    names = folder_names(path) or set()
    if EXPORT_MARKER not in names:
        return False
    try:
        with open(Path(path) / EXPORT_MARKER) as f:
            listed = set(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return names == listed | {EXPORT_MARKER}


def converted_checkpoint_refusal(path: str | os.PathLike) -> str | None:
    """None when a converted checkpoint may replace `path`: an empty folder, or a converted checkpoint of
    ours holding nothing else; otherwise why not. A diffusers folder never qualifies: it may be SRC."""
    names = folder_names(path)
    if names is not None and (not names or (is_flax_checkpoint(path) and names <= FLAX_CHECKPOINT_ENTRIES)):
        return None
    return "is not a checkpoint folder of ours (only params/ + config.json)"


def export_refusal(path: str | os.PathLike) -> str | None:
    """None when an exported diffusers folder may replace `path`: an empty folder, or an earlier export
    (`is_exported_folder`); otherwise why not."""
    names = folder_names(path)
    if names is not None and (not names or is_exported_folder(path)):
        return None
    if is_safetensors_folder(path):
        return (f"holds diffusers weights without {EXPORT_MARKER}, which every export writes (a downloaded "
                "model, or an export made before that file, which you may delete yourself)")
    return f"is not an exported diffusers folder (only the files its {EXPORT_MARKER} lists)"


def check_destination(dst: str | os.PathLike, overwrite: bool,
                      refusal: Callable[[Path], str | None] = converted_checkpoint_refusal) -> None:
    """Raises ConversionError unless something may be written at `dst`: nothing is there, or `overwrite`
    and `refusal(dst)` finds no reason against replacing it (by default: it is a converted checkpoint)."""
    dst = Path(dst)
    if not dst.exists() and not dst.is_symlink():
        return
    if not overwrite:
        raise ConversionError(f"{dst} already exists (--overwrite, or overwrite=True, replaces it)")
    reason = refusal(dst)
    if reason:
        raise ConversionError(f"{dst} {reason}: it is left alone, choose another destination")


def check_apart(src: str | os.PathLike, dst: str | os.PathLike, inside_ok: bool = False) -> None:
    """Raises ConversionError when DST is SRC, inside it (unless `inside_ok`) or holds it (after resolving
    links): replacing DST would delete what is read, and writing into SRC would change it."""
    source, target = Path(src).resolve(), Path(dst).resolve()
    if target == source:
        relation = "is"
    elif source in target.parents and not inside_ok:
        relation = "is inside"
    elif target in source.parents:
        relation = "holds"
    else:
        return
    raise ConversionError(f"{dst} {relation} the source {src}: choose a destination apart from it")


def _umask() -> int:
    """The process's umask. Linux reports it in /proc/self/status; elsewhere the only way to read it is
    to set it (os.umask) and put it back, which is process-wide: a file another thread creates meanwhile
    gets the temporary mask, so it is a strict one (0o077) rather than 0."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def give_default_mode(path: Path) -> None:
    """Gives `path` the permissions a new file or folder gets under the umask (0o666 or 0o777 masked, as
    `open` and `os.makedirs` give): readable by the group and others as the umask allows. A folder keeps
    its setgid bit, which it inherits in a shared-group parent, so what is written in it keeps the group."""
    mode = path.stat().st_mode
    default = (0o777 if stat.S_ISDIR(mode) else 0o666) & ~_umask()
    path.chmod(default | (mode & stat.S_ISGID if stat.S_ISDIR(mode) else 0))


@contextlib.contextmanager
def atomic_folder(dst: Path, config: Mapping[str, Any] | None, overwrite: bool,
                  refusal: Callable[[Path], str | None]) -> Iterator[Path]:
    """Yields an empty sibling of `dst` to fill; on success adds `config.json` (unless `config` is None)
    and renames it to `dst`.

    An existing `dst` is replaced only when `check_destination(dst, overwrite, refusal)` accepts it,
    checked before anything is written and again before the rename. On any error the sibling is
    removed and an existing `dst` is left as it was.
    """
    check_destination(dst, overwrite, refusal)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{_owner()}-", dir=dst.parent))
    try:
        give_default_mode(tmp)  # mkdtemp makes it 0o700: DST would be private to this user
        yield tmp
        if config is not None:
            with open(tmp / "config.json", "w") as f:
                json.dump(dict(config), f, indent=2, sort_keys=True)
        check_destination(dst, overwrite, refusal)  # it may have appeared or changed meanwhile
        _replace_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _host() -> str:
    """This machine's name as temporary folders' names hold it."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())


def _owner() -> str:
    """HOST.PID: the process that made a temporary folder, in its name."""
    return f"{_host()}.{os.getpid()}"


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(dst: Path) -> None:
    """Deletes the hidden siblings of `dst` that `atomic_folder` or `_replace_folder` made in a process on
    this host that was killed outright: the name says so (`.DST.tmp-[old-]HOST.PID-xxxxxxxx`, mkdtemp's
    8 characters last) and no process PID exists. An old DST that a kill between `_replace_folder`'s two
    renames left aside (`tmp-old-`) is kept while DST is missing. Any other `.DST.tmp-*` sibling (another
    host's, a running process's, an older naming) is left, with a warning naming it."""
    ours = re.compile(rf"\.{re.escape(dst.name)}\.tmp-(old-)?{re.escape(_host())}\.(\d+)-[a-z0-9_]{{8}}")
    for sibling in sorted(dst.parent.glob(f".{glob.escape(dst.name)}.tmp-*")):
        match = ours.fullmatch(sibling.name)
        killed = match is not None and not _alive(int(match.group(2)))
        if killed and match.group(1) and not dst.exists():
            logger.warning("%s holds the %s a killed --overwrite was replacing: rename it back, or delete it",
                           sibling, dst.name)
        elif killed and sibling.is_dir() and not sibling.is_symlink():
            logger.info("removing %s, left by a killed write of %s", sibling, dst)
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            logger.warning("%s may be another write of %s (on another host, or running): delete it once none "
                           "is", sibling, dst)


def _replace_folder(new: Path, dst: Path) -> None:
    """Renames `new` to `dst`. An existing `dst` is renamed aside first and deleted once `new` is in its
    place: deleted first, an interruption (Ctrl-C during the deletion of a large checkpoint) lost it and
    `new` too. A kill between the two renames leaves both, as hidden siblings of `dst` (the next write keeps
    the old one, `remove_stale_temporaries`)."""
    if not dst.exists():
        os.replace(new, dst)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-old-{_owner()}-", dir=dst.parent))
    os.replace(dst, aside)  # onto the empty folder mkdtemp reserved
    try:
        os.replace(new, dst)
    except BaseException:
        os.replace(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def save_flax_checkpoint(dst: str | os.PathLike, params: Any, config: Mapping[str, Any],
                         overwrite: bool = False) -> Path:
    """Writes `dst/params` (orbax) and `dst/config.json`; `dst` appears only when complete.

    params: numpy arrays, or jax arrays this process holds whole (they are written from the host).
    """
    dst = Path(dst).absolute()
    check_destination(dst, overwrite)  # before the params are copied to the host
    import jax

    ocp = _orbax()
    host = jax.tree.map(np.asarray, params)  # no copy for numpy or single-device CPU arrays
    quiet = _NoOcdbtMergeNotice()
    logging.getLogger("absl").addFilter(quiet)
    try:
        with (atomic_folder(dst, config, overwrite, converted_checkpoint_refusal) as tmp,
              _host_array_checkpointer() as ckptr):
            ckptr.save(tmp / "params", args=ocp.args.PyTreeSave(host, save_args=chunked_save_args(host)))
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    return dst


def load_flax_checkpoint(path: str | os.PathLike, target: Any = None) -> tuple[dict, Any]:
    """Reads (config dict, params). `target` (abstract arrays with shardings) restores sharded."""
    path = Path(path).absolute()
    if not is_flax_checkpoint(path):
        raise ConversionError(f"{path}: not a converted checkpoint (needs config.json and params/)")
    ocp = _orbax()
    with reporting_damage(path, CONVERT_AGAIN):
        with open(path / "config.json") as f:
            config = json.load(f)
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path / "params", target)
    return config, params


def is_flax_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / "params").is_dir()


def saved_params_metadata(path: str | os.PathLike) -> Any:
    """The params tree of our checkpoint at `path` with orbax ArrayMetadata leaves (shape, dtype), read
    without loading any array."""
    ocp = _orbax()
    path = Path(path).absolute()
    with reporting_damage(path, CONVERT_AGAIN), ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(path / "params").item_metadata
        if metadata is None:  # what orbax makes of a missing params/_METADATA
            raise FileNotFoundError(f"no metadata file {path / 'params' / '_METADATA'}")
        return metadata.tree


# What reading a converted checkpoint with missing or cut files advises.
CONVERT_AGAIN = "convert it again (or copy it again whole)"
# tensorstore's statuses (raised as ValueError) for array files that are missing (NOT_FOUND), cut short
# (FAILED_PRECONDITION: a truncated compressed chunk; OUT_OF_RANGE: a byte range past the end of an OCDBT
# file) or corrupt (DATA_LOSS).
DAMAGE_STATUSES = ("NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE")


def storage_damage(error: BaseException) -> BaseException | None:
    """The error in `error` or its chain of causes saying that files of a checkpoint are missing or damaged
    (a tensorstore DAMAGE_STATUSES error, a missing file, unreadable JSON), or None. orbax raises
    tensorstore's errors as they are, or, restoring onto devices, as the cause of a bare Exception."""
    while error is not None:
        if isinstance(error, FileNotFoundError | json.JSONDecodeError):
            return error
        if isinstance(error, ValueError) and str(error).lstrip().startswith(DAMAGE_STATUSES):
            return error
        error = error.__cause__
    return None


@contextlib.contextmanager
def reporting_damage(where: str | os.PathLike, advice: str,
                     error_type: type[Exception] = ConversionError) -> Iterator[None]:
    """Raises an error inside that says files of the checkpoint `where` are missing or cut short
    (`storage_damage`) as one `error_type` line: "WHERE is damaged or incomplete (its first line); ADVICE".
    Other errors, and `error_type`'s own, pass unchanged."""
    try:
        yield
    except Exception as e:
        damage = None if isinstance(e, error_type) else storage_damage(e)
        if damage is None:
            raise
        reason = (str(damage).splitlines() or [""])[0][:200]
        raise error_type(
            f"{where} is damaged or incomplete ({type(damage).__name__}: {reason}); {advice}") from e


def flatten(params: Mapping) -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _as_is(key: str, array: np.ndarray) -> np.ndarray:
    return array


def write_safetensors_folder(dst: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                             config: Mapping[str, Any], weights_name: str,
                             max_shard_bytes: int = 2 * 2**30, name: Callable[[str], str] = str,
                             layout: Callable[[str, np.ndarray], np.ndarray] = _as_is,
                             overwrite: bool = False) -> Path:
    """A diffusers-style folder: config.json + one or several safetensors (with an index).

    Beside them, EXPORT_MARKER lists the folder's files. An existing `dst` is replaced only with
    `overwrite`, and only if it is empty or such a folder (`export_refusal`).

    Each tensor is stored under `name(key)` in `layout(key, array)` (a transpose, say; same byte size),
    made when its shard is written: one shard of laid-out copies exists at a time, so the writer needs
    about `max_shard_bytes` on top of `tensors`, not a second copy of them.
    """
    from safetensors.numpy import save_file

    dst = Path(dst).absolute()
    shards, size = [[]], 0
    for key in sorted(tensors, key=name):
        if shards[-1] and size + tensors[key].nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += tensors[key].nbytes
    stem = weights_name.removesuffix(".safetensors")
    files = [weights_name] if len(shards) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_folder(dst, config, overwrite, export_refusal) as tmp:
        total = 0
        for keys, file in zip(shards, files):
            shard = {name(k): np.ascontiguousarray(layout(k, tensors[k])) for k in keys}
            save_file(shard, str(tmp / file))
            give_default_mode(tmp / file)  # safetensors 0.8 writes 0o600 whatever the umask (its issue #782)
            total += sum(a.nbytes for a in shard.values())
            del shard  # before the next shard is built
        if len(shards) > 1:
            weight_map = {name(k): file for keys, file in zip(shards, files) for k in keys}
            files.append(f"{weights_name}.index.json")
            with open(tmp / files[-1], "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(tmp / EXPORT_MARKER, "w") as f:
            json.dump({"written_by": "GenMask-JAX convert.checkpoint_io.write_safetensors_folder",
                       "files": sorted([*files, "config.json"])}, f, indent=2)
    return dst


def convert_and_save(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool,
                     convert: Callable[[], tuple[Any, Any]], save: Callable[..., Path]) -> int:
    """The converter CLIs' common tail: refuse a DST overlapping SRC or existing, convert, save, say so in
    one line.

    `convert()` returns (config with `to_dict()`, params); `save(dst, config, params, overwrite=...)`
    writes them. Returns the exit status; a ConversionError becomes one `error:` line on stderr.
    """
    try:
        check_apart(src, dst)  # before converting
        check_destination(dst, overwrite)
        config, params = convert()
        out = save(dst, config, params, overwrite=overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    count = sum(np.size(v) for v in flatten(params).values())
    print(f"wrote {out}: {count:,} parameters, config {json.dumps(config.to_dict())}")
    return 0
