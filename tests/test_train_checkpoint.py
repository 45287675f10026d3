"""Checkpoints: optimizer state restored leaf by leaf, restore onto another mesh, the resume order."""

import jax
import numpy as np
import pytest
from test_train_step import max_abs_diff, run, setup
from train_helpers import make_batch, mesh_of, random_vae, tiny_config, tiny_model

from convert import wan_dit
from genmask_jax.infer.checkpoint import CheckpointError
from genmask_jax.models import build
from genmask_jax.models.dit import init_params
from genmask_jax.parallel.sharding import rules_from_config
from genmask_jax.train import checkpointing, loop
from genmask_jax.train.state import (
    abstract_train_state,
    attach_frozen,
    create_train_state,
    make_optimizer,
    train_state_shapes,
)
from genmask_jax.train.step import optimizer_config


def leaves_equal(a, b) -> list[str]:
    return checkpointing.tree_equal_report(jax.device_get(a), jax.device_get(b))


@pytest.mark.slow
@pytest.mark.multidevice
def test_accumulated_state_restores_exactly_onto_another_mesh(tmp_path):
    trained, _ = run(mesh_of((1, 1, 1)), [make_batch(i, 8, 8) for i in range(2)], microbatches=4)
    ckpt = checkpointing.Checkpointer(tmp_path, keep=2, async_save=True)
    ckpt.save(2, trained.trainable(), config=tiny_config())
    ckpt.wait()

    mesh = mesh_of((2, 2, 2))
    fresh, shardings, _, _ = setup(mesh)
    # A restore that silently kept the fresh optimizer state would be caught: it differs from the saved.
    assert leaves_equal(fresh.opt_state, trained.opt_state)
    restored = ckpt.restore(None, abstract_train_state(shardings, fresh).trainable())
    assert leaves_equal(restored["opt_state"], trained.opt_state) == []
    assert leaves_equal(restored["params"], trained.params) == []
    assert int(restored["step"]) == 2 and restored["ema_params"] is None
    kernel = restored["params"]["blocks_0"]["ffn"]["proj_in"]["kernel"]
    assert kernel.sharding == shardings.params["blocks_0"]["ffn"]["proj_in"]["kernel"]
    mu = restored["opt_state"][1][0].mu["blocks_0"]["ffn"]["proj_in"]["kernel"]
    assert mu.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert ckpt.restore_config()["model"]["dit"]["dim"] == 64
    ckpt.close()


def state_for_resume(config, mesh):
    model = build.build_model(config)
    state, shardings, _, _ = setup(mesh)
    return model, state, shardings


def bump(state, value):
    return state.replace(step=state.step + value, params=jax.tree.map(lambda x: x + value, state.params))


def test_resume_order_workdir_then_explicit_then_converted_then_scratch(tmp_path):
    mesh = mesh_of((1, 1, 1))
    config = tiny_config()
    model, state, shardings = state_for_resume(config, mesh)
    workdir = checkpointing.Checkpointer(tmp_path / "work", async_save=False)

    # 4. scratch
    out, origin = loop.restore_or_init(config, state, shardings, workdir, None, model)
    assert origin == "scratch" and leaves_equal(out.params, state.params) == []

    # 3. converted WAN weights with another text width: the text embedder is re-initialised.
    converted_cfg = model.dit.__class__.from_dict({**model.dit.to_dict(), "text_dim": 16})
    converted = jax.tree.map(np.asarray, init_params(converted_cfg, jax.random.key(5)))
    wan_dit.save(tmp_path / "converted", converted_cfg, converted)
    config.init_from = str(tmp_path / "converted")
    out, origin = loop.restore_or_init(config, state, shardings, workdir, None, model)
    assert origin.startswith("converted")
    text = ("condition_embedder", "text_embedder")
    assert leaves_equal(out.params[text[0]][text[1]], state.params[text[0]][text[1]]) == []
    assert leaves_equal(out.params["blocks_1"], converted["blocks_1"]) == []
    assert leaves_equal(out.params[text[0]]["time_proj"], converted[text[0]]["time_proj"]) == []
    assert int(out.step) == 0

    # 2. an explicit checkpoint beats converted weights: a run's workdir, its manager folder or one step.
    run = tmp_path / "other"
    other = checkpointing.Checkpointer(run / "checkpoints", async_save=False)
    other.save(5, bump(state, 5).trainable())
    other.close()
    for path in (run, run / "checkpoints", run / "checkpoints" / "5"):
        config.resume = str(path)
        out, origin = loop.restore_or_init(config, state, shardings, workdir, None, model)
        assert origin.startswith("checkpoint") and int(out.step) == 5
    config.resume = str(tmp_path / "converted")  # no steps: one line, not a silent fall-through
    with pytest.raises(CheckpointError, match="no checkpoint steps"):
        loop.restore_or_init(config, state, shardings, workdir, None, model)
    config.resume = str(run)

    # 1. the workdir's latest beats everything.
    workdir.save(7, bump(state, 7).trainable())
    out, origin = loop.restore_or_init(config, state, shardings, workdir, None, model)
    assert origin == "workdir step 7" and int(out.step) == 7
    assert max_abs_diff(out.params, bump(state, 7).params) == 0
    workdir.close()


