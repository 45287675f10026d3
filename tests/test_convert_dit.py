"""convert.wan_dit: both PyTorch layouts, the exact export round trip, and every bad input."""

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from convert import checkpoint_io as io
from convert import wan_dit
from convert.checkpoint_io import ConversionError
from genmask_jax.models.dit import DiTConfig, WanDiT

sys.path.insert(0, str(Path(__file__).parent))
from test_dit import ATOL, RTOL, TINY, inputs, per_token_timesteps, tiny_diffusers_model, torch_forward  # noqa: E402, I001

DIM, FFN, TEXT, FREQ, LAYERS = 64, 128, TINY["text_dim"], TINY["freq_dim"], TINY["num_layers"]


def original_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """A random tiny T2V state dict with the original Wan-AI names (from its WanModel code, by hand)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "patch_embedding.weight": (DIM, 16, 1, 2, 2), "patch_embedding.bias": (DIM,),
        "text_embedding.0.weight": (DIM, TEXT), "text_embedding.0.bias": (DIM,),
        "text_embedding.2.weight": (DIM, DIM), "text_embedding.2.bias": (DIM,),
        "time_embedding.0.weight": (DIM, FREQ), "time_embedding.0.bias": (DIM,),
        "time_embedding.2.weight": (DIM, DIM), "time_embedding.2.bias": (DIM,),
        "time_projection.1.weight": (6 * DIM, DIM), "time_projection.1.bias": (6 * DIM,),
        "head.head.weight": (4 * 16, DIM), "head.head.bias": (4 * 16,), "head.modulation": (1, 2, DIM),
    }
    for i in range(LAYERS):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"blocks.{i}.{attn}.{proj}.weight"] = (DIM, DIM)
                shapes[f"blocks.{i}.{attn}.{proj}.bias"] = (DIM,)
            shapes[f"blocks.{i}.{attn}.norm_q.weight"] = (DIM,)
            shapes[f"blocks.{i}.{attn}.norm_k.weight"] = (DIM,)
        shapes.update({
            f"blocks.{i}.norm3.weight": (DIM,), f"blocks.{i}.norm3.bias": (DIM,),
            f"blocks.{i}.ffn.0.weight": (FFN, DIM), f"blocks.{i}.ffn.0.bias": (FFN,),
            f"blocks.{i}.ffn.2.weight": (DIM, FFN), f"blocks.{i}.ffn.2.bias": (DIM,),
            f"blocks.{i}.modulation": (1, 6, DIM)})
    out = {}
    for key, shape in shapes.items():
        if "norm" in key and key.endswith("weight"):
            value = 1 + 0.2 * rng.standard_normal(shape)
        elif len(shape) >= 2 and "modulation" not in key:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            value = 0.2 * rng.standard_normal(shape)
        out[key] = value.astype(np.float32)
    return out


def save_torch(state: dict[str, np.ndarray], path: Path, legacy: bool = False) -> Path:
    """legacy: torch's pre-1.6 (not zip) format, which torch.load cannot memory-map."""
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def save_safetensors(state: dict[str, np.ndarray], path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    model = tiny_diffusers_model(seed=1)
    path = tmp_path_factory.mktemp("diffusers") / "transformer"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def original_reference():
    """The diffusers model loaded through diffusers' own original->diffusers key conversion."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = original_state_dict()
    prefixed = {wan_dit.PREFIX + k: torch.from_numpy(v) for k, v in state.items()}
    model = diffusers.WanTransformer3DModel(**TINY).eval()
    model.load_state_dict(convert_wan_transformer_to_diffusers(prefixed), strict=True)
    return state, model


def assert_same_outputs(model, config, params):
    shape = (1, 2, 8, 12)
    x, ctx = inputs(*shape, seed=5)
    t = per_token_timesteps(*shape, 800.0)
    expected = torch_forward(model, x, t, ctx)
    out = jax.jit(WanDiT(config).apply)({"params": params}, x, t, ctx)
    np.testing.assert_allclose(np.asarray(out), expected, atol=ATOL, rtol=RTOL)  # see test_dit.ATOL


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------------------------------------
# Reading both layouts.


@pytest.mark.torch
@pytest.mark.parametrize("form", ["safetensors_prefixed_with_config_json", "pth_plain", "pth_legacy_format"])
def test_original_layout_matches_diffusers_conversion(original_reference, tmp_path, form):
    state, model = original_reference
    if form.startswith("pth"):
        src = save_torch(state, tmp_path / "wan.pth", legacy=form == "pth_legacy_format")
        config, params = wan_dit.load(src, num_heads=2)
    else:
        folder = tmp_path / "Wan2.1-T2V-tiny"
        folder.mkdir()
        save_safetensors({wan_dit.PREFIX + k: v for k, v in state.items()},
                         folder / "diffusion_pytorch_model.safetensors")
        with open(folder / "config.json", "w") as f:
            json.dump({"_class_name": "WanModel", "dim": DIM, "num_heads": 2, "eps": 1e-6}, f)
        config, params = wan_dit.load(folder)
    assert (config.dim, config.num_heads, config.num_layers, config.text_dim) == (DIM, 2, LAYERS, TEXT)
    assert_same_outputs(model, config, params)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_low_precision_original_file_converts_to_fp32(original_reference, tmp_path, dtype, suffix):
    """Community single files (ComfyUI's repackaging): original names, fp16/bf16/fp8 weights, bf16 rest."""
    import ml_dtypes
    import torch

    state, _ = original_reference
    low = {k: v.astype(np.dtype(getattr(ml_dtypes, dtype, dtype)) if v.ndim >= 2 else ml_dtypes.bfloat16)
           for k, v in state.items()}
    src = tmp_path / f"wan_{dtype}{suffix}"
    if suffix == ".pth":
        torch.save({k: torch.from_numpy(v.astype(np.float32)).to(getattr(torch, v.dtype.name))
                    for k, v in low.items()}, src)  # exact: every value is representable
    else:
        save_safetensors(low, src)
    config, params = wan_dit.load(src, num_heads=2, scan_layers=True)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    kernel = params["blocks"]["attn1"]["to_q"]["kernel"]
    np.testing.assert_array_equal(kernel[1], low["blocks.1.self_attn.q.weight"].astype(np.float32).T)
    np.testing.assert_array_equal(params["scale_shift_table"],
                                  low["head.modulation"].astype(np.float32))


def scaled_fp8_state(state: dict[str, np.ndarray], form: str) -> tuple[dict, dict[str, np.ndarray]]:
    """A ComfyUI-style scaled-fp8 repackaging of `state` and the weights it stands for.

    Each block's linear weight W is stored as q = fp8_e4m3(W / s) with s = max|W| / 448 (ComfyUI's
    QUANTIZATION.md), beside s; it stands for q * s. The rest is bf16, as in those files. `form`:
    'scaled_fp8' (the file-wide marker, `.scale_weight`, `.scale_input`) or 'comfy_quant' (per-layer
    JSON tags, `.weight_scale`, `.input_scale`).
    """
    import ml_dtypes

    packed, stands_for = {}, {}
    for key, value in state.items():
        if not (key.startswith("blocks.") and key.endswith(".weight") and value.ndim == 2):
            packed[key] = value.astype(ml_dtypes.bfloat16)
            stands_for[key] = packed[key].astype(np.float32)
            continue
        layer = key.removesuffix(".weight")
        scale = np.float32(np.abs(value).max() / 448)
        packed[key] = (value / scale).astype(ml_dtypes.float8_e4m3fn)
        stands_for[key] = packed[key].astype(np.float32) * scale
        if form == "scaled_fp8":
            packed[f"{layer}.scale_weight"] = np.array([scale], np.float32)
            packed[f"{layer}.scale_input"] = np.ones((), np.float32)
        else:
            packed[f"{layer}.weight_scale"] = np.array(scale, np.float32)
            packed[f"{layer}.input_scale"] = np.ones((), np.float32)
            packed[f"{layer}.comfy_quant"] = np.frombuffer(b'{"format": "float8_e4m3fn"}', np.uint8).copy()
    if form == "scaled_fp8":
        packed["scaled_fp8"] = np.zeros((0,), ml_dtypes.float8_e4m3fn)
    return packed, stands_for


@pytest.mark.torch
@pytest.mark.parametrize("form,prefix", [("scaled_fp8", ""), ("comfy_quant", wan_dit.PREFIX)])
def test_scaled_fp8_repackaging_is_dequantised(tmp_path, form, prefix):
    """Each fp8 weight comes out as fp8 * its scale, exactly, and the model matches diffusers loaded
    with those weights through diffusers' own original->diffusers conversion."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    packed, stands_for = scaled_fp8_state(original_state_dict(seed=3), form)
    src = save_safetensors({prefix + k: v for k, v in packed.items()}, tmp_path / f"wan_{form}.safetensors")
    config, params = wan_dit.load(src, num_heads=2)
    for i, (attn, proj) in enumerate([("attn1", "to_q"), ("attn2", "to_out")]):
        name = {"attn1": "self_attn", "attn2": "cross_attn"}[attn] + "." + {"to_q": "q", "to_out": "o"}[proj]
        np.testing.assert_array_equal(params[f"blocks_{i}"][attn][proj]["kernel"],
                                      stands_for[f"blocks.{i}.{name}.weight"].T)
    np.testing.assert_array_equal(params["blocks_1"]["ffn"]["proj_in"]["kernel"],
                                  stands_for["blocks.1.ffn.0.weight"].T)
    model = diffusers.WanTransformer3DModel(**TINY).eval()
    model.load_state_dict(convert_wan_transformer_to_diffusers(
        {wan_dit.PREFIX + k: torch.from_numpy(v) for k, v in stands_for.items()}), strict=True)
    assert_same_outputs(model, config, params)


@pytest.mark.torch
def test_diffusers_pipeline_folder_and_cli(diffusers_folder, tmp_path):
    model, path = diffusers_folder
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "transformer").symlink_to(path)
    dst = tmp_path / "converted"
    assert wan_dit.main([str(pipeline), str(dst), "--scan-layers"]) == 0
    assert listing(dst) == {"params", "config.json"}
    config, params = wan_dit.load(dst)
    assert config.scan_layers and config.num_heads == 2
    assert_same_outputs(model, config, params)


@pytest.mark.torch
def test_diffusers_folder_saved_as_bin(diffusers_folder, tmp_path):
    """diffusers' save_pretrained(safe_serialization=False) writes diffusion_pytorch_model.bin: the folder
    was refused ("no .safetensors files") while the file itself converted."""
    model, path = diffusers_folder
    model.save_pretrained(tmp_path / "transformer", safe_serialization=False)
    assert listing(tmp_path / "transformer") == {"config.json", "diffusion_pytorch_model.bin"}
    config, params = wan_dit.load(path)
    bin_config, bin_params = wan_dit.load(tmp_path / "transformer")
    assert bin_config == config
    jax.tree.map(np.testing.assert_array_equal, bin_params, params)


def test_reinit_text_embedding(diffusers_folder):
    _, path = diffusers_folder
    config, params = wan_dit.load(path)
    new_config, new_params = wan_dit.load(path, text_dim=48, reinit_text_embedding=True)
    assert new_config.text_dim == 48
    assert new_params["condition_embedder"]["text_embedder"]["linear_1"]["kernel"].shape == (48, DIM)
    flat, new_flat = io.flatten(params), io.flatten(new_params)
    assert set(flat) == set(new_flat)
    for key in flat:
        if "text_embedder" not in key:
            np.testing.assert_array_equal(flat[key], new_flat[key])


@pytest.mark.parametrize("text_dim", ["0", "-5"])
@pytest.mark.parametrize("reinit", [[], ["--reinit-text-embedding"]], ids=["kept", "reinit"])
def test_text_dim_must_be_positive(diffusers_folder, tmp_path, capsys, text_dim, reinit):
    """0 kept the checkpoint's width silently (it is falsy); a negative one was a DiTConfig traceback."""
    _, path = diffusers_folder
    assert wan_dit.main([str(path), str(tmp_path / "dst"), "--text-dim", text_dim, *reinit]) == 1
    err = capsys.readouterr().err
    assert err == f"error: --text-dim {text_dim}: must be a positive int\n", err
    assert listing(tmp_path) == set()


def test_load_of_a_converted_checkpoint_takes_layout_and_dtype_refuses_the_rest(diffusers_folder, tmp_path):
    """Every option was ignored for a converted checkpoint: a script asking for another text width got the
    saved one, and unscanned float32 params whatever scan_layers and param_dtype said."""
    _, path = diffusers_folder
    ours = wan_dit.save(tmp_path / "ours", *wan_dit.load(path))
    for scan, dtype in ((True, "bfloat16"), (False, "float32")):
        config, params = wan_dit.load(ours, scan_layers=scan, param_dtype=dtype)
        expected_config, expected = wan_dit.load(path, scan_layers=scan, param_dtype=dtype)  # converted
        assert config == expected_config and config.scan_layers == scan and config.param_dtype == dtype
        assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(dtype)}
        jax.tree.map(np.testing.assert_array_equal, params, expected)
        scanned = wan_dit.save(tmp_path / f"saved_{scan}", config, params)
        back_config, back = wan_dit.load(scanned, scan_layers=False)  # and back, dtype as saved
        assert not back_config.scan_layers and back_config.param_dtype == dtype
        jax.tree.map(np.testing.assert_array_equal, back, wan_dit.load(path, param_dtype=dtype)[1])
    saved_config, _ = wan_dit.load(ours, text_dim=TEXT, num_heads=2, seed=3, eps=1e-6)  # what it holds
    assert saved_config == wan_dit.load(ours)[0]
    for options, named in (({"text_dim": 48, "reinit_text_embedding": True},
                            "text_dim=48, reinit_text_embedding=True"),
                           ({"reinit_text_embedding": True}, "reinit_text_embedding=True"),
                           ({"text_dim": 48}, "text_dim=48"), ({"num_heads": 4}, "num_heads=4"),
                           ({"layout": "diffusers"}, "layout='diffusers'"), ({"eps": 1e-3}, "eps=0.001")):
        with pytest.raises(ConversionError) as info:
            wan_dit.load(ours, **options)
        assert str(info.value) == (f"{ours} is a converted checkpoint (text_dim {TEXT}, 2 heads): {named} "
                                   "apply only when converting PyTorch files; convert those again"), options
    with pytest.raises(ConversionError, match="param_dtype must name a floating dtype"):
        wan_dit.load(ours, param_dtype="int8")


# ---------------------------------------------------------------------------------------------
# Folders holding a variant (fp16) copy of the weights beside the weights.


def write_sharded_copy(folder: Path, state: dict[str, np.ndarray], index_name: str, shard_stem: str,
                       dtype=np.float32) -> list[Path]:
    """`state` in `dtype` over two shards `{shard_stem}-0000i-of-00002.safetensors` named by an index."""
    keys = sorted(state)
    weight_map, shards = {}, []
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shards.append(save_safetensors({k: state[k].astype(dtype) for k in part},
                                       folder / f"{shard_stem}-{i + 1:05d}-of-00002.safetensors"))
        weight_map.update(dict.fromkeys(part, shards[-1].name))
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shards


STEM = "diffusion_pytorch_model"


@pytest.mark.parametrize("variant_index", [f"{STEM}.fp16.safetensors.index.json",  # sorts first
                                           f"{STEM}.safetensors.index.fp16.json",  # diffusers' naming
                                           f"{STEM}.safetensors.fp16.index.json",  # diffusers' legacy one
                                           None])  # one file, no index: a model under the shard size
@pytest.mark.parametrize("weights", ["sharded", "one_file"])
def test_folder_with_a_variant_reads_the_weights_without_one(tmp_path, variant_index, weights):
    """As diffusers' from_pretrained does by default. The first index in sorted order, the fp16 variant's,
    was read before; a one-file variant beside one-file weights was refused as a second copy."""
    state = original_state_dict()
    if variant_index is None:
        fp16 = {k: v.astype(np.float16) for k, v in state.items()}
        save_safetensors(fp16, tmp_path / f"{STEM}.fp16.safetensors")
    else:
        write_sharded_copy(tmp_path, state, variant_index, f"{STEM}.fp16", np.float16)
    if weights == "sharded":
        expected = write_sharded_copy(tmp_path, state, f"{STEM}.safetensors.index.json", STEM)
    else:
        expected = [save_safetensors(state, tmp_path / f"{STEM}.safetensors")]
    assert io.safetensors_files(tmp_path) == expected
    read = dict(io.iter_checkpoint(tmp_path))
    assert set(read) == set(state)
    for key, value in state.items():
        assert read[key].dtype == np.float32
        np.testing.assert_array_equal(read[key], value, err_msg=key)


@pytest.mark.torch
@pytest.mark.parametrize("max_shard_size", [None, "60KB"], ids=["one_file", "sharded"])
def test_diffusers_fp16_variant_beside_the_weights_converts_the_weights(tmp_path, max_shard_size):
    """What diffusers' save_pretrained(variant="fp16") writes beside the weights (one file each for a model
    under its shard size, the 1.3B DiT's case): from_pretrained reads the weights without a variant, and
    so do we."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    model, folder = tiny_diffusers_model(seed=1), tmp_path / "transformer"
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(tmp_path / "plain", **shards)
    model.save_pretrained(folder, **shards)
    model.to(torch.float16).save_pretrained(folder, variant="fp16", **shards)
    assert {n for n in listing(folder) - listing(tmp_path / "plain") if ".fp16" not in n} == set()
    weights = dict(io.iter_checkpoint(tmp_path / "plain"))
    loaded = diffusers.WanTransformer3DModel.from_pretrained(folder).state_dict()
    for key, value in weights.items():  # fp32, not the fp16 variant's rounding
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)
    expected_config, expected = wan_dit.load(tmp_path / "plain")
    config, params = wan_dit.load(folder)
    assert config == expected_config
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_folder_with_only_variants_is_refused(tmp_path):
    state = original_state_dict()
    write_sharded_copy(tmp_path, state, f"{STEM}.fp16.safetensors.index.json", f"{STEM}.fp16", np.float16)
    write_sharded_copy(tmp_path, state, f"{STEM}.bf16.safetensors.index.json", f"{STEM}.bf16", np.float16)
    with pytest.raises(ConversionError, match=rf"{STEM}.bf16.safetensors.index.json; "
                       rf"{STEM}.fp16.safetensors.index.json each hold the weights \(two copies"):
        io.safetensors_files(tmp_path)
    # One variant alone is the weights.
    for name in tmp_path.glob(f"{STEM}.bf16*"):
        name.unlink()
    assert [f.name for f in io.safetensors_files(tmp_path)] == [
        f"{STEM}.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)]


def test_a_file_name_no_naming_scheme_explains_is_read_as_the_one_copy(tmp_path):
    """`wan..safetensors` matched no variant pattern: an AttributeError traceback, not the weights."""
    save_safetensors(original_state_dict(), tmp_path / "wan..safetensors")
    assert [f.name for f in io.safetensors_files(tmp_path)] == ["wan..safetensors"]


# ---------------------------------------------------------------------------------------------
# Export.


@pytest.mark.torch
@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_export_round_trip_is_exact(diffusers_folder, tmp_path, scan):
    model, path = diffusers_folder
    config, params = wan_dit.load(path, scan_layers=scan)
    out = wan_dit.export_diffusers(params, config, tmp_path / "exported", max_shard_bytes=200_000)
    assert (out / f"{wan_dit.WEIGHTS_NAME}.index.json").exists()  # sharded, with an index
    source = dict(io.iter_checkpoint(path))
    exported = dict(io.iter_checkpoint(out))
    assert set(source) == set(exported)
    for key, value in source.items():
        assert exported[key].dtype == value.dtype
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    with open(path / "config.json") as f:
        original_config = json.load(f)
    with open(out / "config.json") as f:
        exported_config = json.load(f)
    for key, value in exported_config.items():
        if not key.startswith("_"):
            assert original_config[key] == value, key

    import diffusers
    reloaded = diffusers.WanTransformer3DModel.from_pretrained(out).eval()
    # from_pretrained leaves tensors in the safetensors mmap at file-dependent alignments, and torch's
    # CPU kernels round differently on differently aligned data (4.8e-7 on an AMD Zen 3); copies in
    # torch's own (aligned) memory make the forward depend on the values alone.
    for tensor in [*reloaded.parameters(), *reloaded.buffers()]:
        tensor.data = tensor.data.clone()
    x, ctx = inputs(1, 1, 8, 8)
    t = np.array([300.0], np.float32)
    np.testing.assert_array_equal(torch_forward(reloaded, x, t, ctx), torch_forward(model, x, t, ctx))
    again, again_params = wan_dit.load(out, scan_layers=scan)
    assert again == config
    jax.tree.map(np.testing.assert_array_equal, again_params, params)


@pytest.mark.torch
def test_export_of_a_run_with_a_context_mask_warns(tmp_path, caplog):
    """diffusers' WanTransformer3DModel has no text mask: the export says so, and what it says holds.
    Unpadded and all-zero null contexts give this model's outputs, padded ones do not."""
    import logging

    import flax.linen as nn
    import jax.numpy as jnp

    from configs.genmask import get_config
    from convert import export
    from genmask_jax.models import build
    from genmask_jax.train.checkpointing import Checkpointer

    diffusers = pytest.importorskip("diffusers")
    config = get_config()
    config.model.vae, config.vae_from = None, ""
    model = build.build_model(config)
    params = jax.jit(lambda key: nn.meta.unbox(build.dit_initializer(model)(key)))(jax.random.key(0))
    for use_context_mask in (False, True):  # the parameters are the same
        config.model.dit.use_context_mask = use_context_mask
        run = tmp_path / f"run_{use_context_mask}"
        checkpointer = Checkpointer(run, async_save=False)
        checkpointer.save(1, {"params": params}, config=config)
        checkpointer.close()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="convert.export"):
            out = export.export_checkpoint(run, tmp_path / f"out_{use_context_mask}")
        warnings = [r.getMessage() for r in caplog.records if r.name == "convert.export"]
        assert len(warnings) == use_context_mask, warnings
        assert all("use_context_mask=True" in w and "no text mask" in w for w in warnings), warnings

    reference = diffusers.WanTransformer3DModel.from_pretrained(out / "transformer").eval()
    x, ctx = inputs(1, 1, 8, 8)
    t = np.array([500.0], np.float32)
    padded = ctx.copy()
    padded[:, 5:] = 0.0
    masked = build.build_model(config).dit
    assert masked.use_context_mask
    apply = jax.jit(WanDiT(masked).apply)
    length = ctx.shape[1]
    for context, kept, same in ((ctx, length, True), (np.zeros_like(ctx), 0, True), (padded, 5, False)):
        mask = jnp.arange(length)[None, :] < kept
        ours = np.asarray(apply({"params": params}, x, t, context, mask))
        theirs = torch_forward(reference, x, t, context)
        assert np.allclose(ours, theirs, atol=ATOL, rtol=RTOL) == same, (kept, np.abs(ours - theirs).max())


