"""WAN 2.1 VAE checkpoints (diffusers or original Wan-AI layout) <-> our Flax checkpoints.

    python -m convert.wan_vae SRC DST [--layout auto|diffusers|original] [--overwrite]

SRC is a diffusers `vae/` folder (safetensors or `.bin` weights; or the pipeline folder above it) or its
weights file, the original `Wan2.1_VAE.pth`, or an original-layout safetensors file (ComfyUI's
`wan_2.1_vae.safetensors`, bf16 is fine). Diffusers weights bring the config.json of their folder;
otherwise the config is inferred from the tensor shapes (latent statistics: WAN 2.1's when z_dim is
16). DST gets `params/` (orbax) and `config.json`, written atomically after every check passed; it
may not be SRC, inside it or hold it. `export_diffusers` writes our params back as a diffusers folder,
bit-exactly. Parameters are `{"params": ...}`, ready for `WanVAE(config).apply`.
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convert import checkpoint_io as io
from convert.checkpoint_io import ConversionError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CLASS = "AutoencoderKLWan"
ORIGINAL_PREFIXES = ("first_stage_model.", "vae.", "model.")
_INDEXED = ("down_blocks", "up_blocks", "resnets", "attentions", "upsamplers")
_INDEXED_PATH = re.compile(rf"^({'|'.join(_INDEXED)})_(\d+)$")
_RESIDUAL_ORIGINAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
                      "conv2": "residual.6", "conv_shortcut": "shortcut"}
_TOP_ORIGINAL = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_CODER_ORIGINAL = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}


def _vae():
    from genmask_jax.models import vae

    return vae


# ---------------------------------------------------------------------------------------------
# Names: our Flax paths ('decoder/up_blocks_0/upsamplers_0/resample/kernel') -> diffusers keys
# ('decoder.up_blocks.0.upsamplers.0.resample.1.weight') -> original keys ('decoder.upsamples.3...').


def diffusers_key(path: str) -> str:
    """Our Flax parameter path -> the diffusers AutoencoderKLWan state-dict key."""
    *mods, leaf = path.split("/")
    out = []
    for mod in mods:
        indexed = _INDEXED_PATH.match(mod)
        if indexed:
            out += [indexed.group(1), indexed.group(2)]
        elif mod == "resample":
            out += ["resample", "1"]  # nn.Sequential(pad or upsample, conv)
        else:
            out.append(mod)
    return ".".join([*out, "weight" if leaf == "kernel" else leaf])


def original_key(key: str, num_res_blocks: int) -> str:
    """diffusers key -> the original Wan-AI key (`wan/modules/vae.py` module names)."""
    parts = key.split(".")
    if parts[0] in _TOP_ORIGINAL:
        return ".".join([_TOP_ORIGINAL[parts[0]], *parts[1:]])
    coder, name, rest = parts[0], parts[1], parts[2:]
    if name in _CODER_ORIGINAL:
        return ".".join([coder, _CODER_ORIGINAL[name], *rest])
    if name == "mid_block":
        index = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}[".".join(rest[:2])]
        return ".".join([coder, "middle", index, *_residual_original(rest[2:])])
    if name == "down_blocks":
        return ".".join([coder, "downsamples", rest[0], *_residual_original(rest[1:])])
    # decoder.up_blocks.L.{resnets.R | upsamplers.0}.* -> decoder.upsamples.J.* (one flat list)
    level, kind, index, tail = int(rest[0]), rest[1], int(rest[2]), rest[3:]
    flat = level * (num_res_blocks + 2) + (index if kind == "resnets" else num_res_blocks + 1)
    return ".".join([coder, "upsamples", str(flat), *_residual_original(tail)])


def _residual_original(tail: list[str]) -> list[str]:
    if tail and tail[0] in _RESIDUAL_ORIGINAL:
        return [_RESIDUAL_ORIGINAL[tail[0]], *tail[1:]]
    return tail


def to_flax(path: str, w: np.ndarray) -> np.ndarray:
    """PyTorch tensor -> our layout: conv weights (O, I, *k) -> (*k, I, O); gammas (C, 1, ..) -> (C,)."""
    if path.endswith("/kernel"):
        return io.conv_to_flax(w)
    if path.endswith("/gamma"):
        return w.reshape(-1)
    return w


def from_flax(path: str, w: np.ndarray) -> np.ndarray:
    """Inverse of `to_flax` (the attention norm's gamma is (C, 1, 1), the others (C, 1, 1, 1))."""
    if path.endswith("/kernel"):
        return io.conv_from_flax(w)
    if path.endswith("/gamma"):
        return w.reshape(-1, 1, 1) if "/attentions_" in path else w.reshape(-1, 1, 1, 1)
    return w


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Our parameter path (without the 'params/' root) -> shape (nothing is allocated)."""
    import flax.linen as nn

    abstract = nn.unbox(_vae().abstract_params(config))["params"]
    return {p: tuple(s.shape) for p, s in io.flatten(abstract).items()}


def _torch_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(from_flax(path, np.empty(shape, np.uint8)).shape)


# ---------------------------------------------------------------------------------------------
# Reading the source.


def _locate(path: Path) -> Path:
    """A diffusers pipeline folder -> its vae/ folder; anything else unchanged."""
    if path.is_dir() and not (path / "config.json").exists() and (path / "vae").is_dir():
        return path / "vae"
    return path


def _common_prefix(keys) -> str:
    """The one of ORIGINAL_PREFIXES every key starts with, else ''."""
    keys = list(keys)
    for prefix in ORIGINAL_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a .pth / safetensors file or folder, common original prefixes removed."""
    tensors = dict(io.iter_checkpoint(path))
    if not tensors:
        raise ConversionError(f"{path}: holds no tensors")
    prefix = _common_prefix(tensors)
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


def detect_layout(keys: set[str], path: Path) -> str:
    """'diffusers' or 'original' from the key names (prefixes removed); else a ConversionError naming
    `path` and, for a DiT's weights, the VAE file beside them (the original Wan2.1 release folder)."""
    if "encoder.conv_in.weight" in keys or "post_quant_conv.weight" in keys:
        return "diffusers"
    if "encoder.conv1.weight" in keys or "encoder.downsamples.0.residual.0.gamma" in keys:
        return "original"
    sample = ", ".join(sorted(keys)[:5])
    hint = _dit_hint(path) if any(k.endswith("patch_embedding.weight") for k in keys) else ""  # both layouts
    raise ConversionError(f"{path}: unknown checkpoint layout: neither diffusers AutoencoderKLWan nor "
                          f"original Wan 2.1 VAE keys (found {len(keys)} keys, e.g. {sample}){hint}")


def _dit_hint(path: Path) -> str:
    """What to do with a DiT's weights given as the VAE: convert.wan_dit, and the VAE file beside them."""
    folder = path if path.is_dir() else path.parent
    vaes = sorted(str(p) for p in folder.iterdir() if p.is_file() and "vae" in p.name.lower()
                  and p.suffix in (*io.TORCH_SUFFIXES, ".safetensors"))
    there = f"; the VAE is likely {' or '.join(vaes)}: point SRC at it" if vaes else ""
    return f"; these are a WAN DiT's weights (convert.wan_dit converts them){there}"


def config_from_diffusers(d: dict[str, Any], where: str = "config.json"):
    """VAEConfig from a diffusers AutoencoderKLWan config.json (only WAN 2.1-style VAEs)."""
    unsupported = {
        "is_residual": (d.get("is_residual", False), False), "attn_scales": (d.get("attn_scales", []), []),
        "patch_size": (d.get("patch_size"), None), "in_channels": (d.get("in_channels", 3), 3),
        "out_channels": (d.get("out_channels", 3), 3),
        "decoder_base_dim": (d.get("decoder_base_dim") or d.get("base_dim", 96), d.get("base_dim", 96))}
    bad = [f"{k}={v!r} (supported: {ok!r})" for k, (v, ok) in unsupported.items() if v != ok]
    if bad:
        raise ConversionError(f"{where}: not a WAN 2.1 VAE config: " + "; ".join(bad))
    fields = {"base_dim": "base_dim", "z_dim": "z_dim", "dim_mult": "dim_mult",
              "num_res_blocks": "num_res_blocks", "temperal_downsample": "temporal_downsample",
              "latents_mean": "latents_mean", "latents_std": "latents_std"}
    kwargs = {ours: d[theirs] for theirs, ours in fields.items() if theirs in d}
    try:
        return _vae().VAEConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{where}: invalid VAE config ({e})") from e


def infer_config(shapes: dict[str, tuple[int, ...]], layout: str, where: str):
    """VAEConfig from the tensor shapes: widths, levels, res blocks and temporal downsampling."""
    vae = _vae()
    d = layout == "diffusers"
    conv_in = "encoder.conv_in.weight" if d else "encoder.conv1.weight"
    post = "post_quant_conv.weight" if d else "conv2.weight"
    blocks = "encoder.down_blocks." if d else "encoder.downsamples."
    residual_conv = "conv1.weight" if d else "residual.2.weight"
    missing = [k for k in (conv_in, post) if k not in shapes]
    if missing:
        raise ConversionError(f"{where}: cannot infer the config, missing keys: {', '.join(missing)}")
    base_dim, z_dim = shapes[conv_in][0], shapes[post][0]
    entries: dict[int, set[str]] = {}
    for key in shapes:
        if key.startswith(blocks):
            index, _, rest = key[len(blocks):].partition(".")
            entries.setdefault(int(index), set()).add(rest)
    levels, current, temporal = [], [], []
    for index in sorted(entries):
        rest = entries[index]
        if residual_conv in rest:
            current.append(shapes[f"{blocks}{index}.{residual_conv}"][0])
        elif "resample.1.weight" in rest:
            levels.append(current)
            current = []
            temporal.append("time_conv.weight" in rest)
    levels.append(current)
    counts = {len(level) for level in levels}
    if len(counts) != 1 or not all(levels) or any(w % base_dim for level in levels for w in level):
        raise ConversionError(f"{where}: cannot infer the encoder structure from {blocks}* "
                              f"(residual widths per level: {levels})")
    wan = z_dim == len(vae.WAN21_LATENTS_MEAN)
    try:
        return vae.VAEConfig(
            base_dim=base_dim, z_dim=z_dim, dim_mult=tuple(level[0] // base_dim for level in levels),
            num_res_blocks=counts.pop(), temporal_downsample=tuple(temporal),
            latents_mean=vae.WAN21_LATENTS_MEAN if wan else (0.0,) * z_dim,
            latents_std=vae.WAN21_LATENTS_STD if wan else (1.0,) * z_dim)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{where}: inferred an invalid config ({e})") from e


def _config_path(path: Path) -> Path:
    """The config.json of a folder, or the one beside a weights file (a file of a diffusers vae/ folder)."""
    return (path if path.is_dir() else path.parent) / "config.json"


def _json_config(path: Path) -> dict[str, Any] | None:
    """`_config_path(path)` read; None without one, or beside a file unless it is an AutoencoderKLWan's
    (the original Wan2.1 release keeps Wan2.1_VAE.pth beside its DiT's config.json; other tools write
    config.json files without a `_class_name`)."""
    candidate = _config_path(path)
    if not candidate.is_file():
        return None
    try:
        with open(candidate) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{candidate}: unreadable config.json ({e})") from e
    if path.is_file() and config.get("_class_name") != DIFFUSERS_CLASS:
        return None
    return config


def convert_checkpoint(src: str | Path, layout: str = "auto"):
    """(VAEConfig, {"params": ...}) from a PyTorch-side checkpoint; ConversionError on bad input.

    Keys of neither VAE layout (a DiT's folder, say) are refused before a tensor is read: safetensors
    keys come from the headers, and a torch file's tensors are memory-mapped (unless in torch's legacy,
    not zip, format)."""
    if layout not in ("auto", "diffusers", "original"):
        raise ConversionError(f"unknown --layout {layout!r}: use auto, diffusers or original")
    path = _locate(Path(src))
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    if io.torch_file(path) is None:  # safetensors: the keys from the headers, before a tensor is read
        keys = io.tensor_entries(path)
        prefix = _common_prefix(keys)
        found = detect_layout({k.removeprefix(prefix) for k in keys}, path)
        layout = found if layout == "auto" else layout
    tensors = _read_tensors(path)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if layout == "auto":
        layout = detect_layout(set(shapes), path)
    json_config = _json_config(path)
    if layout == "diffusers" and json_config is not None:
        config = config_from_diffusers(json_config, str(_config_path(path)))
    else:
        config = infer_config(shapes, layout, str(path))
    return config, params_from_state_dict(tensors, config, layout, f"{path} ({layout} layout)")


def params_from_state_dict(tensors: dict[str, np.ndarray], config, layout: str = "diffusers",
                           what: str = "state dict") -> dict:
    """{"params": ...} from PyTorch-side tensors (diffusers or original names) after checking them."""
    flax_shapes = expected_shapes(config)
    by_source = {}
    for p in flax_shapes:
        key = diffusers_key(p)
        by_source[key if layout == "diffusers" else original_key(key, config.num_res_blocks)] = p
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    io.check_keys(set(shapes), set(by_source), what)
    io.check_shapes([(k, shapes[k], _torch_shape(p, flax_shapes[p])) for k, p in sorted(by_source.items())
                     if shapes[k] != _torch_shape(p, flax_shapes[p])], what)
    dtype = np.dtype(config.param_dtype)
    flat = {p: to_flax(p, np.asarray(tensors[k])).astype(dtype) for k, p in by_source.items()}
    return {"params": io.unflatten(flat)}


# ---------------------------------------------------------------------------------------------
# Our checkpoints and the way back.


def save(dst: str | Path, config, params, overwrite: bool = False) -> Path:
    return io.save_flax_checkpoint(dst, params, config.to_dict(), overwrite=overwrite)


def load(path: str | Path, layout: str = "auto", target: Any = None):
    """(VAEConfig, {"params": ...}) from our converted checkpoint or, converted on the fly, from a
    diffusers folder / original file. target: abstract params with shardings for an orbax restore."""
    path = Path(path)
    if io.is_flax_checkpoint(path):
        config_dict, params = io.load_flax_checkpoint(path, target)
        return _vae().VAEConfig.from_dict(config_dict), params
    return convert_checkpoint(path, layout)


def diffusers_config(config) -> dict[str, Any]:
    """config.json of the equivalent diffusers AutoencoderKLWan."""
    return {
        "_class_name": DIFFUSERS_CLASS, "base_dim": config.base_dim, "decoder_base_dim": None,
        "z_dim": config.z_dim, "dim_mult": list(config.dim_mult),
        "num_res_blocks": config.num_res_blocks, "attn_scales": [],
        "temperal_downsample": list(config.temporal_downsample), "dropout": 0.0,
        "latents_mean": list(config.latents_mean), "latents_std": list(config.latents_std),
        "is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None,
        "scale_factor_temporal": config.temporal_factor, "scale_factor_spatial": config.spatial_factor,
    }


def export_diffusers(params: dict, config, dst: str | Path, overwrite: bool = False) -> Path:
    """Writes params (`{"params": ...}` or the inner tree) as a diffusers `vae/` folder, exactly.

    An existing `dst` is replaced only with `overwrite`, and only if it is an earlier export
    (`io.export_refusal`).
    """
    params = params.get("params", params)
    flat = {p: np.asarray(v) for p, v in io.flatten(params).items()}
    expected = expected_shapes(config)
    io.check_keys(set(flat), set(expected), "params")
    io.check_shapes([(p, v.shape, expected[p]) for p, v in flat.items() if v.shape != expected[p]],
                    "params")
    return io.write_safetensors_folder(dst, flat, diffusers_config(config), WEIGHTS_NAME, name=diffusers_key,
                                       layout=from_flax, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# CLI.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("src", help="diffusers vae/ folder, Wan2.1_VAE.pth or original-layout safetensors")
    parser.add_argument("dst", help="output folder (params/ + config.json)")
    parser.add_argument("--layout", default="auto", help="auto | diffusers | original")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is empty or a checkpoint converted here")
    args = parser.parse_args(argv)
    return io.convert_and_save(
        args.src, args.dst, args.overwrite, lambda: convert_checkpoint(args.src, layout=args.layout), save)

if __name__ == "__main__":
    sys.exit(main())
