"""WAN 2.1 DiT checkpoints (diffusers or original Wan-AI layout) <-> our Flax checkpoints.

    python -m convert.wan_dit SRC DST [--layout auto|diffusers|original] [--scan-layers]
        [--num-heads N] [--param-dtype float32] [--text-dim N --reinit-text-embedding] [--overwrite]

SRC is a diffusers `transformer/` folder (or the pipeline folder above it), an original-layout folder,
or a single `.safetensors` / `.pth` file (keys optionally prefixed `model.diffusion_model.`), in fp32,
bf16 or fp8, upcast to --param-dtype. Scaled-fp8 repackagings (ComfyUI's `scaled_fp8` files and its
per-layer `comfy_quant` ones) are dequantised: an fp8 weight times its per-tensor scale. The config
is inferred from the tensor shapes. The head count cannot be: it is read from a `config.json` next to
the weights (--num-heads, if given, must agree with it); without one (original-layout files) it is
--num-heads, else head_dim 128 (true of every released WAN 2.1 model). DST gets `params/` (orbax) and
`config.json`, written atomically after every check passed; it may not be SRC, inside it or hold it.
`export_diffusers` writes our params back as a diffusers folder, bit-exactly.
"""

import argparse
import dataclasses
import functools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convert import checkpoint_io as io
from convert.checkpoint_io import ConversionError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PREFIX = "model.diffusion_model."
IMAGE_BRANCH = ("img_emb", "k_img", "v_img", "norm_k_img", "image_embedder", "add_k_proj", "add_v_proj",
                "norm_added_k", "norm_added_q")
# Scaled-fp8 repackagings (ComfyUI) store a linear weight W as fp8(W / s) beside its per-tensor scale s
# under one of these names, so W = fp8 * s. Their activation scales (used only by fp8 matmuls), per-layer
# format tags and the file's format marker are read past.
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
QUANT_TAG_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
QUANT_MARKER = "scaled_fp8"
FP8 = ("float8_e4m3fn", "float8_e5m2")
_BLOCK = re.compile(r"^blocks_(\d+)$")


# ---------------------------------------------------------------------------------------------
# Names: our Flax paths ('blocks_3/attn1/to_out/kernel') -> diffusers keys -> original keys.


def diffusers_key(path: str) -> str:
    """Our unscanned Flax parameter path -> the diffusers state-dict key."""
    *mods, leaf = path.split("/")
    if leaf != "scale_shift_table":
        leaf = "bias" if leaf == "bias" else "weight"
    out = []
    for i, mod in enumerate(mods):
        block = _BLOCK.match(mod)
        if block:
            out += ["blocks", block.group(1)]
        elif mod == "to_out":
            out += ["to_out", "0"]
        elif mods[i - 1:i] == ["ffn"]:
            out += {"proj_in": ["net", "0", "proj"], "proj_out": ["net", "2"]}[mod]
        else:
            out.append(mod)
    return ".".join([*out, leaf])


_ORIGINAL_RENAMES = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o."),
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".norm2.", ".norm3."),  # the cross-attention norm is norm3 in the original code
)


def original_key(key: str) -> str:
    """diffusers key -> original Wan-AI key."""
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return "head.head." + key.removeprefix("proj_out.")
    if key.startswith("blocks.") and key.endswith(".scale_shift_table"):
        return key.removesuffix("scale_shift_table") + "modulation"
    for old, new in _ORIGINAL_RENAMES:
        key = key.replace(old, new)
    return key


def to_flax(path: str, w: np.ndarray) -> np.ndarray:
    """A PyTorch tensor -> the layout of our parameter at `path`."""
    if path == "patch_embedding/kernel":
        return io.conv_to_flax(w)
    if path.endswith("/kernel"):
        return io.linear_to_flax(w)
    return w


def from_flax(path: str, w: np.ndarray) -> np.ndarray:
    if path == "patch_embedding/kernel":
        return io.conv_from_flax(w)
    if path.endswith("/kernel"):
        return np.ascontiguousarray(w.T)
    return w