def _write(writer: str, dst: Path, tensors: dict, overwrite: bool = False) -> Path:
    if writer == "safetensors":
        return io.write_safetensors_folder(dst, tensors, {"a": 1}, "m.safetensors", overwrite=overwrite)
    return io.save_flax_checkpoint(dst, tensors, {"a": 1}, overwrite=overwrite)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def someones_work(folder: Path) -> Path:
    """A folder that is not a checkpoint: a writer pointed at it must not delete it."""
    (folder / "demo" / "train").mkdir(parents=True)
    (folder / "demo" / "train" / "checkpoint_1000.bin").write_text("a week of training")
    (folder / "notes.txt").write_text("precious")
    return folder


WEIGHTS = {"w": np.ones(3, np.float32)}


@pytest.mark.parametrize("writer", ["safetensors", "orbax"])
def test_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path, writer):
    dst = _write(writer, tmp_path / "dst", {"w": np.zeros(3, np.float32)})
    before = tree(dst)
    unwritable = {"w": np.array([object()])}  # neither safetensors nor orbax can store an object array
    with pytest.raises(Exception):  # noqa: B017  (whichever error the library raises)
        _write(writer, dst, unwritable, overwrite=True)
    assert listing(tmp_path) == {"dst"} and tree(dst) == before
    _write(writer, dst, WEIGHTS, overwrite=True)
    assert listing(tmp_path) == {"dst"}
    assert listing(dst) == ({"config.json", "m.safetensors", io.EXPORT_MARKER} if writer == "safetensors" else
                            {"config.json", "params"})


