"""`infer.checkpoint`: a run's DiT parameters restored in the layout of the config it is loaded with; a
damaged run or converted VAE named in one line."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs.genmask import get_config
from convert import wan_dit, wan_vae
from genmask_jax.infer import checkpoint, cli
from genmask_jax.models import build
from genmask_jax.parallel.mesh import make_mesh
from genmask_jax.parallel.sharding import rules_from_config
from genmask_jax.train.checkpointing import Checkpointer


def saved_run(root, scan_layers: bool) -> tuple[str, dict]:
    """A one-step run of the tiny config with random DiT parameters; (its folder, the parameters)."""
    config = get_config()
    config.model.dit.scan_layers = scan_layers
    model = build.build_model(config)
    params = jax.jit(lambda key: nn.meta.unbox(build.dit_initializer(model)(key)))(jax.random.key(0))
    params = jax.tree.map(np.asarray, params)
    checkpointer = Checkpointer(root, async_save=False)
    checkpointer.save(1, {"params": params}, config=config)
    checkpointer.close()
    return str(root), params


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), y)


@pytest.mark.parametrize("saved_scan", [False, True], ids=["unscanned_run", "scanned_run"])
def test_a_run_loads_with_the_other_scan_layers(tmp_path, saved_scan):
    """`--config.model.dit.scan_layers=True` on an unscanned run (or False on a scanned one) was
    'N missing (blocks/...); M unexpected (blocks_0/...)': the blocks are now restacked."""
    run, params = saved_run(tmp_path, saved_scan)
    config = get_config()
    config.model.dit.scan_layers = not saved_scan
    expected = wan_dit.with_scan_layers(params, not saved_scan)
    loaded = checkpoint.load(run, config, mesh=make_mesh((1, -1, 1), devices=jax.devices()[:2]))
    assert loaded.model.dit.scan_layers == (not saved_scan)
    assert_same_tree(loaded.dit_params, expected)
    target = checkpoint.abstract_dit_params(loaded.model, loaded.mesh, loaded.rules)  # sharded as restored
    assert [x.sharding for x in jax.tree.leaves(loaded.dit_params)] == [
        x.sharding for x in jax.tree.leaves(target)]
    directory, step = checkpoint.resolve(run)
    host, _ = checkpoint.restore_dit_params(directory, step, loaded.model, None, None)  # convert.export's way
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(host))
    assert_same_tree(host, expected)


def damage(folder, how: str) -> None:
    """Cuts the largest file in a subfolder of `folder` (a run step's OCDBT data file, a converted
    checkpoint's array chunk) to half, or deletes it, or deletes `folder`'s _METADATA: a half-synced copy."""
    if how == "metadata_deleted":
        (folder / "_METADATA").unlink()
        return
    victim = max((f for f in folder.rglob("*") if f.is_file() and f.parent != folder),
                 key=lambda f: f.stat().st_size)
    if how == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.unlink()


@pytest.mark.parametrize("how", ["truncated", "deleted", "metadata_deleted"])
def test_a_damaged_run_checkpoint_is_one_line_from_every_reader(tmp_path, capsys, how):
    """An OCDBT file of the step cut short or deleted: segment, generate and evaluate (`checkpoint.load`)
    showed a bare orbax Exception's traceback, convert.export said the run 'does not match the config's
    model', as both did for a step without its state/_METADATA."""
    from convert import export

    run, _ = saved_run(tmp_path / "run", scan_layers=False)
    damage(tmp_path / "run" / "1" / "state", how)
    message = (rf"checkpoint {tmp_path / 'run'}/1 is damaged or incomplete \((ValueError|FileNotFoundError): "
               r".+\); pass another step's folder as the checkpoint, or copy this one again whole$")
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{message}") as error:
        checkpoint.load(run, mesh=make_mesh((1, -1, 1), devices=jax.devices()[:1]))
    assert isinstance(error.value, cli.USER_ERRORS) and "\n" not in str(error.value)
    assert export.main([run, str(tmp_path / "out")]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(rf"error: {message}", lines[0]), lines


def test_a_damaged_converted_vae_is_one_line(tmp_path):
    config = get_config()
    model = build.build_model(config)
    config.vae_from = str(wan_vae.save(tmp_path / "vae", model.vae, build.frozen_vae(config, model)[0]))
    damage(tmp_path / "vae" / "params", "truncated")
    mesh = make_mesh((1, -1, 1), devices=jax.devices()[:1])
    rules = rules_from_config(config.sharding.logical_axis_rules)
    with pytest.raises(checkpoint.CheckpointError, match=rf"^config.vae_from: {tmp_path / 'vae'} is damaged "
                       r"or incomplete \(ValueError: .+\); convert it again") as error:
        checkpoint.load_vae(config, model, mesh, rules)
    assert isinstance(error.value, cli.USER_ERRORS) and "\n" not in str(error.value)
