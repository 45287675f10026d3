"""Instruction encoders: `encode(images, texts) -> (context (B, L, D), mask (B, L))`.

`toy` (deterministic, word-level, no download) for the built-in demo; `qwen2_5_vl` (transformers,
PyTorch) for the paper's setting; contexts of a whole data set can be precomputed into an embedding
cache (`python -m genmask_jax.encoders.precompute`) that the data pipelines read by example id.

Three functions of the `data.encoder` config are shared by every path that makes a context (the data
pipelines, the cache writer and its readers), so a cached context is the one the encoder would give:
`make_encoder` builds the encoder, `encoder_input` says what it reads for one example, `fingerprint`
lists every setting that changes a context (a cache records it and refuses a config that differs).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import re
import struct
import threading
import weakref

import numpy as np

from genmask_jax.encoders.base import (
    ContextError,
    EncoderUnavailable,
    InstructionEncoder,
    PromptTooLong,
    pad_or_truncate,
)

log = logging.getLogger(__name__)

ENCODERS = ("toy", "qwen2_5_vl")
# The default `data.encoder.max_pixels`, also for a config saved before the field existed: the VLM sees
# images of at most 448 x 448 pixels (why: `data.pipeline.default_data_config`).
DEFAULT_MAX_PIXELS = 448 * 448


def configured_max_pixels(config) -> int:
    """`data.encoder.max_pixels`, the default for a config without the field; 0 = the model's own."""
    return int(config.get("max_pixels", DEFAULT_MAX_PIXELS))


def model_name(model_path: str) -> str:
    """The folder name of a model path: the same weights sit at other paths on the machine that
    precomputes and the ones that train or evaluate ("Qwen/X" and "/models/X" are both "X")."""
    return os.path.basename(os.path.normpath(model_path)) if model_path else ""