def permissions(folder: Path) -> dict[str, int]:
    """Path under folder's parent -> permission bits, for `folder` and everything in it."""
    entries = [folder, *folder.rglob("*")]
    return {str(p.relative_to(folder.parent)): stat.S_IMODE(p.stat().st_mode) for p in entries}


def default_permissions(folder: Path, umask: int) -> dict[str, int]:
    """What `os.makedirs` and `open` give each entry of `permissions(folder)` under `umask`."""
    root = folder.parent
    return {name: (0o777 if (root / name).is_dir() else 0o666) & ~umask for name in permissions(folder)}


@pytest.mark.parametrize("writer", ["safetensors", "orbax"])
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_folders_have_the_umask_s_permissions(tmp_path, writer, umask):
    """mkdtemp made every written folder 0o700 (and safetensors makes its files 0o600): converted
    checkpoints were unreadable by the group and others on shared storage, whatever the umask."""
    old = os.umask(umask)
    try:
        dst = _write(writer, tmp_path / "dst", WEIGHTS)
    finally:
        os.umask(old)
    assert permissions(dst) == default_permissions(dst, umask)


def test_umask_is_read_back_unchanged_without_proc(monkeypatch):
    def no_proc(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(io, "open", no_proc, raising=False)
    old = os.umask(0o027)
    try:
        assert io._umask() == 0o027 and os.umask(0o027) == 0o027
    finally:
        os.umask(old)


def contents(folder: Path) -> dict[str, bytes | None]:
    """Path under `folder` -> its bytes (None for a folder): what 'left byte-identical' compares."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def downloaded(folder: Path) -> Path:
    """A diffusers folder as the Hub gives it: config.json + safetensors, without our EXPORT_MARKER."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    save_safetensors({"w": np.ones(3, np.float32)}, folder / "diffusion_pytorch_model.safetensors")
    return folder


def _not_checkpoints(root: Path, writer: str) -> dict[str, Path]:
    """Existing destinations `writer` may not replace, even with overwrite."""
    pipeline = root / "pipeline"  # a diffusers pipeline: the folder above transformer/ and vae/
    _write("safetensors", pipeline / "vae", WEIGHTS)
    (pipeline / "model_index.json").write_text("{}")
    stray = {}
    for kind in ("safetensors", "orbax"):  # a checkpoint with something of the user's beside it
        stray[kind] = _write(kind, root / f"{kind}-with-notes", WEIGHTS)
        (stray[kind] / "notes.txt").write_text("precious")
    (root / "file").write_text("a file")
    linked = root / "linked"
    linked.symlink_to(_write("orbax", root / "link-target", WEIGHTS), target_is_directory=True)
    other = "orbax" if writer == "safetensors" else "safetensors"  # converters and exports replace their own
    return {"work": someones_work(root / "runs"), "pipeline": pipeline, "file": root / "file",
            "symlink": linked, **{f"{kind}+notes": folder for kind, folder in stray.items()},
            "downloaded": downloaded(root / "downloaded"),
            "other kind": _write(other, root / "other", WEIGHTS)}


@pytest.mark.parametrize("writer", ["safetensors", "orbax"])
def test_overwrite_refuses_what_is_not_a_checkpoint_and_deletes_nothing(tmp_path, writer):
    targets = _not_checkpoints(tmp_path, writer)
    before = contents(tmp_path)
    what = "a checkpoint folder of ours" if writer == "orbax" else "an exported diffusers folder"
    for name, dst in targets.items():
        message = ("holds diffusers weights without genmask_export.json" if writer == "safetensors" and
                   name == "downloaded" else f"is not {what}")
        with pytest.raises(ConversionError, match=rf"{message}.* left alone"):
            _write(writer, dst, WEIGHTS, overwrite=True)
        assert contents(tmp_path) == before, name  # nothing deleted or changed, no temporary left
    with pytest.raises(ConversionError, match="already exists"):
        _write(writer, targets["work"], WEIGHTS)
    assert contents(tmp_path) == before


@pytest.mark.parametrize("writer,earlier", [
    ("orbax", "orbax"), ("orbax", "pretrain.json"), ("orbax", "empty"),
    ("safetensors", "safetensors"), ("safetensors", "sharded"), ("safetensors", "empty")])
def test_overwrite_replaces_an_earlier_checkpoint(tmp_path, writer, earlier):
    dst = tmp_path / "dst"
    if earlier == "empty":
        dst.mkdir()
    elif earlier == "sharded":
        io.write_safetensors_folder(dst, {"a": np.ones(8), "b": np.ones(8)}, {}, "m.safetensors",
                                    max_shard_bytes=64)
        assert "m.safetensors.index.json" in listing(dst)
    else:
        _write(earlier if earlier == "safetensors" else "orbax", dst, WEIGHTS)
        if earlier == "pretrain.json":  # genmask_jax.train.vae_pretrain's record beside the checkpoint
            (dst / "pretrain.json").write_text("{}")
    refusal = io.export_refusal if writer == "safetensors" else io.converted_checkpoint_refusal
    assert refusal(dst) is None
    if earlier != "empty":
        with pytest.raises(ConversionError, match="already exists"):
            _write(writer, dst, WEIGHTS)
    _write(writer, dst, {"w": np.full(3, 2.0, np.float32)}, overwrite=True)
    assert listing(tmp_path) == {"dst"}
    saved = dict(io.iter_checkpoint(dst)) if writer == "safetensors" else io.load_flax_checkpoint(dst)[1]
    np.testing.assert_array_equal(saved["w"], np.full(3, 2.0, np.float32))


def _saved(writer: str, dst: Path) -> np.ndarray:
    saved = dict(io.iter_checkpoint(dst)) if writer == "safetensors" else io.load_flax_checkpoint(dst)[1]
    return saved["w"]


@pytest.mark.parametrize("writer", ["safetensors", "orbax"])
@pytest.mark.parametrize("moment", ["deleting_the_old", "renaming_the_new"])
def test_an_interrupted_overwrite_leaves_the_old_or_the_new_folder(tmp_path, monkeypatch, writer, moment):
    """--overwrite deleted DST, then renamed the new folder into place, and removed the new one on any
    error: a Ctrl-C while a large DST was being deleted lost both."""
    dst = _write(writer, tmp_path / "dst", {"w": np.ones(3, np.float32)})
    real_rmtree, real_replace = shutil.rmtree, os.replace
    interrupted = []

    def rmtree(path, *args, **kwargs):  # the first deletion beside DST: the old folder
        real_rmtree(path, *args, **kwargs)
        if moment == "deleting_the_old" and Path(path).parent == tmp_path and not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt

    def replace(src, target, *args, **kwargs):  # the new folder's rename to DST
        if moment == "renaming_the_new" and Path(target) == dst and "-old-" not in Path(src).name:
            interrupted.append(src)
            raise KeyboardInterrupt
        return real_replace(src, target, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _write(writer, dst, {"w": np.full(3, 2.0, np.float32)}, overwrite=True)
    monkeypatch.undo()
    assert interrupted and listing(tmp_path) == {"dst"}
    expected = 1.0 if moment == "renaming_the_new" else 2.0
    np.testing.assert_array_equal(_saved(writer, dst), np.full(3, expected, np.float32))


_KILLED_WRITE = """
import os, signal, sys
import numpy as np
from convert import checkpoint_io as io
io._replace_folder = lambda new, dst: os.kill(os.getpid(), signal.SIGKILL)  # written, not yet in place
io.save_flax_checkpoint(sys.argv[1], {"w": np.ones(3, np.float32)}, {"a": 1})
"""


def test_the_next_write_removes_what_a_killed_write_left(tmp_path, caplog):
    """A write killed outright (SIGKILL: the OOM killer) leaves its hidden `.DST.tmp-*` sibling, as large as
    the checkpoint; reruns never removed it. Only ours, on this host, of a process that is gone, go."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(tmp_path / "dst")], env=env,
                            timeout=300)
    assert killed.returncode == -9
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".dst.tmp-") and (left / "params").is_dir(), left.name
    _write("orbax", tmp_path / "dst", WEIGHTS)
    assert listing(tmp_path) == {"dst"}
    named = re.fullmatch(rf"\.dst\.tmp-{re.escape(io._host())}\.(\d+)-[a-z0-9_]{{8}}", left.name)
    assert named, left.name
    pid = named.group(1)  # the killed process's
    shutil.rmtree(tmp_path / "dst")
    kept = {f".dst.tmp-{io._host()}.{os.getpid()}-abcdefgh": "may be another write",  # a running process's
            f".dst.tmp-elsewhere.{pid}-abcdefgh": "may be another write",  # another host's
            ".dst.tmp-w07cvg5f": "may be another write",  # no owner in the name
            f".dst.tmp-old-{io._host()}.{pid}-abcdefgh": "a killed --overwrite was replacing"}  # the only DST
    for name in kept:
        (tmp_path / name).mkdir()
    with caplog.at_level(logging.INFO, logger=io.__name__):
        _write("orbax", tmp_path / "dst", WEIGHTS)
    assert listing(tmp_path) == {"dst", *kept}
    for name, phrase in kept.items():
        assert any(name in r.getMessage() and phrase in r.getMessage() for r in caplog.records), name
    _write("orbax", tmp_path / "dst", WEIGHTS, overwrite=True)  # DST is back: the old one set aside goes
    assert listing(tmp_path) == {"dst", *kept} - {f".dst.tmp-old-{io._host()}.{pid}-abcdefgh"}


def _random_dit_params(config: DiTConfig) -> dict:
    rng = np.random.default_rng(0)
    shapes = wan_dit.expected_shapes(config)
    return io.unflatten({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()})


@pytest.mark.parametrize("damage", ["truncated_chunk", "deleted_chunk", "deleted_metadata", "empty_params"])
def test_a_damaged_converted_checkpoint_is_one_clear_error(tmp_path, damage):
    """A half-copied converted checkpoint raised orbax's or tensorstore's own error (a ValueError, a
    FileNotFoundError), which the commands loading it showed as a traceback."""
    config = DiTConfig(dim=DIM, ffn_dim=FFN, num_heads=2, num_layers=LAYERS, text_dim=TEXT)
    dst = wan_dit.save(tmp_path / "dit", config, _random_dit_params(config))
    chunk = next((dst / "params").glob("blocks_0.attn1.to_q.kernel/0*"))
    if damage == "truncated_chunk":
        chunk.write_bytes(chunk.read_bytes()[:10])
    elif damage == "deleted_chunk":
        chunk.unlink()
    elif damage == "deleted_metadata":
        (dst / "params" / "_METADATA").unlink()
    else:
        shutil.rmtree(dst / "params")
        (dst / "params").mkdir()
    message = rf"^{dst} is damaged or incomplete \(\w+: .+\); convert it again \(or copy it again whole\)$"
    with pytest.raises(ConversionError, match=message) as error:
        wan_dit.load(dst)
    assert "\n" not in str(error.value)


def test_export_refuses_a_rope_theta_diffusers_cannot_represent(tmp_path):
    """diffusers' WanTransformer3DModel always rotates with theta 10000: the export computed another model."""
    config = DiTConfig(dim=DIM, ffn_dim=FFN, num_heads=2, num_layers=LAYERS, text_dim=TEXT, rope_theta=1e6)
    with pytest.raises(ConversionError, match=r"^rope_theta 1e\+06: diffusers' .* always uses 10000"):
        wan_dit.export_diffusers(_zero_dit_params(config), config, tmp_path / "transformer")
    assert listing(tmp_path) == set()


def _zero_dit_params(config: DiTConfig) -> dict:
    return io.unflatten({k: np.zeros(s, np.float32) for k, s in wan_dit.expected_shapes(config).items()})


def test_export_diffusers_replaces_only_an_earlier_export(tmp_path):
    config = DiTConfig(dim=DIM, ffn_dim=FFN, num_heads=2, num_layers=LAYERS, text_dim=TEXT)
    params = _zero_dit_params(config)
    pipeline = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    wan_dit.export_diffusers(params, config, pipeline / "transformer")
    (pipeline / "model_index.json").write_text("{}")
    before = tree(tmp_path)
    with pytest.raises(ConversionError, match="already exists"):
        wan_dit.export_diffusers(params, config, pipeline / "transformer")
    with pytest.raises(ConversionError, match=r"is not an exported diffusers folder .* left alone"):
        wan_dit.export_diffusers(params, config, pipeline, overwrite=True)  # not its transformer/
    assert tree(tmp_path) == before
    hub = downloaded(tmp_path / "hub" / "transformer")
    hub_before = contents(hub)
    with pytest.raises(ConversionError, match=rf"holds diffusers weights without {io.EXPORT_MARKER}"):
        wan_dit.export_diffusers(params, config, hub, overwrite=True)
    assert contents(hub) == hub_before and listing(tmp_path / "hub") == {"transformer"}
    out = wan_dit.export_diffusers(params, config, pipeline / "transformer", max_shard_bytes=50_000,
                                   overwrite=True)
    assert (out / f"{wan_dit.WEIGHTS_NAME}.index.json").exists()
    names = {wan_dit.diffusers_key(k) for k in wan_dit.expected_shapes(config)}
    assert set(dict(io.iter_checkpoint(out))) == names


def test_run_export_replaces_only_an_earlier_export(tmp_path):
    from convert import export

    work = someones_work(tmp_path / "runs")
    before = tree(tmp_path)
    for overwrite, message in ((False, "already exists"), (True, r"is not an exported folder .* left alone")):
        with pytest.raises(ConversionError, match=message):  # before the run is read: there is none
            export.export_checkpoint(str(tmp_path / "no-run"), work, overwrite=overwrite)
    assert tree(tmp_path) == before
    earlier = tmp_path / "export"
    for sub in ("transformer", "vae"):
        _write("safetensors", earlier / sub, WEIGHTS)
    assert export.export_folder_refusal(earlier) is None
    # An export killed by an earlier version left io.atomic_folder's temporary folder in DST: --overwrite
    # must still work.
    (earlier / ".vae.tmp-abc123").mkdir()
    (earlier / ".vae.tmp-abc123" / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
    assert export.export_folder_refusal(earlier) is None
    killed_early = tmp_path / "killed"
    (killed_early / ".transformer.tmp-xyz").mkdir(parents=True)
    assert export.export_folder_refusal(killed_early) is None
    (earlier / "README.md").write_text("mine")
    assert "is not an exported folder" in export.export_folder_refusal(earlier)


def test_run_export_refuses_a_downloaded_or_unmarked_diffusers_folder(tmp_path):
    """--overwrite deleted any folder of diffusers-style transformer/ and vae/: a model downloaded from the
    Hub has the same files as an export, so only the marker every export now writes makes one ours."""
    from convert import export

    hub = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    downloaded(hub / "transformer")
    old_export = tmp_path / "old-export"  # as exports were written before the marker
    for sub in ("transformer", "vae"):
        _write("safetensors", old_export / sub, WEIGHTS)
        (old_export / sub / io.EXPORT_MARKER).unlink()
    before = contents(tmp_path)
    unmarked = rf"its transformer/ holds diffusers weights without {io.EXPORT_MARKER}.* delete .* left alone"
    for dst, message in ((hub, unmarked), (old_export, unmarked), (hub / "transformer", "not an exported")):
        with pytest.raises(ConversionError, match=message):
            export.export_checkpoint(str(tmp_path / "no-run"), dst, overwrite=True)
    assert contents(tmp_path) == before


def test_run_export_goes_beside_the_checkpoints_in_a_workdir_not_inside_them(tmp_path):
    """A workdir given as CHECKPOINT holds the checkpoints folder read: DST may sit beside it."""
    from convert import export

    checkpoints = run_with_a_converted_vae(tmp_path, "work/checkpoints")
    out = export.export_checkpoint(str(tmp_path / "work"), tmp_path / "work" / "export")
    assert listing(out) == {"transformer", "vae"}
    before = contents(tmp_path / "work")
    with pytest.raises(ConversionError, match="is inside the source .*: choose a destination apart"):
        export.export_checkpoint(str(tmp_path / "work"), checkpoints / "export")
    assert contents(tmp_path / "work") == before


@pytest.mark.parametrize("relation", ["is", "holds"])
def test_run_export_refuses_a_destination_overlapping_the_run(tmp_path, relation):
    """Before the run is read (there is none here); inside it: the test above."""
    from convert import export

    run = someones_work(tmp_path / "run")
    dst = {"is": run, "holds": tmp_path}[relation]
    before = contents(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ConversionError, match=rf"{relation} the source .*: choose a destination apart"):
            export.export_checkpoint(str(run), dst, overwrite=overwrite)
    assert contents(tmp_path) == before


@pytest.mark.torch
def test_converter_replaces_only_its_own_checkpoints(diffusers_folder, tmp_path, capsys):
    """`cp -r transformer hf_copy; convert.wan_dit transformer hf_copy --overwrite` deleted the copy: any
    config.json + *.safetensors folder counted as replaceable, a downloaded one (or SRC itself) too."""
    _, path = diffusers_folder
    hf_copy = shutil.copytree(path, tmp_path / "hf_copy")
    config, params = wan_dit.load(path)
    ours = wan_dit.export_diffusers(params, config, tmp_path / "exported")
    before = contents(tmp_path)
    ours_refused = "is not a checkpoint folder of ours"
    for src, dst, message in ((path, hf_copy, ours_refused), (path, ours, ours_refused),
                              (hf_copy, hf_copy, "is the source")):
        assert wan_dit.main([str(src), str(dst), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert contents(tmp_path) == before
    converted = tmp_path / "converted"
    for overwrite in ([], ["--overwrite"]):
        assert wan_dit.main([str(path), str(converted), *overwrite]) == 0
        assert listing(converted) == {"params", "config.json"}


def overlapping(tmp_path: Path, relation: str) -> tuple[Path, Path]:
    """(SRC, DST) in `relation`. SRC is unreadable: a converter that reads it fails with another error."""
    src = tmp_path / "transformer"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    dst = {"is": src, "is inside": src / "converted", "holds": tmp_path, "is (a link to)": tmp_path / "link"}
    return src, dst[relation]


@pytest.mark.parametrize("relation", ["is", "is inside", "holds", "is (a link to)"])
def test_converter_refuses_a_destination_overlapping_the_source(tmp_path, capsys, relation):
    src, dst = overlapping(tmp_path, relation)
    before = contents(tmp_path)
    for overwrite in ([], ["--overwrite"]):
        assert wan_dit.main([str(src), str(dst), *overwrite]) == 1
        err = capsys.readouterr().err
        relation_said = relation.replace(" (a link to)", "")
        assert err.count("\n") == 1 and f"{dst} {relation_said} the source {src}" in err, err
    assert contents(tmp_path) == before


@pytest.mark.torch
def test_num_heads_must_agree_with_the_config_json(diffusers_folder, tmp_path, capsys):
    """--num-heads 4 silently overrode the 2 heads of the config.json beside the weights."""
    _, path = diffusers_folder
    assert wan_dit.main([str(path), str(tmp_path / "four"), "--num-heads", "4"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-heads 4 disagrees with the config.json" in err, err
    assert "(2 heads)" in err and listing(tmp_path) == set()
    assert wan_dit.main([str(path), str(tmp_path / "two"), "--num-heads", "2"]) == 0
    assert wan_dit.load(tmp_path / "two")[0].num_heads == 2


def run_with_a_converted_vae(root: Path, checkpoints: str = "run") -> Path:
    """A one-step run of the tiny config whose frozen VAE came from converted weights (config.vae_from),
    saved in `root/checkpoints` (returned)."""
    import flax.linen as nn

    from configs.genmask import get_config
    from convert import wan_vae
    from genmask_jax.models import build
    from genmask_jax.train.checkpointing import Checkpointer

    config = get_config()
    model = build.build_model(config)
    vae_params, _ = build.frozen_vae(config, model)  # random: no vae_from yet
    config.vae_from = str(wan_vae.save(root / "converted_vae", model.vae, vae_params))
    params = jax.jit(lambda key: nn.meta.unbox(build.dit_initializer(model)(key)))(jax.random.key(0))
    checkpointer = Checkpointer(root / checkpoints, async_save=False)
    checkpointer.save(1, {"params": params}, config=config)
    checkpointer.close()
    return root / checkpoints


def test_failed_run_export_leaves_the_earlier_export(tmp_path, monkeypatch):
    """The export deleted an earlier one, then wrote transformer/ and vae/ one after the other in DST: a
    failure in the VAE step left a transformer/ alone. Now both are renamed into place together."""
    from convert import export, wan_vae

    run = run_with_a_converted_vae(tmp_path)
    out = tmp_path / "export"
    old = os.umask(0o022)
    try:
        export.export_checkpoint(run, out)
    finally:
        os.umask(old)
    assert listing(out) == {"transformer", "vae"}
    assert permissions(out) == default_permissions(out, 0o022)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(wan_vae, "export_diffusers", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export.export_checkpoint(run, out, overwrite=True)
    assert listing(tmp_path) == {"run", "converted_vae", "export"}  # no temporary folder
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    shutil.rmtree(out)
    with pytest.raises(OSError, match="No space left"):
        export.export_checkpoint(run, out)
    assert listing(tmp_path) == {"run", "converted_vae"}


def test_run_export_writes_the_weights_as_they_were_saved(tmp_path):
    """The export wrote the float32 EMA of a bfloat16 run, and its converted float32 VAE, rounded to
    bfloat16 (the experiment's param_dtypes), not the weights saved."""
    import flax.linen as nn
    import jax.numpy as jnp

    from configs.genmask import get_config
    from convert import export, wan_vae
    from genmask_jax.models import build
    from genmask_jax.train.checkpointing import Checkpointer

    config = get_config()
    model = build.build_model(config)  # float32
    vae = jax.tree.map(lambda x: x + 1e-3, build.frozen_vae(config, model)[0])  # not bfloat16 numbers
    config.vae_from = str(wan_vae.save(tmp_path / "converted_vae", model.vae, vae))
    config.model.dit.param_dtype = config.model.vae.param_dtype = "bfloat16"
    model = build.build_model(config)
    params = jax.jit(lambda key: nn.meta.unbox(build.dit_initializer(model)(key)))(jax.random.key(0))
    ema = jax.tree.map(lambda x: np.asarray(x, np.float32) + 1e-3, params)  # float32, as training keeps it
    checkpointer = Checkpointer(tmp_path / "run", async_save=False)
    checkpointer.save(1, {"params": params, "ema_params": ema}, config=config)
    checkpointer.close()

    def diffusers_tensors(flat, converter):
        return {converter.diffusers_key(p): converter.from_flax(p, np.asarray(v)) for p, v in flat.items()}

    for use_ema, dit in ((True, ema), (False, params)):
        out = export.export_checkpoint(tmp_path / "run", tmp_path / f"out_{use_ema}", use_ema=use_ema)
        expected = {"transformer": diffusers_tensors(wan_dit.unstack(dit, model.dit), wan_dit),
                    "vae": diffusers_tensors(io.flatten(vae["params"]), wan_vae)}
        for part, tensors in expected.items():
            exported = dict(io.iter_checkpoint(out / part))
            assert exported.keys() == tensors.keys()
            for key, value in tensors.items():
                assert exported[key].dtype == value.dtype, (part, key, exported[key].dtype, value.dtype)
                np.testing.assert_array_equal(exported[key], value, err_msg=f"{part} {key}")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


_MEASURE = """
import ctypes, json, os, sys, threading, time
import jax, orbax.checkpoint, safetensors  # imported before the baseline: their memory is not the weights'
from convert import wan_dit

def anon_kib():
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))

mode, args = sys.argv[1], sys.argv[2:]
if mode == "export":
    config, params = wan_dit.load(args[0])
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the reader's freed buffers, which the export could reuse
    run = lambda: wan_dit.export_diffusers(params, config, args[1], max_shard_bytes=int(args[2])) and 0
else:
    run = lambda: wan_dit.main(args)
base, peak, done = anon_kib(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
status = run()
done.set()
sampler.join()
print(json.dumps({"status": status, "extra_bytes": (max(peak[0], anon_kib()) - base) * 1024}))
"""

# (child arguments after the source and destination, bound on the extra memory / the weights' size).
# 6 blocks of dim 1024: 443 MB of fp32 weights, the stacked FFN kernels 100 MB each. With orbax's
# defaults (a copy of every array, OCDBT's write buffers, whole-array chunks) converting allocated 2.8x
# that at its peak; now 1.3x unscanned, 1.5-1.7x scanned: one copy plus a few chunk and tensor buffers,
# 0.1-0.4 GB whatever the model's size (1.07x for the 1.3B DiT, BENCHMARKS.md). Exporting built every
# transposed tensor before writing (1.0x); now one 64 MB shard at a time (0.2x). Bounds sit between.
_MEMORY_CASES = {
    "convert_unscanned": (["--num-heads", "8"], 2.2),
    "convert_scanned": (["--num-heads", "8", "--scan-layers"], 2.2),
    "export": ([str(64 * 2**20)], 0.6),
}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
@pytest.mark.parametrize("case", list(_MEMORY_CASES))
def test_conversion_and_export_hold_about_one_copy_of_the_weights(tmp_path, case):
    config = DiTConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=6, text_dim=1024)
    rng = np.random.default_rng(0)
    state = {}
    for path, shape in wan_dit.expected_shapes(config).items():
        value = rng.standard_normal(shape, np.float32)
        state[wan_dit.original_key(wan_dit.diffusers_key(path))] = wan_dit.from_flax(path, value)
    weights = sum(v.nbytes for v in state.values())
    src = save_safetensors(state, tmp_path / "wan.safetensors")
    del state
    if case == "export":
        assert wan_dit.main([str(src), str(tmp_path / "converted"), "--num-heads", "8"]) == 0
        src = tmp_path / "converted"
    extra_args, bound = _MEMORY_CASES[case]
    args = [case.split("_")[0], str(src), str(tmp_path / "out"), *extra_args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["status"] == 0
    assert result["extra_bytes"] < bound * weights, f"{result['extra_bytes'] / weights:.2f}x the weights"


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing written.


def _broken(tmp_path: Path, kind: str) -> tuple[Path, list[str]]:
    """A bad source and the phrases its error message must contain."""
    state = original_state_dict()
    src = tmp_path / "bad.safetensors"
    if kind == "missing_path":
        return tmp_path / "nope", ["no such file"]
    if kind == "unknown_layout":
        save_safetensors({"encoder.weight": np.zeros((2, 2), np.float32)}, src)
        return src, ["unknown checkpoint layout"]
    if kind == "truncated_safetensors":
        save_safetensors(state, src)
        src.write_bytes(src.read_bytes()[:-1000])
        return src, ["not a readable safetensors"]
    if kind == "truncated_pth":
        pth = save_torch(state, tmp_path / "bad.pth")
        pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
        return pth, ["not a readable PyTorch checkpoint"]
    if kind == "missing_and_unexpected_keys":
        del state["blocks.1.ffn.2.bias"], state["blocks.0.self_attn.norm_k.weight"]
        state["blocks.0.extra.weight"] = np.zeros(3, np.float32)
        save_safetensors(state, src)
        return src, ["missing (2)", "blocks.1.ffn.2.bias", "blocks.0.self_attn.norm_k.weight",
                     "unexpected (1)", "blocks.0.extra.weight"]
    if kind == "shape_mismatch":
        state["blocks.1.self_attn.q.weight"] = np.zeros((DIM, DIM + 1), np.float32)
        state["head.modulation"] = np.zeros((1, 3, DIM), np.float32)
        save_safetensors(state, src)
        return src, ["2 tensor shapes", f"blocks.1.self_attn.q.weight: found ({DIM}, {DIM + 1}), "
                     f"expected ({DIM}, {DIM})", f"head.modulation: found (1, 3, {DIM})"]
    if kind == "i2v":
        state["blocks.0.cross_attn.k_img.weight"] = np.zeros((DIM, DIM), np.float32)
        state["img_emb.proj.0.weight"] = np.zeros((1280,), np.float32)
        save_safetensors(state, src)
        return src, ["image-to-video", "not supported"]
    if kind == "unsupported_quantisation":  # int8, a per-channel scale, a scale of nothing
        packed, _ = scaled_fp8_state(state, "comfy_quant")
        packed["blocks.0.ffn.0.weight"] = np.zeros((FFN, DIM), np.int8)
        packed["blocks.1.ffn.2.weight_scale"] = np.ones((DIM, 1), np.float32)
        packed["blocks.1.ffn.1.weight_scale"] = np.ones((), np.float32)
        save_safetensors(packed, src)
        return src, ["not fp8 with one scale per tensor", "(3)", "blocks.0.ffn.0.weight is int8",
                     f"blocks.1.ffn.2.weight_scale has shape ({DIM}, 1)",
                     "blocks.1.ffn.1.weight_scale scales no blocks.1.ffn.1.weight"]
    if kind == "two_unmarked_copies":  # no index and no variant in the names says which to read
        folder = tmp_path / "transformer"
        folder.mkdir()
        save_safetensors(state, folder / "diffusion_pytorch_model.safetensors")
        save_safetensors(state, folder / "wan_copy.safetensors")
        return folder, ["diffusion_pytorch_model.safetensors and wan_copy.safetensors both hold",
                        "two copies of the weights?", "point SRC at one file"]
    if kind == "two_pth_files":  # a folder without safetensors is read from its one PyTorch file
        folder = tmp_path / "weights"
        folder.mkdir()
        save_torch(state, folder / "a.pth")
        save_torch(state, folder / "b.bin")
        return folder, ["a.pth and b.bin may each hold weights", "point SRC at one file"]
    raise ValueError(kind)


BAD = ["missing_path", "unknown_layout", "truncated_safetensors", "truncated_pth",
       "missing_and_unexpected_keys", "shape_mismatch", "i2v", "unsupported_quantisation",
       "two_unmarked_copies", "two_pth_files"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, capsys, kind):
    if kind in ("truncated_pth", "two_pth_files"):
        pytest.importorskip("torch")
    src, phrases = _broken(tmp_path, kind)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    assert wan_dit.main([str(src), str(out_parent / "dst"), "--num-heads", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert listing(out_parent) == set()


@pytest.mark.torch
@pytest.mark.parametrize("form", ["step_beside_weights", "ema_wrapper"])
def test_training_checkpoint_pth_is_one_clear_error(tmp_path, capsys, form):
    """A .pth with a non-tensor entry (a training checkpoint's step, or its weights under 'ema')."""
    torch = pytest.importorskip("torch")
    state = {k: torch.from_numpy(v) for k, v in original_state_dict().items()}
    saved = {**state, "step": 1000} if form == "step_beside_weights" else {"ema": state, "step": 1000}
    torch.save(saved, tmp_path / "train.pth")
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    assert wan_dit.main([str(tmp_path / "train.pth"), str(out_parent / "dst"), "--num-heads", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "'step' (int)" in err and "a training checkpoint? pass its weights dict" in err
    if form == "ema_wrapper":
        assert "'ema' (dict)" in err and "checkpoint['ema']" in err
    assert listing(out_parent) == set()


def test_bad_options(tmp_path):
    src = save_safetensors(original_state_dict(), tmp_path / "wan.safetensors")
    with pytest.raises(ConversionError, match="unknown --layout"):
        wan_dit.load(src, layout="comfy")
    with pytest.raises(ConversionError, match="missing"):
        wan_dit.load(src, layout="diffusers", num_heads=2)
    with pytest.raises(ConversionError, match="--reinit-text-embedding"):
        wan_dit.load(src, num_heads=2, text_dim=3584)
    with pytest.raises(ConversionError, match="--num-heads"):
        wan_dit.load(src)
    existing = tmp_path / "existing"
    existing.mkdir()
    assert wan_dit.main([str(src), str(existing), "--num-heads", "2"]) == 1
    assert listing(existing) == set()


def test_cli_refuses_a_seed_jax_would_cut_to_32_bits(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        wan_dit.main([str(tmp_path / "src"), str(tmp_path / "dst"), "--seed", str(2**32 + 7)])
    assert info.value.code == 2 and "4294967303 is not in [0, 2**32)" in capsys.readouterr().err


def test_folders_keep_the_setgid_bit_of_a_shared_group_parent(tmp_path):
    """A folder made in a setgid parent inherits the bit (files written in it keep the project's group);
    giving it the umask's mode must not clear it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)
    if not os.stat(shared).st_mode & stat.S_ISGID:
        pytest.skip("this file system does not keep the setgid bit")
    dst = _write("safetensors", shared / "dst", WEIGHTS)
    assert os.stat(dst).st_mode & stat.S_ISGID
    assert not os.stat(dst / "m.safetensors").st_mode & stat.S_ISGID
