"""Starting a run: converted weights in either scan layout (or converted on the fly), an EMA in buffers of
its own, and resuming a checkpoint saved with or without EMA, with another optimizer or damaged."""

import dataclasses
import logging
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_step import max_abs_diff, setup
from train_helpers import make_batch, mesh_of, tiny_config

from convert import wan_dit
from genmask_jax.infer.checkpoint import CheckpointError, restore_dit_params
from genmask_jax.models import build
from genmask_jax.models.dit import init_params
from genmask_jax.train import checkpointing, loop
from genmask_jax.train.hooks import inference_params
from genmask_jax.train.state import abstract_train_state, make_optimizer

P = jax.sharding.PartitionSpec
EMA_DECAY = 0.9
BF16, F32 = np.dtype(jnp.bfloat16), np.dtype(np.float32)


def leaves_equal(a, b) -> list[str]:
    return checkpointing.tree_equal_report(jax.device_get(a), jax.device_get(b))


def stack_layers(unscanned: dict) -> dict:
    """Unscanned DiT params in nn.scan's layout: `blocks_i` -> `blocks` with a leading layer axis."""
    names = sorted((k for k in unscanned if k.startswith("blocks_")), key=lambda k: int(k.split("_")[1]))
    out = {k: v for k, v in unscanned.items() if not k.startswith("blocks_")}
    out["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *[unscanned[k] for k in names])
    return out


def random_converted(dit_config, seed: int = 5) -> dict:
    """Random unscanned DiT weights as host arrays, as `convert.wan_dit` writes them."""
    unscanned = dataclasses.replace(dit_config, scan_layers=False)
    return jax.tree.map(np.asarray, init_params(unscanned, jax.random.key(seed)))


def run_of(mesh, **overrides):
    config = tiny_config(**overrides)
    state, shardings, step, rules = setup(mesh, **overrides)
    return SimpleNamespace(config=config, model=build.build_model(config), state=state,
                           shardings=shardings, step=step, rules=rules, mesh=mesh)


@pytest.fixture(scope="module")
def ema_run():
    """A tiny one-device run with EMA; its step compiles once for the tests below."""
    return run_of(mesh_of((1, 1, 1)), ema_decay=EMA_DECAY)


def fresh_state(run):
    """A copy of the run's initial state: the step donates (deletes) the state it is given."""
    return jax.tree.map(lambda x: x.copy(), run.state)


def train_one_step(run, state):
    batch = loop.global_batch(make_batch(0, 2, 2), run.mesh, run.rules)
    state, metrics = run.step(state, batch, jax.random.key(0))
    return state, float(metrics["loss"])


def test_converted_weights_with_ema_train(ema_run, tmp_path):
    converted = random_converted(ema_run.model.dit)
    wan_dit.save(tmp_path / "converted", ema_run.model.dit, converted)
    config = tiny_config(ema_decay=EMA_DECAY, init_from=str(tmp_path / "converted"))
    workdir = checkpointing.Checkpointer(tmp_path / "work", async_save=False)
    out, origin = loop.restore_or_init(config, fresh_state(ema_run), ema_run.shardings, workdir, None,
                                       ema_run.model)
    workdir.close()
    assert origin.startswith("converted") and leaves_equal(out.ema_params, converted) == []
    # Before the EMA had buffers of its own this step failed: "Attempt to donate the same buffer twice".
    trained, loss = train_one_step(ema_run, out)
    assert np.isfinite(loss)
    # The first step has lr 0 (warmup), so the EMA of unchanged params is still the converted weights
    # (up to the rounding of 0.9 x + 0.1 x).
    assert max_abs_diff(trained.ema_params, converted) < 1e-6


def test_resume_without_saved_ema_starts_it_from_the_params(ema_run, tmp_path, caplog):
    """A run that turned ema_decay on resumes a checkpoint saved without EMA."""
    state = fresh_state(ema_run)
    saved = state.replace(step=state.step + 3, params=jax.tree.map(lambda x: x + 1, state.params))
    workdir = checkpointing.Checkpointer(tmp_path, async_save=False)
    workdir.save(3, saved.replace(ema_params=None).trainable())
    with caplog.at_level(logging.WARNING):
        out, origin = loop.restore_or_init(ema_run.config, fresh_state(ema_run), ema_run.shardings, workdir,
                                           None, ema_run.model)
    workdir.close()
    assert origin == "workdir step 3" and "no EMA parameters" in caplog.text
    assert leaves_equal(out.params, saved.params) == [] and leaves_equal(out.ema_params, saved.params) == []
    trained, loss = train_one_step(ema_run, out)  # the EMA is a copy, not the params' buffers
    assert np.isfinite(loss) and int(trained.step) == 4


def test_resume_with_ema_saved_but_off_drops_it(ema_run, tmp_path, caplog):
    """A run that turned ema_decay off resumes a checkpoint saved with EMA."""
    state = fresh_state(ema_run)
    saved = state.replace(ema_params=jax.tree.map(lambda x: x - 1, state.params))
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    ckpt.save(2, saved.trainable())
    without_ema = abstract_train_state(ema_run.shardings, state).trainable() | {"ema_params": None}
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore(None, without_ema)
    ckpt.close()
    assert restored["ema_params"] is None and "not restoring its ema_params" in caplog.text
    assert leaves_equal(restored["params"], saved.params) == []
    assert leaves_equal(restored["opt_state"], saved.opt_state) == []


@pytest.mark.parametrize("saved, wanted", [
    ({"grad_clip": 1.0}, {"grad_clip": 0.0}),
    ({"grad_clip": 0.0}, {"grad_clip": 1.0}),
    ({"name": "adamw"}, {"name": "muon"}),
], ids=["clip_off", "clip_on", "adamw_to_muon"])
def test_resume_with_another_optimizer_fails_in_one_line(tmp_path, saved, wanted):
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    base = {"lr": 1e-3, "muon_lr": 0.02, "total_steps": 10}
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, {"step": jnp.asarray(1), "params": params,
                  "opt_state": make_optimizer({**base, **saved}).init(params)})
    wanted_state = {"step": jnp.asarray(0), "params": params,
                    "opt_state": make_optimizer({**base, **wanted}).init(params)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            wanted_state)
    with pytest.raises(CheckpointError, match=r"/1: its optimizer state \(\d+ arrays\) is not this run's "
                                              r".*optimizer.grad_clip 0 <-> > 0.*init_from\.$") as error:
        ckpt.restore(1, abstract)
    assert "\n" not in str(error.value)
    ckpt.close()


