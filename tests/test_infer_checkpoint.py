"""`infer.checkpoint`: a run's DiT parameters restored in the layout of the config it is loaded with."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs.genmask import get_config
from convert import wan_dit
from genmask_jax.infer import checkpoint
from genmask_jax.models import build
from genmask_jax.parallel.mesh import make_mesh
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
