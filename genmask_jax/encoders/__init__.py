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
import logging
import os

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


# Reads per weight file for `model_digest`: a fine-tune changes every tensor, so any sample tells it
# apart from its base; the first read also covers the safetensors header.
_SAMPLES, _SAMPLE_BYTES = 8, 4096


def model_digest(model_path: str) -> str | None:
    """A digest of a local model folder: its config.json, its weight index and, of each `*.safetensors`
    file, the name, the size and `_SAMPLES` evenly spaced 4 KiB reads. None for a hub id, a missing
    folder, or one whose weights are absent or unreadable (a host that only reads the cache may hold
    the config alone): "unknown", which the cache does not compare, rather than "different".

    Tells apart models in folders of the same name (`model_name`: two runs' `checkpoint-1000`, whose
    configs and file sizes agree) while reading well under 1 MiB; copies of one folder share it."""
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
            size = os.path.getsize(path)
            h.update(f"{os.path.basename(path)}\0{size}\0".encode())
            with open(path, "rb") as f:
                for i in range(_SAMPLES):
                    f.seek(max(0, size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                    h.update(f.read(_SAMPLE_BYTES))
    except OSError as e:  # a dangling link of a copied HF snapshot, a half-synced folder
        log.warning("cannot read the model files in %s (%s): the cache compares the name", model_path, e)
        return None
    return h.hexdigest()[:16]


# Packages each encoder imports that requirements.txt may leave out (torch: its build depends on the
# machine, and only the Qwen encoder and .pth conversion need it).
_PACKAGES = {"toy": (), "qwen2_5_vl": ("torch", "transformers")}
_INSTALL = {"torch": "torch==2.13.0", "transformers": "'transformers>=5.24.0,<6'"}


def check_available(config) -> None:
    """Raises EncoderUnavailable when a package the `data.encoder` config's encoder needs is missing:
    cheap (nothing is imported), so commands call it before they load a checkpoint or build a model."""
    missing = [p for p in _PACKAGES.get(config.name, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise EncoderUnavailable(
            f"the {config.name!r} encoder (data.encoder.name) needs {' and '.join(missing)}, which is not "
            f"installed: pip install {' '.join(_INSTALL[p] for p in missing)} (requirements.txt leaves torch "
            "out: pick the build for this machine, e.g. --index-url https://download.pytorch.org/whl/cpu)"
        )


def make_encoder(config) -> InstructionEncoder:
    """Builds the encoder named by `config.name` from the `data.encoder` config."""
    check_available(config)
    if config.name == "toy":
        from genmask_jax.encoders.toy import ToyEncoder

        if config.get("rewrite_reasoning", False):
            raise ValueError("data.encoder.rewrite_reasoning needs a VLM: the toy encoder cannot rewrite")
        return ToyEncoder(context_length=config.context_length, dim=config.dim, seed=config.seed)
    if config.name == "qwen2_5_vl":
        from genmask_jax.encoders.qwen2_5_vl import Qwen25VLEncoder

        return Qwen25VLEncoder(
            config.model_path,
            context_length=config.context_length,
            dtype=config.dtype,
            rewrite_max_new_tokens=config.rewrite_max_new_tokens,
            max_pixels=configured_max_pixels(config) or None,
        )
    raise ValueError(f"unknown encoder {config.name!r}; expected one of {ENCODERS}")


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
    """Every `data.encoder` setting that changes a context, as a JSON-able dict (the cache's key)."""
    if config.name == "toy":
        return {"encoder": "toy", "context_length": config.context_length, "dim": config.dim,
                "seed": config.seed}
    if config.name == "qwen2_5_vl":
        from genmask_jax.encoders.qwen2_5_vl import REWRITE_PROMPT

        rewrite = bool(config.get("rewrite_reasoning", False))
        return {
            "encoder": "qwen2_5_vl",
            "model": model_name(config.model_path),
            # None where the folder is not on this machine (a host that only reads the cache): the cache
            # then compares the name alone (`cache._WHEN_KNOWN`)
            "model_digest": model_digest(config.model_path),
            "context_length": config.context_length,
            "dtype": config.dtype,
            "max_pixels": configured_max_pixels(config),
            "rewrite_reasoning": rewrite,
            "rewrite_prompt": REWRITE_PROMPT if rewrite else None,
            "rewrite_max_new_tokens": config.rewrite_max_new_tokens if rewrite else None,
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
    "configured_max_pixels",
    "encoder_input",
    "fingerprint",
    "make_encoder",
    "model_digest",
    "model_name",
    "pad_or_truncate",
]