def shapes_and_made(config, mesh):
    """(`train_state_shapes`, the state `create_train_state` + `attach_frozen` make, its shardings)."""
    model, rules = build.build_model(config), rules_from_config(config.sharding.logical_axis_rules)
    tx, init = make_optimizer(optimizer_config(config)), build.dit_initializer(model)
    use_ema, frozen = config.ema_decay > 0, build.abstract_frozen(model)
    shapes, shardings = train_state_shapes(build.abstract_dit(model), tx, mesh, rules, use_ema, frozen)
    made, _ = create_train_state(init, tx, jax.random.key(3), mesh, rules, use_ema, frozen)
    return shapes, attach_frozen(made, shardings, {"vae": random_vae(model)}), shardings


@pytest.mark.multidevice
@pytest.mark.parametrize(
    "mesh_shape,overrides",
    [((2, 2, 2), {"ema_decay": 0.999, "model.dit.param_dtype": "bfloat16"}),
     ((1, 1, 1), {"optimizer.name": "muon"})],
    ids=["adamw-ema-bfloat16-2x2x2", "muon"],
)
def test_state_shapes_are_those_of_the_made_state(mesh_shape, overrides):
    """The restore target that training builds without allocating is the state it would make: every leaf's
    shape, dtype (the EMA float32 beside bfloat16 params) and sharding."""
    shapes, made, _ = shapes_and_made(tiny_config(**overrides), mesh_of(mesh_shape))
    describe = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)
    assert describe(shapes) == describe(made)
    dtypes = lambda tree: {x.dtype.name for x in jax.tree.leaves(tree)}
    if "ema_decay" in overrides:
        assert dtypes(shapes.params) == {"bfloat16"} and dtypes(shapes.ema_params) == {"float32"}
    assert len(jax.tree.leaves(shapes)) == len(jax.tree.leaves(made)) > 100


def test_a_restore_never_makes_the_initial_state(tmp_path):
    """Given the state's shapes and a maker, restore_or_init makes the random initial state only when it
    restores nothing: a resume neither compiles nor holds it beside the restored state."""
    config = tiny_config()
    shapes, made, shardings = shapes_and_made(config, mesh_of((1, 1, 1)))
    model, calls = build.build_model(config), []
    initialize = lambda: calls.append("made") or made.replace(frozen={})
    workdir = checkpointing.Checkpointer(tmp_path / "work", async_save=False)
    out, origin = loop.restore_or_init(config, shapes, shardings, workdir, None, model, initialize=initialize)
    assert origin == "scratch" and calls == ["made"] and leaves_equal(out.params, made.params) == []

    other = checkpointing.Checkpointer(tmp_path / "other" / "checkpoints", async_save=False)
    other.save(5, bump(made, 5).trainable())
    other.close()
    config.resume = str(tmp_path / "other")
    out, origin = loop.restore_or_init(config, shapes, shardings, workdir, None, model, initialize=initialize)
    assert origin.startswith("checkpoint") and int(out.step) == 5 and calls == ["made"]
    workdir.save(7, bump(made, 7).trainable())
    out, origin = loop.restore_or_init(config, shapes, shardings, workdir, None, model, initialize=initialize)
    assert origin == "workdir step 7" and calls == ["made"]
    assert leaves_equal(out.trainable(), bump(made, 7).trainable()) == []
    workdir.close()


