"""WAN VAE converter: diffusers folder / original .pth / original safetensors -> Flax, export, bad input."""

import json
import shutil

import numpy as np
import pytest

from convert import checkpoint_io as io
from convert import wan_vae
from convert.checkpoint_io import ConversionError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random diffusers AutoencoderKLWan saved as a pipeline folder (`root/vae/`)."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16)
    root = tmp_path_factory.mktemp("pipeline")
    model.save_pretrained(root / "vae")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return root, state


def _original_state(state: dict, num_res_blocks: int = 2) -> dict:
    return {wan_vae.original_key(k, num_res_blocks): v for k, v in state.items()}


def _assert_trees_equal(a, b):
    flat_a, flat_b = io.flatten(a), io.flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)


def test_diffusers_folder(reference):
    root, state = reference
    config, params = wan_vae.load(root)  # the pipeline folder resolves to vae/
    assert (config.base_dim, config.z_dim, config.dim_mult, config.num_res_blocks) == (8, 16, (1, 2, 4, 4), 2)
    assert config.temporal_downsample == (False, True, True)
    flat = io.flatten(params["params"])
    assert len(flat) == len(state)
    np.testing.assert_array_equal(flat["encoder/conv_in/kernel"],
                                  state["encoder.conv_in.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(flat["decoder/mid_block/attentions_0/norm/gamma"],
                                  state["decoder.mid_block.attentions.0.norm.gamma"].reshape(-1))


def test_export_round_trip_is_exact(reference, tmp_path):
    root, state = reference
    config, params = wan_vae.load(root / "vae")
    out = wan_vae.export_diffusers(params, config, tmp_path / "vae")
    exported = dict(io.iter_checkpoint(out))
    assert exported.keys() == state.keys()
    for k, v in state.items():
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    reloaded = diffusers.AutoencoderKLWan.from_pretrained(out)  # diffusers accepts the folder
    assert reloaded.config.base_dim == 8 and list(reloaded.config.latents_std) == list(config.latents_std)


def contents(folder) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def test_export_replaces_only_an_earlier_export(reference, tmp_path):
    """A diffusers vae/ folder from save_pretrained (or the Hub) has the files an export has: only the
    export's marker lets --overwrite replace it."""
    root, _ = reference
    config, params = wan_vae.load(root / "vae")
    pipeline = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    shutil.copytree(root, pipeline)
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "transformer").mkdir()
    before = contents(tmp_path)
    with pytest.raises(ConversionError, match=r"is not an exported diffusers folder .* left alone"):
        wan_vae.export_diffusers(params, config, pipeline, overwrite=True)  # the pipeline, not its vae/
    with pytest.raises(ConversionError, match="already exists"):
        wan_vae.export_diffusers(params, config, pipeline / "vae")
    with pytest.raises(ConversionError, match=rf"vae holds diffusers weights without {io.EXPORT_MARKER}"):
        wan_vae.export_diffusers(params, config, pipeline / "vae", overwrite=True)  # diffusers' own vae/
    assert contents(tmp_path) == before
    out = wan_vae.export_diffusers(params, config, tmp_path / "exported")
    wan_vae.export_diffusers(params, config, out, overwrite=True)  # an earlier export
    assert sorted(p.name for p in out.iterdir()) == ["config.json", wan_vae.WEIGHTS_NAME, io.EXPORT_MARKER]
    assert wan_vae.load(out)[0] == config