@pytest.mark.parametrize("saved_scan", [False, True], ids=["unscanned_file", "scanned_file"])
def test_converted_weights_load_into_the_other_scan_layout(tmp_path, saved_scan):
    """`scan_layers` is a layout of the same weights: a checkpoint converted with or without --scan-layers
    loads into either experiment."""
    run = run_of(mesh_of((1, 1, 1)), **{"model.dit.scan_layers": not saved_scan})
    converted = random_converted(run.model.dit)
    saved_config = dataclasses.replace(run.model.dit, scan_layers=saved_scan)
    wan_dit.save(tmp_path / "converted", saved_config, stack_layers(converted) if saved_scan else converted)
    config = tiny_config(**{"model.dit.scan_layers": not saved_scan}, init_from=str(tmp_path / "converted"))
    workdir = checkpointing.Checkpointer(tmp_path / "work", async_save=False)
    out, origin = loop.restore_or_init(config, run.state, run.shardings, workdir, None, run.model)
    workdir.close()
    assert origin.startswith("converted")
    assert leaves_equal(out.params, converted if saved_scan else stack_layers(converted)) == []
    assert jax.tree.map(lambda x: x.sharding, out.params) == run.shardings.params


@pytest.mark.multidevice
def test_host_weights_stay_on_the_host_until_put_into_the_parameter_shardings(tmp_path, monkeypatch):
    """PyTorch files converted on the fly come as host arrays: merging them into the experiment's dtype
    keeps them on the host (not the whole model committed to device 0 first), and restore_or_init puts
    each leaf straight into its parameter's sharding."""
    overrides = {"model.dit.param_dtype": "bfloat16"}
    run = run_of(mesh_of((1, 8, 1)), **overrides)
    host = random_converted(dataclasses.replace(run.model.dit, param_dtype="float32"))
    merged = loop.merge_converted_params(run.state.params, host, run.model.dit, run.model.dit)
    assert {(type(x), x.dtype) for x in jax.tree.leaves(merged)} == {(np.ndarray, BF16)}

    monkeypatch.setattr(wan_dit, "load", lambda path, target=None, **kwargs: (run.model.dit, host))
    config = tiny_config(**overrides, init_from=str(tmp_path / "transformer"))  # read as PyTorch files
    workdir = checkpointing.Checkpointer(tmp_path / "work", async_save=False)
    out, origin = loop.restore_or_init(config, run.state, run.shardings, workdir, None, run.model)
    workdir.close()
    assert origin.startswith("converted")
    assert jax.tree.map(lambda x: x.sharding, out.params) == run.shardings.params
    kernel = out.params["blocks_0"]["ffn"]["proj_in"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor") and len(kernel.sharding.device_set) == 8
    assert leaves_equal(out.params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), host)) == []


