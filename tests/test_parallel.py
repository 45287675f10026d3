import jax
import pytest

from genmask_jax.parallel.mesh import make_mesh, resolve_mesh_shape
from genmask_jax.parallel.sharding import DEFAULT_RULES, rules_from_config


def test_resolve_mesh_shape_fills_one_axis():
    assert resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    assert resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError):
        resolve_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError):
        resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError):
        resolve_mesh_shape((2, 2, 1), 8)


@pytest.mark.multidevice
def test_make_mesh_is_auto_over_all_devices():
    mesh = make_mesh((2, -1, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": jax.device_count() // 4, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rules_roundtrip_through_config_lists():
    as_lists = [[k, list(v) if isinstance(v, tuple) else v] for k, v in DEFAULT_RULES]
    assert rules_from_config(as_lists) == DEFAULT_RULES
