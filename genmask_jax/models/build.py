"""Building the GenMask model and its abstract/random parameters from experiment config data.

Shared by training, evaluation, inference and the ahead-of-time compiler, so none of them imports another.
"""

import dataclasses
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from genmask_jax.diffusion import timesteps as ts
from genmask_jax.models.dit import DiTConfig, WanDiT, dummy_inputs
from genmask_jax.models.genmask import GenMask
from genmask_jax.models.layers import shapes_once
from genmask_jax.models.vae import VAEConfig, config_differences
from genmask_jax.models.vae import abstract_params as abstract_vae_params

log = logging.getLogger(__name__)


def build_model(config) -> GenMask:
    """The GenMask model of an experiment config (`config.model`: dit, vae, timesteps, text_dropout)."""
    model_cfg = config.model
    vae = VAEConfig.from_dict(dict(model_cfg.vae)) if model_cfg.get("vae") else None
    timesteps = {task: dict(law) for task, law in model_cfg.timesteps.items()}
    ts.check_timestep_config(timesteps)  # a misspelt law parameter fails here, before anything compiles
    return GenMask(DiTConfig.from_dict(dict(model_cfg.dit)), vae, timesteps, float(model_cfg.text_dropout))


def dit_initializer(model: GenMask, text_len: int = 8):
    """rng -> boxed DiT params (shapes do not depend on the dummy input).

    Initialised with XLA attention, whatever `model.dit.attention` says: the parameters do not depend on
    the kernel, and sharded splash cannot split the dummy batch of 1 over a mesh's batch axes.
    """
    return _dit_init(dataclasses.replace(model.dit, attention="xla"), text_len)


def _dit_init(cfg: DiTConfig, text_len: int):
    inputs = dummy_inputs(cfg, text_len=text_len)
    return lambda rng: WanDiT(cfg).init(rng, *inputs)["params"]


def abstract_dit(model: GenMask, text_len: int = 8) -> Any:
    """`dit_initializer(model, text_len)`'s boxed params as ShapeDtypeStructs (nothing is computed)."""
    return _abstract_dit(dataclasses.replace(model.dit, attention="xla"), text_len)


@shapes_once
def _abstract_dit(cfg: DiTConfig, text_len: int) -> Any:
    return jax.eval_shape(_dit_init(cfg, text_len), jax.random.key(0))


def abstract_frozen(model: GenMask) -> dict:
    """{"vae": abstract boxed VAE variables} (shapes and logical axes only), or {}."""
    return {} if model.vae is None else {"vae": abstract_vae_params(model.vae)}


def cast_like(variables: Any, abstract: Any) -> Any:
    """Host `variables` in the dtypes of `abstract` (boxed or not): stored weights may be narrower than
    the model's param_dtype (the toy VAE keeps bfloat16)."""
    return jax.tree.map(lambda x, a: np.asarray(x, a.dtype), variables, nn.meta.unbox(abstract))


def random_frozen(abstract: Any, seed: int) -> Any:
    """Random frozen parameters drawn on the host with the VAE's init laws (lecun-normal kernels over
    all but the output axis, zero biases, unit norm gains). For tests and smoke runs: real runs load
    `config.vae_from`. (Host numpy, because compiling the VAE's jitted init takes tens of seconds.)"""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        leaf = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            return (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(leaf.dtype)
        if name in ("gamma", "scale"):
            return np.ones(leaf.shape, leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


class VAEConfigMismatch(ValueError):
    """`config.vae_from` holds a VAE whose structure or latent statistics differ from `config.model.vae`."""


def vae_config_differences(checkpoint: VAEConfig, experiment: VAEConfig) -> list[str]:
    """'field: checkpoint X, experiment Y' for each field where the two configs differ, dtypes aside (the
    experiment's own choice: the stored weights are cast to them, cast_like)."""
    return [
        f"{name}: checkpoint {getattr(checkpoint, name)}, experiment {getattr(experiment, name)}"
        for name in config_differences(checkpoint, experiment)
    ]


def frozen_vae(config, model: GenMask) -> tuple[Any, Any]:
    """(host VAE variables in the model's dtypes, their boxed abstract): the converted weights of
    `config.vae_from` (`converted_vae`: VAEConfigMismatch for a VAE of another config), else random ones
    from `config.seed` (with a warning). `model.vae` must be set."""
    abstract = abstract_frozen(model)["vae"]
    if config.get("vae_from"):
        variables = converted_vae(config, model)
    else:
        log.warning("no config.vae_from: the frozen VAE is randomly initialised (seed %d)", config.seed)
        variables = random_frozen({"vae": abstract}, config.seed)["vae"]
    return cast_like(variables, abstract), abstract


def converted_vae(config, model: GenMask) -> Any:
    """The VAE variables of `config.vae_from` as stored there (in their saved dtypes), read on the host.

    Raises VAEConfigMismatch when the checkpoint's config differs from `model.vae` in anything but the
    dtypes: the latent statistics and the structure belong to the weights.
    """
    from convert import wan_vae  # lazily: the converter pulls in safetensors and the file readers

    vae_cfg, variables = wan_vae.load(config.vae_from)
    differences = vae_config_differences(vae_cfg, model.vae)
    if differences:
        raise VAEConfigMismatch(
            f"config.vae_from {config.vae_from} holds a VAE whose config differs from config.model.vae "
            f"({'; '.join(differences)}): latents would be normalised with statistics that do not belong "
            "to the weights. Set config.model.vae to the checkpoint's config (its config.json, or "
            "convert.wan_vae.load(path)[0].to_dict()); dtype and param_dtype may stay the experiment's"
        )
    return variables