@pytest.fixture(scope="module")
def bf16_ema_run():
    """A tiny one-device run with bfloat16 parameters and EMA decay 0.999."""
    return run_of(mesh_of((1, 1, 1)), ema_decay=0.999, **{"model.dit.param_dtype": "bfloat16"})


def dtypes(tree) -> set:
    return {x.dtype for x in jax.tree.leaves(tree)}


@pytest.mark.slow
def test_the_ema_of_bfloat16_params_is_float32_and_moves(bf16_ema_run):
    """In bfloat16 a 0.999 EMA would never move: its steps (1 - 0.999) * (p - ema) fall below bfloat16's
    resolution."""
    run = bf16_ema_run
    state = fresh_state(run)
    assert dtypes(state.params) == {BF16} and dtypes(state.ema_params) == {F32}
    assert dtypes(abstract_train_state(run.shardings, state).ema_params) == {F32}
    assert jax.tree.map(lambda x: x.sharding, state.ema_params) == run.shardings.ema_params
    assert dtypes(inference_params(state)) == {BF16}  # the quick evaluation's, as inference's
    p0 = jax.device_get(state.params)
    for _ in range(2):  # the first has lr 0 (warmup)
        state, loss = train_one_step(run, state)
    assert np.isfinite(loss) and dtypes(state.ema_params) == {F32}
    p2, ema = jax.device_get((state.params, state.ema_params))
    # A constant decay (setup's step has no warmup): ema = 0.999 p0 + 0.001 p2 (p1 = p0), up to XLA
    # handing the EMA the new params before their bfloat16 rounding (0.001 x 2^-9 |p| <= 4e-6 here).
    expected = jax.tree.map(lambda a, b: 0.999 * a.astype(np.float32) + 0.001 * b.astype(np.float32), p0, p2)
    assert max_abs_diff(ema, p0) > 0 and max_abs_diff(ema, expected) < 1e-5


def test_a_bfloat16_ema_saved_before_it_was_float32_resumes(bf16_ema_run, tmp_path):
    run = bf16_ema_run
    state = fresh_state(run)
    old_ema = jax.tree.map(lambda x: (x + 0.5).astype(jnp.bfloat16), state.ema_params)
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    ckpt.save(3, state.replace(step=state.step + 3, ema_params=old_ema).trainable())
    out, origin = loop.restore_or_init(run.config, fresh_state(run), run.shardings, ckpt, None, run.model)
    ckpt.close()
    assert origin == "workdir step 3" and dtypes(out.ema_params) == {F32}
    assert leaves_equal(out.ema_params, jax.tree.map(lambda x: x.astype(jnp.float32), old_ema)) == []
    assert jax.tree.map(lambda x: x.sharding, out.ema_params) == run.shardings.ema_params