def test_converter_replaces_only_its_own_checkpoints(reference, tmp_path, capsys):
    """`cp -r transformer hf_copy; convert.wan_vae vae hf_copy --overwrite` deleted the copy: any
    config.json + *.safetensors folder counted as replaceable, a downloaded one (or SRC itself) too."""
    root, _ = reference
    hf_copy = shutil.copytree(root / "vae", tmp_path / "hf_copy")
    config, params = wan_vae.load(root / "vae")
    ours = wan_vae.export_diffusers(params, config, tmp_path / "exported")
    before = contents(tmp_path)
    ours_refused = "is not a checkpoint folder of ours"
    for src, dst, message in ((root / "vae", hf_copy, ours_refused), (root / "vae", ours, ours_refused),
                              (hf_copy, hf_copy, "is the source")):
        assert wan_vae.main([str(src), str(dst), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert contents(tmp_path) == before
    assert wan_vae.main([str(root / "vae"), str(tmp_path / "converted")]) == 0
    assert wan_vae.main([str(root / "vae"), str(tmp_path / "converted"), "--overwrite"]) == 0


@pytest.mark.parametrize("relation", ["is", "is inside", "holds"])
def test_converter_refuses_a_destination_overlapping_the_source(tmp_path, capsys, relation):
    src = tmp_path / "vae"
    src.mkdir()
    (src / wan_vae.WEIGHTS_NAME).write_bytes(b"not read")  # a converter that reads it fails otherwise
    dst = {"is": src, "is inside": src / "converted", "holds": tmp_path}[relation]
    before = contents(tmp_path)
    for overwrite in ([], ["--overwrite"]):
        assert wan_vae.main([str(src), str(dst), *overwrite]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{dst} {relation} the source {src}" in err, err
    assert contents(tmp_path) == before


def test_original_names_match_diffusers_converter(reference):
    """Our original<->diffusers renaming is the inverse of diffusers' own convert_wan_vae_to_diffusers."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    _, state = reference
    original = _original_state(state)
    assert "encoder.conv1.weight" in original and "decoder.upsamples.4.shortcut.weight" in original
    back = convert_wan_vae_to_diffusers(dict(original))
    assert back.keys() == state.keys()
    for k in state:
        assert back[k] is state[k] or np.array_equal(back[k], state[k]), k


def test_original_pth_and_bf16_safetensors(reference, tmp_path):
    from safetensors.flax import save_file

    root, state = reference
    config, params = wan_vae.load(root)
    original = _original_state(state)
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save({k: torch.from_numpy(v) for k, v in original.items()}, pth)
    pth_config, pth_params = wan_vae.load(pth)
    assert pth_config == config  # the structure is inferred from shapes; z_dim 16 gets WAN's statistics
    _assert_trees_equal(pth_params, params)
    legacy = tmp_path / "legacy_format.pth"  # torch's pre-1.6 format (not zip), which cannot be mmapped
    torch.save({k: torch.from_numpy(v) for k, v in original.items()}, legacy,
               _use_new_zipfile_serialization=False)
    legacy_config, legacy_params = wan_vae.load(legacy)
    assert legacy_config == config
    _assert_trees_equal(legacy_params, params)

    import jax.numpy as jnp

    single = tmp_path / "wan_2.1_vae.safetensors"  # ComfyUI: original names, bf16, here with a prefix
    save_file({f"first_stage_model.{k}": jnp.asarray(v, jnp.bfloat16) for k, v in original.items()},
              str(single))
    bf16_config, bf16_params = wan_vae.load(single, layout="original")
    assert bf16_config == config
    rounded = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) for k, v in io.flatten(params).items()}
    _assert_trees_equal(bf16_params, io.unflatten(rounded))


@pytest.fixture(scope="module")
def own_statistics(tmp_path_factory):
    """A tiny AutoencoderKLWan with latent statistics of its own, saved as safetensors and as .bin."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, latents_mean=[0.5] * 16, latents_std=[2.0] * 16)
    root = tmp_path_factory.mktemp("own_statistics")
    model.save_pretrained(root / "safetensors")
    model.save_pretrained(root / "bin", safe_serialization=False)
    return root


def test_weights_file_and_bin_folder_bring_their_config(own_statistics):
    """Given its weights file, the converter ignored the config.json beside it and took WAN 2.1's latent
    statistics for z_dim 16; a folder saved with safe_serialization=False was refused (no .safetensors)."""
    root = own_statistics
    assert listing(root / "bin") == {"config.json", "diffusion_pytorch_model.bin"}
    config, params = wan_vae.load(root / "safetensors")
    assert config.latents_mean == (0.5,) * 16 and config.latents_std == (2.0,) * 16
    for src in (root / "safetensors" / wan_vae.WEIGHTS_NAME, root / "bin",
                root / "bin" / "diffusion_pytorch_model.bin"):
        other_config, other_params = wan_vae.load(src)
        assert other_config == config, src
        _assert_trees_equal(other_params, params)


@pytest.mark.parametrize("other", [{"_class_name": "WanModel", "in_dim": 16}, {"foo": 1}])
def test_weights_file_beside_another_model_s_config_is_inferred(own_statistics, tmp_path, other):
    """The original Wan2.1 release keeps its VAE file beside the DiT's config.json, and other tools write
    config.json files without a `_class_name`: neither is the VAE's."""
    (tmp_path / "config.json").write_text(json.dumps(other))
    shutil.copy(own_statistics / "safetensors" / wan_vae.WEIGHTS_NAME, tmp_path)
    config, _ = wan_vae.load(tmp_path / wan_vae.WEIGHTS_NAME)
    assert config.latents_mean == wan_vae._vae().WAN21_LATENTS_MEAN  # inferred: z_dim 16 gets WAN's


def listing(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_cli_writes_a_loadable_checkpoint(reference, tmp_path, capsys):
    root, _ = reference
    dst = tmp_path / "ours"
    assert wan_vae.main([str(root / "vae"), str(dst)]) == 0
    config, params = wan_vae.load(dst)
    ref_config, ref_params = wan_vae.load(root)
    assert config == ref_config
    _assert_trees_equal(params, ref_params)
    assert wan_vae.main([str(root / "vae"), str(dst)]) == 1  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


def _copy_with(src_folder, dst_folder, tensors=None, config_update=None):
    shutil.copytree(src_folder, dst_folder)
    if tensors is not None:
        from safetensors.numpy import save_file

        for f in dst_folder.glob("*.safetensors"):
            f.unlink()
        save_file(tensors, str(dst_folder / wan_vae.WEIGHTS_NAME))
    if config_update:
        path = dst_folder / "config.json"
        config = json.loads(path.read_text())
        config.update(config_update)
        path.write_text(json.dumps(config))
    return dst_folder


def test_bad_inputs_raise_one_clear_error(reference, tmp_path):
    root, state = reference
    cases = {}
    broken = dict(state)
    del broken["decoder.conv_out.bias"]
    broken["decoder.extra.weight"] = np.zeros(3, np.float32)
    cases["keys"] = (_copy_with(root / "vae", tmp_path / "keys", broken),
                     ["missing (1): decoder.conv_out.bias", "unexpected (1): decoder.extra.weight"])
    reshaped = dict(state)
    reshaped["encoder.conv_in.bias"] = np.zeros(5, np.float32)
    cases["shapes"] = (_copy_with(root / "vae", tmp_path / "shapes", reshaped),
                       ["encoder.conv_in.bias: found (5,), expected (8,)"])
    cases["wan2.2"] = (_copy_with(root / "vae", tmp_path / "wan22", config_update={"is_residual": True}),
                       ["not a WAN 2.1 VAE config", "is_residual=True"])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    cases["garbage"] = (garbage, ["not a readable safetensors file"])
    cases["absent"] = (tmp_path / "nowhere", ["no such file or folder"])
    from safetensors.numpy import save_file

    unknown = tmp_path / "unknown.safetensors"
    save_file({"foo.weight": np.zeros(2, np.float32)}, str(unknown))
    cases["layout"] = (unknown, ["unknown checkpoint layout"])
    for name, (src, fragments) in cases.items():
        with pytest.raises(ConversionError) as info:
            wan_vae.load(src)
        for fragment in fragments:
            assert fragment in str(info.value), (name, str(info.value))
    dst = tmp_path / "never"
    assert wan_vae.main([str(cases["shapes"][0]), str(dst)]) == 1
    assert not dst.exists() and not list(tmp_path.glob(".never*"))
    with pytest.raises(ConversionError, match="layout"):
        wan_vae.load(root, layout="comfy")


def test_original_release_folder_is_refused_before_its_dit_is_read(reference, tmp_path, capsys, monkeypatch):
    """The original Wan2.1 folder holds the DiT's safetensors and config.json beside Wan2.1_VAE.pth: given
    it (or its DiT file), the converter read every DiT tensor, then failed without naming the path."""
    from safetensors.numpy import save_file

    root, state = reference
    release = tmp_path / "Wan2.1-T2V-1.3B"
    release.mkdir()
    dit = {"patch_embedding.weight": np.zeros((8, 16, 1, 2, 2), np.float32),
           "head.modulation": np.zeros((1, 2, 8), np.float32),
           **{f"blocks.{i}.self_attn.q.weight": np.zeros((8, 8), np.float32) for i in range(2)}}
    save_file(dit, str(release / "diffusion_pytorch_model.safetensors"))
    (release / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 8}))
    vae_file = release / "Wan2.1_VAE.pth"
    torch.save({k: torch.from_numpy(v) for k, v in _original_state(state).items()}, vae_file)
    read = []
    monkeypatch.setattr(io, "iter_safetensors", lambda *args, **kwargs: read.append(args) or iter(()))
    for src in (release, release / "diffusion_pytorch_model.safetensors"):
        for layout in ("auto", "original"):
            with pytest.raises(ConversionError) as info:
                wan_vae.load(src, layout=layout)
            message = str(info.value)
            assert message.startswith(f"{src}: unknown checkpoint layout"), message
            assert "a WAN DiT's weights (convert.wan_dit" in message, message
            assert f"{vae_file}: point SRC at it" in message, message
    assert read == []
    assert wan_vae.main([str(release), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(vae_file) in err, err
    monkeypatch.undo()
    config, params = wan_vae.load(vae_file)  # what the error points at converts
    ref_config, ref_params = wan_vae.load(root)
    assert config == ref_config
    _assert_trees_equal(params, ref_params)


@pytest.mark.parametrize("form", ["step_beside_weights", "ema_wrapper"])
def test_training_checkpoint_pth_is_one_clear_error(reference, tmp_path, capsys, form):
    """A .pth with a non-tensor entry (a training checkpoint's step, or its weights under 'ema')."""
    state = {k: torch.from_numpy(v) for k, v in _original_state(reference[1]).items()}
    saved = {**state, "step": 1000} if form == "step_beside_weights" else {"ema": state, "step": 1000}
    torch.save(saved, tmp_path / "train.pth")
    dst = tmp_path / "out"
    assert wan_vae.main([str(tmp_path / "train.pth"), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "'step' (int)" in err and "a training checkpoint? pass its weights dict" in err
    if form == "ema_wrapper":
        assert "'ema' (dict)" in err and "checkpoint['ema']" in err
    assert not dst.exists() and not list(tmp_path.glob(".out*"))