# ---------------------------------------------------------------------------------------------
# Reading the source.


@dataclasses.dataclass
class Source:
    """A located checkpoint: where its tensors are, their shapes, layout and any config.json."""

    path: Path
    layout: str
    shapes: dict[str, tuple[int, ...]]  # the model's tensors; keys without PREFIX
    json_config: dict[str, Any]
    scales: dict[str, str] = dataclasses.field(default_factory=dict)  # fp8 weight key -> its scale's key


def _weights_location(path: Path) -> Path:
    """A diffusers pipeline folder -> its transformer/ folder; anything else unchanged."""
    if path.is_dir() and not (path / "config.json").exists() and (path / "transformer").is_dir():
        return path / "transformer"
    return path


def weight_scales(path: Path, entries: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, str]:
    """fp8 weight key -> its scale's key in a scaled-fp8 repackaging (`entries`: key -> (shape, dtype)).

    Only an fp8 weight with one scale for the whole tensor is dequantised; other quantisations (int8,
    packed nvfp4, block-wise or per-channel scales) are refused, listed, rather than guessed at.
    """
    scales, problems = {}, []
    for key, (scale_shape, _) in sorted(entries.items()):
        suffix = next((s for s in WEIGHT_SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        weight = key.removesuffix(suffix) + ".weight"
        if weight not in entries:
            problems.append(f"{key} scales no {weight}")
        elif entries[weight][1] not in FP8:
            problems.append(f"{weight} is {entries[weight][1]}")
        elif math.prod(scale_shape) != 1:
            problems.append(f"{key} has shape {scale_shape}")
        else:
            scales[weight] = key
    if problems:
        raise ConversionError(f"{path}: quantised weights that are not fp8 with one scale per tensor, the "
                              f"only form converted ({len(problems)}): {'; '.join(problems)}")
    return scales


def _json_config(path: Path) -> dict[str, Any]:
    candidate = (path if path.is_dir() else path.parent) / "config.json"
    if not candidate.is_file():
        return {}
    try:
        with open(candidate) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{candidate}: unreadable config.json ({e})") from e


def detect_layout(keys: set[str]) -> str:
    if "condition_embedder.time_proj.weight" in keys or "scale_shift_table" in keys:
        return "diffusers"
    if "head.modulation" in keys or "time_projection.1.weight" in keys:
        return "original"
    sample = ", ".join(sorted(keys)[:5])
    raise ConversionError(f"unknown checkpoint layout: neither diffusers WanTransformer3DModel nor "
                          f"original Wan-AI DiT keys (found {len(keys)} keys, e.g. {sample})")


def open_source(path: str | Path, layout: str = "auto") -> Source:
    """Finds the tensors, reads their shapes (headers only for safetensors) and the layout."""
    if layout not in ("auto", "diffusers", "original"):
        raise ConversionError(f"unknown --layout {layout!r}: use auto, diffusers or original")
    path = _weights_location(Path(path))
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    entries = {k.removeprefix(PREFIX): v for k, v in io.tensor_entries(path).items()}
    scales = weight_scales(path, entries)
    shapes = {k: shape for k, (shape, _) in entries.items() if k not in scales.values()
              and k != QUANT_MARKER and not k.endswith(QUANT_TAG_SUFFIXES)}
    image = sorted(k for k in shapes if any(f".{p}." in f".{k}" for p in IMAGE_BRANCH))
    json_config = _json_config(path)
    if image or json_config.get("image_dim") or json_config.get("added_kv_proj_dim"):
        shown = ", ".join(image[:4]) or "config.json image_dim / added_kv_proj_dim"
        raise ConversionError(f"{path}: this is an image-to-video (I2V) checkpoint ({shown}, ...); "
                              "its image branch is not supported, convert a text-to-video DiT")
    if layout == "auto":
        layout = detect_layout(set(shapes))
    return Source(path, layout, shapes, json_config, scales)


def _source_key(key: str, layout: str) -> str:
    return key if layout == "diffusers" else original_key(key)


def infer_config(source: Source, num_heads: int | None = None, **overrides):
    """DiTConfig from the tensor shapes (plus config.json for the head count and eps)."""
    from genmask_jax.models.dit import DiTConfig

    k = lambda diffusers_name: _source_key(diffusers_name, source.layout)
    shapes = source.shapes
    needed = [k("patch_embedding.weight"), k("condition_embedder.text_embedder.linear_1.weight"),
              k("condition_embedder.time_embedder.linear_1.weight"), k("blocks.0.ffn.net.0.proj.weight"),
              k("proj_out.weight")]
    missing = [n for n in needed if n not in shapes]
    if missing:
        raise ConversionError(f"{source.path}: cannot infer the config, missing keys: {', '.join(missing)}")
    dim, in_channels, *patch = shapes[k("patch_embedding.weight")]
    cfg_json = source.json_config
    json_heads = cfg_json.get("num_attention_heads") or cfg_json.get("num_heads")
    if num_heads is not None and json_heads is not None and num_heads != json_heads:
        raise ConversionError(f"--num-heads {num_heads} disagrees with the config.json of {source.path} "
                              f"({json_heads} heads): leave --num-heads out")
    num_heads = num_heads if num_heads is not None else json_heads
    if num_heads is None:
        if dim % 128:
            raise ConversionError(f"{source.path}: dim {dim} is not a multiple of 128; pass --num-heads")
        num_heads = dim // 128
    blocks = {int(m.group(1)) for key in shapes if (m := re.match(r"blocks\.(\d+)\.", key))}
    fields = dict(
        patch_size=tuple(patch), in_channels=in_channels,
        out_channels=shapes[k("proj_out.weight")][0] // math.prod(patch),
        dim=dim, ffn_dim=shapes[k("blocks.0.ffn.net.0.proj.weight")][0],
        freq_dim=shapes[k("condition_embedder.time_embedder.linear_1.weight")][1],
        text_dim=shapes[k("condition_embedder.text_embedder.linear_1.weight")][1],
        num_heads=int(num_heads), num_layers=max(blocks) + 1 if blocks else 0,
        eps=float(cfg_json.get("eps", 1e-6)))
    fields.update(overrides)
    try:
        return DiTConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{source.path}: inferred an invalid config ({e})") from e


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Our unscanned parameter path -> shape, for `config` (nothing is allocated)."""
    return dict(_expected_shapes(dataclasses.replace(config, scan_layers=False, remat_policy="none")))


@functools.lru_cache(maxsize=16)  # tracing the init takes a while; conversion, export and restore ask again
def _expected_shapes(unscanned) -> dict[str, tuple[int, ...]]:
    import jax

    from genmask_jax.models.dit import init_params

    shapes = jax.eval_shape(lambda: init_params(unscanned, jax.random.key(0)))
    return {p: tuple(s.shape) for p, s in io.flatten(shapes).items()}


def _torch_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(from_flax(path, np.empty(shape, np.uint8)).shape)


def stacked_path(path: str) -> tuple[str, int | None]:
    """'blocks_3/attn1/...' -> ('blocks/attn1/...', 3); other paths unchanged with None."""
    head, _, rest = path.partition("/")
    block = _BLOCK.match(head)
    return (f"blocks/{rest}", int(block.group(1))) if block else (path, None)


def convert(source: Source, config, skip: set[str] = frozenset()) -> dict:
    """Streams the tensors of `source` into our (nested) params, stacked if config.scan_layers.

    skip: our parameter paths to leave out (e.g. a re-initialised text embedder).
    """
    flax_shapes = expected_shapes(config)
    by_source = {_source_key(diffusers_key(p), source.layout): p for p in flax_shapes}
    io.check_keys(set(source.shapes), set(by_source), f"{source.path} ({source.layout} layout)")
    io.check_shapes([(key, source.shapes[key], _torch_shape(p, flax_shapes[p]))
                     for key, p in sorted(by_source.items())
                     if tuple(source.shapes[key]) != _torch_shape(p, flax_shapes[p])],
                    f"{source.path}")
    dtype = np.dtype(config.param_dtype)
    scales = {}
    if source.scales:  # a pass over the scales alone, before the weights that need them stream
        scale_keys = set(source.scales.values())
        scale_values = io.iter_checkpoint(source.path, lambda k: k.removeprefix(PREFIX) in scale_keys)
        scales = {key.removeprefix(PREFIX): value.astype(np.float32).reshape(())
                  for key, value in scale_values}
    flat: dict[str, np.ndarray] = {}
    for key, value in io.iter_checkpoint(source.path, lambda k: k.removeprefix(PREFIX) in by_source):
        key = key.removeprefix(PREFIX)
        path = by_source[key]
        if path in skip:
            continue
        value = np.asarray(value)
        if key in source.scales:  # W = fp8 * s, in float32 (exact for the fp8 factor)
            value = value.astype(np.float32) * scales[source.scales[key]]
        value = to_flax(path, value).astype(dtype)
        if not config.scan_layers:
            flat[path] = value
            continue
        stacked, layer = stacked_path(path)
        if layer is None:
            flat[stacked] = value
        else:
            if stacked not in flat:
                flat[stacked] = np.empty((config.num_layers, *value.shape), dtype)
            flat[stacked][layer] = value
    return io.unflatten(flat)


def reinit_text_embedder(params: dict, config, seed: int = 0) -> dict:
    """Fresh random text-embedding MLP (`text_dim -> dim -> dim`) in `params`, as WanDiT.init makes it."""
    import jax

    from genmask_jax.models.dit import init_params

    fresh = init_params(dataclasses.replace(config, scan_layers=False, remat_policy="none",
                                            num_layers=0), jax.random.key(seed))
    params = dict(params)
    embedder = dict(params.get("condition_embedder", {}))
    text = fresh["condition_embedder"]["text_embedder"]
    embedder["text_embedder"] = jax.tree.map(lambda a: np.asarray(a, config.param_dtype), text)
    params["condition_embedder"] = embedder
    return params


def convert_checkpoint(src: str | Path, layout: str = "auto", num_heads: int | None = None,
                       scan_layers: bool = False, param_dtype: str = "float32",
                       text_dim: int | None = None, reinit_text_embedding: bool = False,
                       seed: int = 0, **config_overrides):
    """(DiTConfig, params) from a PyTorch-side checkpoint; raises ConversionError on bad input."""
    if text_dim is not None and (not isinstance(text_dim, int) or text_dim <= 0):
        raise ConversionError(f"--text-dim {text_dim}: must be a positive int")
    source = open_source(src, layout)
    config = infer_config(source, num_heads, scan_layers=scan_layers, param_dtype=param_dtype,
                          **config_overrides)
    skip: set[str] = set()
    if text_dim is not None and text_dim != config.text_dim and not reinit_text_embedding:
        raise ConversionError(f"--text-dim {text_dim} differs from the checkpoint's {config.text_dim}: "
                              "pass --reinit-text-embedding to train a new text embedder")
    if reinit_text_embedding:
        skip = {p for p in expected_shapes(config) if p.startswith("condition_embedder/text_embedder/")}
        source_config = config
        config = dataclasses.replace(config, text_dim=text_dim if text_dim is not None else config.text_dim)
        params = convert(source, source_config, skip)
        return config, reinit_text_embedder(params, config, seed)
    return config, convert(source, config)


# ---------------------------------------------------------------------------------------------
# Our checkpoints.


def save(dst: str | Path, config, params, overwrite: bool = False) -> Path:
    return io.save_flax_checkpoint(dst, params, config.to_dict(), overwrite=overwrite)


def load(path: str | Path, target: Any = None, **convert_kwargs):
    """(DiTConfig, params) from our converted checkpoint, or converted on the fly from PyTorch files.

    target: abstract params with shardings, to restore an orbax checkpoint directly sharded.
    convert_kwargs: `convert_checkpoint`'s options. A converted checkpoint is laid out (`scan_layers`) and
    cast (`param_dtype`) as they ask, if given, and its config says so; options that would change its
    weights or architecture (another text_dim or num_heads, reinit_text_embedding, a layout other than
    auto, config overrides it does not match) are refused in one ConversionError line: they apply when
    PyTorch files are converted.
    """
    from genmask_jax.models.dit import DiTConfig

    path = Path(path)
    if io.is_flax_checkpoint(path):
        config_dict, params = io.load_flax_checkpoint(path, target)
        return _as_asked(path, DiTConfig.from_dict(config_dict), params, **convert_kwargs)
    return convert_checkpoint(path, **convert_kwargs)


_NO_FIELD = object()


def _as_asked(path: Path, config, params: dict, scan_layers: bool | None = None,
              param_dtype: str | None = None, layout: str = "auto", num_heads: int | None = None,
              text_dim: int | None = None, reinit_text_embedding: bool = False, seed: int = 0,
              **config_overrides) -> tuple[Any, dict]:
    """A converted checkpoint's (config, params) in the layout and dtype asked for (`load`); the seed only
    matters with reinit_text_embedding."""
    import jax

    refused = [f"layout={layout!r}"] if layout != "auto" else []
    refused += [f"{name}={value!r}" for name, value in (("num_heads", num_heads), ("text_dim", text_dim))
                if value is not None and value != getattr(config, name)]
    refused += ["reinit_text_embedding=True"] if reinit_text_embedding else []
    refused += [f"{name}={value!r}" for name, value in config_overrides.items()
                if getattr(config, name, _NO_FIELD) != value]
    if refused:
        raise ConversionError(
            f"{path} is a converted checkpoint (text_dim {config.text_dim}, {config.num_heads} heads): "
            f"{', '.join(refused)} apply only when converting PyTorch files; convert those again")
    asked = {k: v for k, v in (("scan_layers", scan_layers), ("param_dtype", param_dtype)) if v is not None}
    try:
        config = dataclasses.replace(config, **asked)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path}: {e}") from e
    if scan_layers is not None:
        params = with_scan_layers(params, scan_layers)
    if param_dtype is not None:
        dtype = np.dtype(config.param_dtype)
        params = jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), params)
    return config, params


# diffusers' WanTransformer3DModel takes no RoPE theta: its WanRotaryPosEmbed keeps the default 10000.
DIFFUSERS_ROPE_THETA = 1e4


def check_exportable(config) -> None:
    """Raises ConversionError when diffusers' WanTransformer3DModel cannot compute what `config` does."""
    if config.rope_theta != DIFFUSERS_ROPE_THETA:
        raise ConversionError(
            f"rope_theta {config.rope_theta:g}: diffusers' WanTransformer3DModel always uses "
            f"{DIFFUSERS_ROPE_THETA:g} (it has no such setting), so the export would compute another model")


def diffusers_config(config) -> dict[str, Any]:
    """config.json of the equivalent diffusers WanTransformer3DModel (`check_exportable`)."""
    return {
        "_class_name": "WanTransformer3DModel", "patch_size": list(config.patch_size),
        "num_attention_heads": config.num_heads, "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "text_dim": config.text_dim, "freq_dim": config.freq_dim, "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
        "eps": config.eps, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def unstack(params: dict, config) -> dict[str, np.ndarray]:
    """Flat unscanned {path: array} from params (stacked or not), as numpy."""
    import jax

    params = jax.tree.map(np.asarray, params)
    return io.flatten(unstack_blocks(params) if config.scan_layers else params)


def stack_blocks(params: dict) -> dict:
    """Unscanned params (`blocks_0` ... `blocks_{L-1}`) in the nn.scan layout (`blocks`, every leaf with a
    leading layer axis); stacked params are returned as they are. numpy stays numpy, jax arrays jax."""
    import jax
    import jax.numpy as jnp

    layers = {int(m.group(1)): name for name in params if (m := _BLOCK.match(name))}
    if not layers:
        return dict(params)
    if sorted(layers) != list(range(len(layers))):
        raise ConversionError(f"blocks {sorted(layers)} are not numbered 0 .. {len(layers) - 1}")
    def stack(*xs):
        return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)

    out = {k: v for k, v in params.items() if k not in layers.values()}
    out["blocks"] = jax.tree.map(stack, *[params[layers[i]] for i in range(len(layers))])
    return out


def unstack_blocks(params: dict) -> dict:
    """The inverse of `stack_blocks`: `blocks` (leading layer axis) -> `blocks_0` ... `blocks_{L-1}`."""
    import jax

    if "blocks" not in params:
        return dict(params)
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(jax.tree.leaves(params["blocks"])[0].shape[0]):
        out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
    return out


def with_scan_layers(params: dict, scan_layers: bool) -> dict:
    """params in the scanned or unscanned layout, whichever they were in: the same weights either way."""
    return stack_blocks(params) if scan_layers else unstack_blocks(params)


def export_diffusers(params: dict, config, dst: str | Path, max_shard_bytes: int = 2 * 2**30,
                     overwrite: bool = False) -> Path:
    """Writes params as a diffusers `transformer/` folder (config.json + safetensors), exactly.

    Tensors take the PyTorch layout shard by shard: about `max_shard_bytes` of host memory on top of
    the params (BENCHMARKS.md). An existing `dst` is replaced only with `overwrite`, and only if it is
    an earlier export (`io.export_refusal`). A config diffusers cannot represent is refused
    (`check_exportable`).
    """
    check_exportable(config)
    io.check_destination(dst, overwrite, io.export_refusal)  # before the params are copied to the host
    flat = unstack(params, config)
    expected = expected_shapes(config)
    io.check_keys(set(flat), set(expected), "params")
    io.check_shapes([(p, v.shape, expected[p]) for p, v in flat.items() if v.shape != expected[p]],
                    "params")
    return io.write_safetensors_folder(dst, flat, diffusers_config(config), WEIGHTS_NAME,
                                       max_shard_bytes=max_shard_bytes, name=diffusers_key, layout=from_flax,
                                       overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# CLI.


def _seed(text: str) -> int:
    """A seed JAX takes whole: without jax_enable_x64 it keeps the low 32 bits (2**32 + 7 draws as 7)."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 2**32)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("src", help="diffusers transformer/ folder, original folder or single file")
    parser.add_argument("dst", help="output folder (params/ + config.json)")
    parser.add_argument("--layout", default="auto", help="auto | diffusers | original")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="for a SRC without config.json (default: dim / 128); with one, it must agree")
    parser.add_argument("--scan-layers", action="store_true", help="stack the blocks for nn.scan")
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--text-dim", type=int, default=None)
    parser.add_argument("--reinit-text-embedding", action="store_true",
                        help="fresh random text embedder of --text-dim inputs (e.g. 3584 for Qwen2.5-VL)")
    parser.add_argument("--seed", type=_seed, default=0, help="of the re-initialised text embedder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is empty or a checkpoint converted here")
    args = parser.parse_args(argv)
    return io.convert_and_save(args.src, args.dst, args.overwrite, lambda: convert_checkpoint(
        args.src, layout=args.layout, num_heads=args.num_heads, scan_layers=args.scan_layers,
        param_dtype=args.param_dtype, text_dim=args.text_dim,
        reinit_text_embedding=args.reinit_text_embedding, seed=args.seed), save)

if __name__ == "__main__":
    sys.exit(main())