def test_inference_reads_the_float32_ema_in_the_param_dtype(bf16_ema_run, tmp_path):
    run = bf16_ema_run
    state = fresh_state(run)
    ema = jax.tree.map(lambda x: x + 1e-3, state.ema_params)  # not representable in bfloat16
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state.replace(ema_params=ema).trainable())
    ckpt.close()
    expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ema)
    for mesh in (run.mesh, None):  # sharded, and as host arrays
        params, key = restore_dit_params(tmp_path, 1, run.model, mesh, run.rules)
        assert key == "ema_params" and dtypes(params) == {BF16}
        assert leaves_equal(params, expected) == []
    saved, _ = restore_dit_params(tmp_path, 1, run.model, None, None, saved_dtypes=True)  # convert.export's
    assert dtypes(saved) == {F32} and leaves_equal(saved, ema) == []


@pytest.mark.torch
def test_pytorch_weights_convert_on_the_fly_into_a_scanned_run(tmp_path):
    from test_dit import tiny_diffusers_model  # skips without torch / diffusers

    tiny_diffusers_model(seed=1).save_pretrained(tmp_path / "transformer")
    overrides = {"model.dit.scan_layers": True}
    run = run_of(mesh_of((1, 1, 1)), **overrides)
    config = tiny_config(**overrides, init_from=str(tmp_path / "transformer"))
    workdir = checkpointing.Checkpointer(tmp_path / "work", async_save=False)
    out, origin = loop.restore_or_init(config, run.state, run.shardings, workdir, None, run.model)
    workdir.close()
    _, unscanned = wan_dit.convert_checkpoint(tmp_path / "transformer")  # the converter's default layout
    assert origin.startswith("converted") and leaves_equal(out.params, stack_layers(unscanned)) == []


@pytest.mark.multidevice
@pytest.mark.parametrize("model_scans", [True, False], ids=["scanned_model", "unscanned_model"])
def test_converted_weights_in_the_other_layout_are_read_sharded(tmp_path, model_scans):
    """Each host reads only its shards of a block saved in the other layout, not the whole array."""
    mesh = mesh_of((2, 2, 2))
    run = run_of(mesh, **{"model.dit.scan_layers": model_scans})
    converted = random_converted(run.model.dit)
    saved_config = dataclasses.replace(run.model.dit, scan_layers=not model_scans)
    wan_dit.save(tmp_path / "converted", saved_config, converted if model_scans else stack_layers(converted))
    target = loop.converted_target(tmp_path / "converted", run.state.params, run.shardings.params, mesh)
    kernel = lambda tree: tree["ffn"]["proj_in"]["kernel"]  # noqa: E731
    if model_scans:  # one layer of the model's stack: its sharding without the layer axis
        assert kernel(target["blocks_1"]).sharding.spec == P("fsdp", "tensor")
        assert kernel(target["blocks_1"]).shape == kernel(converted["blocks_1"]).shape
    else:  # the saved stack of the model's layers: their sharding behind an unsplit layer axis
        assert kernel(target["blocks"]).sharding.spec == P(None, "fsdp", "tensor")