@pytest.mark.multidevice
def test_converted_weights_restore_straight_into_the_parameter_shardings(tmp_path):
    mesh = mesh_of((2, 2, 2))
    config = tiny_config()
    model, state, shardings = state_for_resume(config, mesh)
    converted = jax.tree.map(np.asarray, init_params(model.dit, jax.random.key(5)))
    wan_dit.save(tmp_path / "converted", model.dit, converted)
    kernel = lambda tree: tree["blocks_0"]["ffn"]["proj_in"]["kernel"]
    target = loop.converted_target(tmp_path / "converted", state.params, shardings.params, mesh)
    # Each host then reads only its shards: the kernel's target is split over fsdp and tensor.
    assert kernel(target).sharding == kernel(shardings.params)
    assert kernel(target).sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert loop.converted_target(tmp_path, state.params, shardings.params, mesh) is None  # not ours

    config.init_from = str(tmp_path / "converted")
    workdir = checkpointing.Checkpointer(tmp_path / "work", async_save=False)
    out, origin = loop.restore_or_init(config, state, shardings, workdir, None, model)
    assert origin.startswith("converted") and leaves_equal(out.params, converted) == []
    assert kernel(out.params).sharding == kernel(shardings.params)
    workdir.close()


def test_converted_weights_with_other_architecture_fail():
    model = tiny_model()
    fresh = jax.eval_shape(lambda: init_params(model.dit, jax.random.key(0)))
    other = model.dit.__class__.from_dict({**model.dit.to_dict(), "num_layers": 3})
    with pytest.raises(CheckpointError, match="converted DiT has num_layers=3, the experiment 2"):
        loop.merge_converted_params(fresh, {}, model.dit, other)


def _data_config():
    from genmask_jax.data.pipeline import default_data_config

    data = default_data_config()
    data.resolution, data.num_threads = (16, 16), 1
    data.encoder.context_length, data.encoder.dim = 8, 8
    return data


@pytest.mark.parametrize("recorded", [False, True])
def test_data_state_saved_by_another_process_count_resumes_by_step(tmp_path, recorded):
    """Without a recorded data layout (checkpoints from before it was), every process was a group."""
    import json

    from genmask_jax.data.pipeline import make_train_iterator

    data = _data_config()
    trainable = {"step": np.asarray(3, np.int32), "params": {"w": np.ones(3, np.float32)}}
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    it = make_train_iterator(data, 2, 2, seed=1, process_index=0, process_count=1)
    reference = [next(it) for _ in range(5)]
    ckpt.save(3, trainable, data_iterator=it)
    # As if two processes (1 seg + 1 gen each: the same global batch) had saved it after 3 steps.
    folder = tmp_path / "3" / checkpointing.DATA
    for f in folder.glob("process_*.json"):
        f.unlink()
    for p in range(2):
        (folder / f"process_{p}-of-2.json").write_text(json.dumps({"next_index": 3 * 2}))
    layout = tmp_path / "3" / checkpointing.DATA_LAYOUT
    if recorded:
        (layout / "metadata").write_text(json.dumps({"group_count": 2, "process_count": 2}))
    else:
        for f in layout.iterdir():
            f.unlink()
        layout.rmdir()
    fresh = make_train_iterator(data, 2, 2, seed=1, process_index=0, process_count=1)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    ckpt.restore(3, abstract, data_iterator=fresh)
    np.testing.assert_array_equal(next(fresh)["seg"]["image"], reference[3]["seg"]["image"])
    ckpt.close()


def test_a_saved_data_position_that_the_iterator_cannot_take_is_not_called_missing(tmp_path, caplog):
    from genmask_jax.data.pipeline import make_train_iterator

    trainable = {"step": np.asarray(1, np.int32), "params": {"w": np.ones(3, np.float32)}}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, trainable, data_iterator=make_train_iterator(_data_config(), 2, 2, seed=1))
    with caplog.at_level("WARNING", logger="genmask_jax.train.checkpointing"):
        ckpt.restore(1, abstract, data_iterator=iter([]))
        ckpt.save(2, trainable)
        ckpt.restore(2, abstract, data_iterator=iter([]))
    ckpt.close()
    first, second = [r.getMessage() for r in caplog.records if "data restarts" in r.getMessage()]
    assert "1 holds a data position, but this run's data iterator (list_iterator) cannot take one" in first
    assert "2 has no data iterator state" in second