# Bytes read from the middle of every tensor for `model_digest`: a fine-tune (a merged LoRA, a tuned
# vision tower) changes every element of the tensors it touches, so one sample of each tensor tells it
# apart from its base, where a few reads per file miss the tensors that changed.
_TENSOR_SAMPLE_BYTES = 256
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def safetensors_samples(path: str) -> list[bytes]:
    """The JSON header of a `.safetensors` file, then `_TENSOR_SAMPLE_BYTES` from the middle of each
    tensor's data, in file order: the header plus 256 bytes a tensor (about 0.3 MiB for Qwen2.5-VL-7B's
    ~730 tensors). Raises ValueError for a file that is not safetensors (layout: uint64 header length
    N | N bytes of JSON {name: {"data_offsets": [begin, end], ...}} | data, offsets from its start)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
        if not 0 < n <= min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        header_bytes = f.read(n)
        header = json.loads(header_bytes)
        ranges = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
        samples = [header_bytes]
        for begin, end in ranges:
            start = max(begin, (begin + end - _TENSOR_SAMPLE_BYTES) // 2)
            f.seek(8 + n + start)
            samples.append(f.read(min(_TENSOR_SAMPLE_BYTES, end - start)))
    return samples


def model_digest(model_path: str) -> str | None:
    """A digest of a local model folder's weights: its config.json, its weight index and, of each
    `*.safetensors` file, the name, the size, the header (names, shapes, dtypes) and a sample of every
    tensor (`safetensors_samples`). None for a hub id, a missing folder, or one whose weights are absent
    or unreadable (a host that only reads the cache may hold the config alone): "unknown", which the
    cache does not compare, rather than "different".

    Tells apart models in folders of the same name (`model_name`: two runs' `checkpoint-1000`, whose
    configs and file sizes agree, or a base and its merged LoRA) while reading well under 1 MiB; copies
    of one folder share it."""
    if not model_path or not os.path.isdir(model_path):
        return None
    weights = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not weights:
        return None
    h = hashlib.sha256()
    try:
        for name in ("config.json", "model.safetensors.index.json"):
            path = os.path.join(model_path, name)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
        for path in weights:
            h.update(f"{os.path.basename(path)}\0{os.path.getsize(path)}\0".encode())
            for sample in safetensors_samples(path):
                h.update(sample)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a dangling link, a half-synced folder
        log.warning("cannot read the model files in %s (%s): the cache compares the name", model_path, e)
        return None
    return h.hexdigest()[:16]


# The files that turn an instruction and an image into the model's input ids and pixels: the tokenizer,
# the chat template (which holds the system prompt) and the image processor's settings.
PROMPT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def prompt_files_digest(model_path: str) -> str | None:
    """A digest of the `PROMPT_FILES` a local model folder holds (names and contents); None for a hub
    id, a missing folder or one that holds none of them (unknown, as in `model_digest`)."""
    if not model_path or not os.path.isdir(model_path):
        return None
    present = [n for n in PROMPT_FILES if os.path.isfile(os.path.join(model_path, n))]
    if not present:
        return None
    h = hashlib.sha256()
    try:
        for name in present:
            with open(os.path.join(model_path, name), "rb") as f:
                content = f.read()
            h.update(f"{name}\0{len(content)}\0".encode() + content)
    except OSError as e:
        log.warning("cannot read the prompt files in %s (%s): the cache compares the rest", model_path, e)
        return None
    return h.hexdigest()[:16]


# Qwen2VLImageProcessor's bounds where a preprocessor_config.json leaves one out.
_PROCESSOR_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}


def image_pixel_bounds(model_path: str, max_pixels: int) -> tuple[int | None, int | None]:
    """(min, max) pixels of an image after the Qwen image processor's resize: `max_pixels` where set
    (the encoder passes it on; 0 = the model's own), the rest as transformers reads the folder's
    preprocessor_config.json (a top-level `min_pixels` / `max_pixels` over `size`'s `shortest_edge` /
    `longest_edge`). None where it is unknown here: a hub id or a folder not on this machine."""
    path = os.path.join(model_path, "preprocessor_config.json") if model_path else ""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None, max_pixels or None
    size = {**_PROCESSOR_PIXELS, **(saved.get("size") or {})}
    low = saved.get("min_pixels") if saved.get("min_pixels") is not None else size["shortest_edge"]
    high = saved.get("max_pixels") if saved.get("max_pixels") is not None else size["longest_edge"]
    return int(low), int(max_pixels or high)


# Packages each encoder imports that requirements.txt may leave out (torch: its build depends on the
# machine, and only the Qwen encoder and .pth conversion need it).
_PACKAGES = {"toy": (), "qwen2_5_vl": ("torch", "transformers")}
_INSTALL = {"torch": "torch==2.13.0", "transformers": "'transformers>=5.24.0,<6'"}


def check_available(config) -> None:
    """Raises EncoderUnavailable when the `data.encoder` config's encoder cannot run here: a package it
    needs is missing, or its model folder (`check_model_folder`). Cheap (nothing is imported), so commands
    call it before they load a checkpoint or build a model."""
    missing = [p for p in _PACKAGES.get(config.name, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise EncoderUnavailable(
            f"the {config.name!r} encoder (data.encoder.name) needs {' and '.join(missing)}, which is not "
            f"installed: pip install {' '.join(_INSTALL[p] for p in missing)} (requirements.txt leaves torch "
            "out: pick the build for this machine, e.g. --index-url https://download.pytorch.org/whl/cpu)"
        )
    if config.name == "qwen2_5_vl":
        check_device(configured_device(config))
        check_model_folder(config.model_path)


# `data.encoder.device`, where the Qwen encoder runs: "auto" (`qwen2_5_vl.resolve_device`), "cpu", "cuda"
# or "cuda:N". Not in the `fingerprint`: a device changes a context by rounding alone, as the batch does.
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def configured_device(config) -> str:
    """`data.encoder.device`; "auto" for a config saved before the field existed."""
    return str(config.get("device", "auto"))


def check_device(device: str) -> None:
    """Raises EncoderUnavailable unless `device` is a `data.encoder.device` value (cheap: no torch)."""
    if not _DEVICE.fullmatch(device):
        raise EncoderUnavailable(
            f"data.encoder.device={device!r}: use auto, cpu, cuda or cuda:N (auto: cuda where torch has "
            "it and JAX does not run on the GPU in this process)"
        )


def check_model_folder(model_path: str) -> None:
    """Raises EncoderUnavailable unless `model_path` (`data.encoder.model_path`) is a local model folder
    with a config.json. Models are never downloaded: given anything else, transformers would take it for
    a hub id and fail with a long traceback about repo ids."""
    if not model_path:
        raise EncoderUnavailable("data.encoder.model_path is empty: give the local Qwen2.5-VL model folder")
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        what = "holds no config.json" if os.path.isdir(model_path) else "is not a folder on this machine"
        raise EncoderUnavailable(
            f"data.encoder.model_path {model_path} {what}: give the local Qwen2.5-VL model folder (models "
            "are not downloaded)"
        )


# The encoders `make_encoder` built, by their constructors' arguments, while a consumer holds them (weak
# references: dropping the last consumer, `del segmenter` in a notebook, frees the 16.6 GB VLM), and the
# lock that builds one at a time: the consumers of one process (a run's data pipelines, quick evaluation
# and sample prompts) each call `make_encoder`, and each loaded its own copy of the VLM.
_BUILT: weakref.WeakValueDictionary[tuple, InstructionEncoder] = weakref.WeakValueDictionary()
_BUILD_LOCK = threading.Lock()


def make_encoder(config) -> InstructionEncoder:
    """The encoder named by `config.name` from the `data.encoder` config, shared within a process for the
    same settings: while a consumer holds the encoder of a first call, a second call returns it (the Qwen
    encoder serializes its `encode` calls, so threads may share it). It lives as long as a consumer holds
    it: a caller that builds consumers one after another (the splits of an evaluation) keeps one
    reference meanwhile, or each loads the model again."""
    check_available(config)
    if config.name == "toy" and config.get("rewrite_reasoning", False):
        raise ValueError("data.encoder.rewrite_reasoning needs a VLM: the toy encoder cannot rewrite")
    if config.name not in ENCODERS:
        raise ValueError(f"unknown encoder {config.name!r}; expected one of {ENCODERS}")
    arguments = _encoder_arguments(config)
    key = (config.name, *sorted(arguments.items()))
    with _BUILD_LOCK:
        encoder = _BUILT.get(key)
        if encoder is None:
            encoder = _BUILT[key] = _build(config.name, arguments)
        return encoder


def _encoder_arguments(config) -> dict:
    """The constructor's arguments of the encoder `config.name`, from the `data.encoder` config."""
    if config.name == "toy":
        return dict(context_length=config.context_length, dim=config.dim, seed=config.seed)
    return dict(
        model_path=config.model_path,
        context_length=config.context_length,
        dtype=config.dtype,
        rewrite_max_new_tokens=config.rewrite_max_new_tokens,
        device=configured_device(config),
        max_pixels=configured_max_pixels(config) or None,
    )


def _build(name: str, arguments: dict) -> InstructionEncoder:
    if name == "toy":
        from genmask_jax.encoders.toy import ToyEncoder

        return ToyEncoder(**arguments)
    from genmask_jax.encoders.qwen2_5_vl import Qwen25VLEncoder

    return Qwen25VLEncoder(**arguments)


def encoder_input(example: dict, task: str, config) -> tuple[np.ndarray | None, str, bool]:
    """`(image or None, text, rewrite first)`: what the encoder reads for one source example.

    Segmentation encodes the image with the instruction; generation the caption alone (the image is
    what gets generated). The two-stage rewrite (`config.rewrite_reasoning`) applies to ReasonSeg's
    long reasoning queries (`is_sentence`) only, and the VLM rewrites the raw `query`, not the
    template-wrapped `text`.
    """
    with_image = task == "seg" and config.name != "toy"
    image = example["image"] if with_image else None
    if task == "seg" and config.get("rewrite_reasoning", False) and example.get("is_sentence", False):
        return image, example.get("query", example["text"]), True
    return image, example["text"], False


def fingerprint(config) -> dict:
    """Every `data.encoder` setting and model file that changes a context, as a JSON-able dict (the
    cache's key); for Qwen also `PROMPT_VERSION`, how this code builds its prompts."""
    if config.name == "toy":
        return {
            "encoder": "toy",
            "context_length": config.context_length,
            "dim": config.dim,
            "seed": config.seed,
        }
    if config.name == "qwen2_5_vl":
        from genmask_jax.encoders.qwen2_5_vl import PROMPT_VERSION, REWRITE_DECODING, REWRITE_PROMPT

        rewrite = bool(config.get("rewrite_reasoning", False))
        min_pixels, max_pixels = image_pixel_bounds(config.model_path, configured_max_pixels(config))
        # The digests and pixel bounds are None where the folder is not on this machine (a host that
        # only reads the cache): the cache then compares what is known (`cache._WHEN_KNOWN`).
        return {
            "encoder": "qwen2_5_vl",
            "prompt_version": PROMPT_VERSION,
            "model": model_name(config.model_path),
            "model_digest": model_digest(config.model_path),
            "prompt_files_digest": prompt_files_digest(config.model_path),
            "context_length": config.context_length,
            "dtype": config.dtype,
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "rewrite_reasoning": rewrite,
            "rewrite_prompt": REWRITE_PROMPT if rewrite else None,
            "rewrite_max_new_tokens": config.rewrite_max_new_tokens if rewrite else None,
            # absent from caches written while the model folder's generation_config.json steered it
            "rewrite_decoding": REWRITE_DECODING if rewrite else None,
        }
    raise ValueError(f"unknown encoder {config.name!r}; expected one of {ENCODERS}")


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ENCODERS",
    "ContextError",
    "EncoderUnavailable",
    "InstructionEncoder",
    "PromptTooLong",
    "check_available",
    "check_device",
    "check_model_folder",
    "configured_device",
    "configured_max_pixels",
    "encoder_input",
    "fingerprint",
    "image_pixel_bounds",
    "make_encoder",
    "model_digest",
    "model_name",
    "pad_or_truncate",
    "prompt_files_digest",
]