def cut_in_half(file) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["all_deleted", "one_truncated", "one_deleted", "metadata_deleted"])
def test_a_damaged_latest_checkpoint_fails_in_one_line(ema_run, tmp_path, damage):
    """Array files missing from the latest step or cut short (a half-synced copy, a deleted object): one
    line naming its folder, and no silent fall back to the step before. One OCDBT file cut or deleted
    raised a bare Exception (tensorstore's FAILED_PRECONDITION or OUT_OF_RANGE its cause): a traceback."""
    state = fresh_state(ema_run)
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    for step in (2, 4):
        ckpt.save(step, state.replace(step=state.step + step).trainable())
    data = [f for f in (tmp_path / "4" / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert data
    largest = max(data, key=lambda f: f.stat().st_size)
    if damage == "one_truncated":
        cut_in_half(largest)
    metadata = [tmp_path / "4" / "state" / "_METADATA"]
    for f in {"all_deleted": data, "one_deleted": [largest], "metadata_deleted": metadata}.get(damage, []):
        f.unlink()
    folder = re.escape(str(tmp_path / "4"))
    message = (rf"^checkpoint {folder} is damaged or incomplete \(.+\); "
               r"remove that folder to resume from step 2$")
    with pytest.raises(CheckpointError, match=message) as error:
        loop.restore_or_init(ema_run.config, fresh_state(ema_run), ema_run.shardings, ckpt, None,
                             ema_run.model)
    assert "\n" not in str(error.value)
    ckpt.close()


def test_a_damaged_explicit_checkpoint_or_converted_checkpoint_fails_in_one_line(ema_run, tmp_path):
    """`config.resume` and `config.init_from` with files cut short or missing: one line each, as the
    workdir's checkpoint, not orbax's traceback."""
    from convert.checkpoint_io import ConversionError

    other = checkpointing.Checkpointer(tmp_path / "other", async_save=False)
    other.save(2, fresh_state(ema_run).trainable())
    other.close()
    data = [f for f in (tmp_path / "other" / "2" / "state").rglob("*") if f.parent.name == "d"]
    cut_in_half(max(data, key=lambda f: f.stat().st_size))
    dit = ema_run.model.dit
    converted = wan_dit.save(tmp_path / "converted", dit, random_converted(dit))
    (converted / "params" / "_METADATA").unlink()
    damaged = "is damaged or incomplete"
    cases = ((CheckpointError, {"resume": str(tmp_path / "other")},
              rf"^checkpoint {re.escape(str(tmp_path / 'other'))}/2 {damaged} \(.+\); pass another step's"),
             (ConversionError, {"init_from": str(converted)},
              rf"^{re.escape(str(converted))} {damaged} \(FileNotFoundError: .+\); convert it again"))
    workdir = checkpointing.Checkpointer(tmp_path / "work", async_save=False)
    run = ema_run
    for error_type, overrides, message in cases:
        config = tiny_config(ema_decay=EMA_DECAY, **overrides)
        with pytest.raises(error_type, match=message) as error:
            loop.restore_or_init(config, fresh_state(run), run.shardings, workdir, None, run.model)
        assert "\n" not in str(error.value)
    workdir.close()


def test_only_missing_or_corrupt_files_count_as_damage():
    """A config the saved data position cannot resume (the batch changed with the layout), a permission
    or a network error: their own errors, never the advice to remove a good checkpoint."""
    import json

    from convert.checkpoint_io import storage_damage

    damaged = [ValueError('NOT_FOUND: Error opening "zarr" driver: Metadata at ... not found'),
               ValueError("DATA_LOSS: Error reading chunk"),
               ValueError('FAILED_PRECONDITION: Error reading "params.w/0": Truncated Zstd-compressed'),
               ValueError("OUT_OF_RANGE: Requested byte range [0, 9) is not valid for value of size 4"),
               FileNotFoundError("params/_METADATA"), json.JSONDecodeError("Expecting value", "", 0)]
    for error in damaged:
        assert storage_damage(error) is error
        try:  # restoring onto devices, orbax raises a bare Exception from tensorstore's
            raise Exception("Encountered error while reading array index") from error
        except Exception as wrapped:
            assert storage_damage(wrapped) is error
    for error in (ValueError("the global batch (3 examples) does not split over the saved run's"),
                  ValueError("PERMISSION_DENIED: gs://bucket/run/4"), PermissionError("run/4/state"),
                  Exception("Encountered error while reading array index")):
        assert storage_damage(error) is None