def _image_digests(batches) -> dict[str, list[bytes]]:
    """Per task, the sorted images of one global batch given as its groups' batches."""
    return {task: sorted(x.tobytes() for b in batches for x in b[task]["image"]) for task in ("seg", "gen")}


@pytest.mark.parametrize("saved_groups,resumed_groups", [(2, 1), (1, 2)])
def test_data_state_resumes_by_step_when_the_data_loading_group_count_changes(
    tmp_path, saved_groups, resumed_groups
):
    """The same processes on another mesh (a tensor axis now across hosts, or no longer) read the data in
    another number of groups: the saved position counts one group's elements of the saving layout."""
    from genmask_jax.data.pipeline import make_train_iterator

    data = _data_config()
    trainable = {"step": np.asarray(3, np.int32), "params": {"w": np.ones(3, np.float32)}}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)

    def group_iterator(group, groups):  # global batch 2 seg + 2 gen
        return make_train_iterator(data, 2 // groups, 2 // groups, seed=1, process_index=group,
                                    process_count=groups)

    whole = group_iterator(0, 1)
    reference = [_image_digests([next(whole)]) for _ in range(4)]
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    saving = group_iterator(0, saved_groups)
    for _ in range(3):
        next(saving)
    ckpt.save(3, trainable, data_iterator=saving)
    resumed = [group_iterator(g, resumed_groups) for g in range(resumed_groups)]
    for it in resumed:
        ckpt.restore(3, abstract, data_iterator=it)
    assert _image_digests([next(it) for it in resumed]) == reference[3]
    ckpt.close()


@pytest.mark.parametrize("recorded", ["layout", "config", "nothing"])
def test_a_data_position_saved_with_another_batch_is_refused_in_one_line(tmp_path, recorded, caplog):
    """The saved position counts both tasks' elements interleaved: resumed as 3+3 after 2 steps of 4+4
    grain put a generation example in the segmentation batch (KeyError 'mask'), as 6+2 it silently skipped
    and repeated examples. The counts are in the data layout; a checkpoint from before they were has them
    in its config; one with neither is resumed as this run's counts, with a warning."""
    import json

    from genmask_jax.data.pipeline import make_train_iterator

    data = _data_config()
    trainable = {"step": np.asarray(2, np.int32), "params": {"w": np.ones(3, np.float32)}}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    make = lambda seg, gen: make_train_iterator(data, seg, gen, seed=1, process_index=0, process_count=1)  # noqa: E731
    saving = make(4, 4)
    reference = [next(saving) for _ in range(3)]
    saving = make(4, 4)
    next(saving), next(saving)
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    ckpt.save(2, trainable, data_iterator=saving, config={"batch": {"seg": 4, "gen": 4}})
    ckpt.wait()
    layout = tmp_path / "2" / checkpointing.DATA_LAYOUT / "metadata"
    assert json.loads(layout.read_text()) == {"group_count": 1, "process_count": 1, "batch_seg": 4,
                                              "batch_gen": 4}
    if recorded != "layout":  # as saved before the counts were recorded
        layout.write_text(json.dumps({"group_count": 1, "process_count": 1}))
    if recorded == "nothing":
        config = tmp_path / "2" / checkpointing.CONFIG
        for f in config.iterdir():
            f.unlink()
        config.rmdir()
        with caplog.at_level("WARNING", logger="genmask_jax.train.checkpointing"):
            ckpt.restore(2, abstract, data_iterator=make(4, 4))
        assert "does not record the batch its data position was saved with" in caplog.text
    else:
        for seg, gen in ((6, 2), (3, 3)):
            with pytest.raises(CheckpointError) as error:
                ckpt.restore(2, abstract, data_iterator=make(seg, gen))
            message = str(error.value)
            assert "\n" not in message
            assert (f"/2: its data position was saved with config.batch seg=4 gen=4, this run has seg={seg} "
                    f"gen={gen}: resume with the saved batch") in message
    resumed = make(4, 4)
    ckpt.restore(2, abstract, data_iterator=resumed)
    batch = next(resumed)
    for task in ("seg", "gen"):
        np.testing.assert_array_equal(batch[task]["image"], reference[2][task]["image"])
    ckpt.close()


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainable = {"step": np.asarray(1, np.int32), "params": {"w": np.arange(3, dtype=np.float32)}}
    ckpt = checkpointing.Checkpointer("runs/relative", async_save=False)
    ckpt.save(1, trainable)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    np.testing.assert_array_equal(ckpt.restore(1, abstract)["params"]["w"], trainable["params"]["w"])
    assert (tmp_path / "runs" / "relative" / "1").is_dir()
    ckpt.close()


@pytest.mark.parametrize("keep", [0, -1])
def test_keeping_no_checkpoint_is_refused(tmp_path, keep):
    """orbax's max_to_keep=0 deleted every step as it was saved: a run "finished" with none on disk."""
    with pytest.raises(ValueError, match=rf"keep must be >= 1 \(or None: keep all\), got {keep}"):
        checkpointing.Checkpointer(tmp_path / "run", keep=keep, async_save=False)
    assert not (tmp_path / "run").exists()


def test_resuming_with_another_model_names_the_parameters(tmp_path):
    """A run resumed after its model changed fails in one line that names what differs (orbax's own
    message gives a shape mismatch without the parameter's name)."""
    ema = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    trainable = {"step": np.asarray(1, np.int32), "params": ema, "ema_params": ema}
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, trainable)
    as_abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    wider = as_abstract({**trainable, "params": {"w": ema["w"], "b": np.zeros(4, np.float32)}})
    with pytest.raises(CheckpointError, match=r"/1 \(params\) does not match the config's model: "
                                              r"1 saved vs expected shapes \(b \(3,\) vs \(4,\)\)$"):
        ckpt.restore(1, wider)
    renamed = as_abstract({**trainable, "ema_params": {"w": ema["w"], "bias": ema["b"]}})
    with pytest.raises(CheckpointError, match=r"\(ema_params\) .*: 1 missing \(bias\); 1 unexpected \(b\)$"):
        ckpt.restore(1, renamed)
    restored = ckpt.restore(1, as_abstract(trainable))
    np.testing.assert_array_equal(restored["ema_params"]["w"], ema["w"])
    ckpt.close()


def test_a_muon_scan_layers_checkpoint_from_before_the_muon_fix_is_named(tmp_path, monkeypatch):
    """Before Muon knew the scanned `blocks` stack, a stacked block kernel (rank 3) took AdamW and a
    stacked bias (rank 2) Muon: such a checkpoint's optimizer state is no config's today. The error
    line named only optimizer settings and said "resume with the saved config", which cannot work."""
    import jax.numpy as jnp

    from genmask_jax.train import state as train_state

    params = {"blocks": {"attn": {"kernel": jnp.ones((2, 4, 3)), "bias": jnp.zeros((2, 3))}},
              "head": {"kernel": jnp.ones((3, 5))}}
    optimizer = {"name": "muon", "lr": 1e-3, "muon_lr": 0.02, "total_steps": 10}
    with monkeypatch.context() as before_the_fix:
        before_the_fix.setattr(train_state, "LAYER_STACKS", ())
        saved_opt_state = train_state.make_optimizer(optimizer).init(params)
    ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, {"step": jnp.asarray(1), "params": params, "opt_state": saved_opt_state})
    wanted = {"step": jnp.asarray(0), "params": params,
              "opt_state": train_state.make_optimizer(optimizer).init(params)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), wanted)
    named = r"a Muon run with model.dit.scan_layers saved before .*convert.export CHECKPOINT DST.*init_from.$"
    with pytest.raises(CheckpointError, match=named) as error:
        ckpt.restore(1, abstract)
    assert "\n" not in str(error.value)
    ckpt.close()


def test_one_leaf_naming_for_parameters_and_optimizer_states():
    """Saved metadata names tuple positions and NamedTuple fields as dict keys: the live tree's sequence
    indices and attribute names print the same, for the parameter check and the optimizer check alike."""
    import collections

    from genmask_jax.infer.checkpoint import leaf_shapes

    State = collections.namedtuple("State", ["mu", "nu"])
    live = (State(mu={"w": np.zeros((2, 3))}, nu={"w": np.zeros(3)}), [np.zeros(1)])
    saved = {"0": {"mu": {"w": np.zeros((2, 3))}, "nu": {"w": np.zeros(3)}}, "1": {"0": np.zeros(1)}}
    assert leaf_shapes(live) == leaf_shapes(saved) == {"0/mu/w": (2, 3), "0/nu/w": (3,), "1/0": (1,)}
