"""GenMask training: WAN 2.1 DiT trained on segmentation (mask generation) and text-to-image together.

    get_config()                       the tiny synthetic CPU run (shapes data, toy encoder, 32x32)
    get_config("variant=paper")        the paper's setting: WAN 1.3B + Qwen2.5-VL-7B (3584-d),
                                       512x512, global batch 1024 at 1:1, a = 0.05, 8000 steps
    get_config("variant=paper,runlocal=True")   the paper's config with the tiny run's sizes (model,
                                       images, batch, steps, data): the same as the tiny config

Model sub-configs are plain dicts mapping to `DiTConfig.from_dict` / `VAEConfig.from_dict`; the mesh
shape and the logical->mesh rules are data here.
"""

import ml_collections

from configs.common import parse_arg
from genmask_jax.data.pipeline import default_data_config
from genmask_jax.diffusion.timesteps import DEFAULT_TIMESTEP_CONFIG
from genmask_jax.models.dit import DiTConfig
from genmask_jax.models.vae import VAEConfig
from genmask_jax.parallel.sharding import DEFAULT_RULES


def _rules_as_data(rules) -> list:
    return [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant="tiny", runlocal=False)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 8000
    config.log_every = 50  # >= 1; the first step and each checkpointed step are logged too.
    config.eval_every = 500  # quick evaluation of a fixed `val` batch (train/hooks.py); 0 = never.
    config.sample_every = 500  # generated sample images; 0 = never.
    config.quick_eval = ml_collections.ConfigDict(
        {"num_examples": 8, "split": "val", "gen_steps": 20, "guidance_scale": 5.0}
    )
    # A jax.profiler trace of num_steps steps from first_step into <workdir>/tensorboard; 0 = none.
    config.profile = ml_collections.ConfigDict({"first_step": 10, "num_steps": 0})

    # Global example counts per task and step; gen = 0 is the "without generation data" ablation.
    config.batch = ml_collections.ConfigDict({"seg": 512, "gen": 512})
    # Gradient accumulation: each step's batch in k >= 1 task-balanced slices. Each task's count must be a
    # multiple of k x the batch shards (mesh data x fsdp), checked before the workdir is made.
    config.microbatches = 1

    config.model = ml_collections.ConfigDict()
    config.model.dit = DiTConfig.from_variant("1.3b", text_dim=3584, dtype="bfloat16", scan_layers=True,
                                              remat_policy="nothing_saveable").to_dict()
    config.model.vae = VAEConfig.from_variant("wan2.1").to_dict()
    config.model.timesteps = ml_collections.ConfigDict(
        {task: dict(law) for task, law in DEFAULT_TIMESTEP_CONFIG.items()})
    config.model.timesteps.segmentation.a = 0.05
    config.model.text_dropout = 0.1  # CFG: probability of the null context, generation only.

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # "adamw" | "muon"
    config.optimizer.lr = 1e-4
    config.optimizer.muon_lr = 0.02  # Muon only: the rate of its 2-D kernels.
    config.optimizer.muon_beta = 0.95
    config.optimizer.muon_ns_steps = 5
    config.optimizer.muon_conv_kernels = False  # Muon also on conv kernels (the patch embedding)
    # Linear warmup of lr (and muon_lr) from 0: the first update, at lr 0, only fills the optimizer's moments.
    config.optimizer.warmup_steps = 250
    config.optimizer.schedule = "constant"  # "constant" | "cosine"
    config.optimizer.end_lr_factor = 0.0  # cosine floor as a fraction of lr.
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.01
    config.optimizer.grad_clip = 1.0  # global-norm clip; 0 disables.
    config.ema_decay = 0.0  # 0 = no EMA parameters (kept in float32 whatever model.dit.param_dtype).
    # The EMA's decay at step t is min(ema_decay, (1 + t) / (10 + t)), so it forgets the initial weights.
    config.ema_warmup = True

    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices.
    # TPU v4/v5p/v6e: an axis over part of a torus axis, for sizes that are no product of whole ones.
    config.mesh.allow_split_physical_axes = False
    config.sharding = ml_collections.ConfigDict()
    config.sharding.logical_axis_rules = _rules_as_data(DEFAULT_RULES)

    config.distributed = ml_collections.ConfigDict()
    config.distributed.mode = "auto"  # "auto": initialize when the env says multi-host; "on" | "off".
    config.distributed.coordinator_address = ""  # "host:port"; "" = from env or cluster auto-detection.
    config.distributed.num_processes = 0  # 0 = from env / auto-detection.
    config.distributed.process_id = -1  # -1 = from env / auto-detection.

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500  # >= 1; the last step and a SIGTERM stop are saved too.
    config.checkpoint.keep = 3  # the newest N >= 1 checkpoints stay; None (in Python, not a flag) keeps all.
    config.checkpoint.async_save = True
    config.resume = ""  # if the workdir has none: a run's workdir, its checkpoints/ or one step folder.
    config.init_from = ""  # converted WAN DiT weights (`python -m convert.wan_dit`); "" = random init.
    config.vae_from = ""  # converted WAN VAE weights (`python -m convert.wan_vae`); "" = random init.

    config.data = default_data_config()
    config.data.resolution = (512, 512)
    config.data.seg_sources = "refcoco,reasonseg"
    config.data.refcoco.name = "refcoco_unc,refcocoplus_unc,refcocog_umd"
    config.data.gen_sources = "captions"
    config.data.encoder.name = "qwen2_5_vl"
    config.data.encoder.dim = 3584
    config.data.encoder.context_length = 512

    if arg.variant not in ("paper", "tiny"):
        raise ValueError(f"unknown variant {arg.variant!r}; use 'tiny' or 'paper'")
    if arg.variant == "tiny" or arg.runlocal:
        _shrink(config, dit="tiny", resolution=32, batch=4, steps=20)
    return config


def _shrink(config, dit: str, resolution: int, batch: int, steps: int) -> None:
    """Tiny model, images and batch for CPU runs and tests (structure unchanged)."""
    config.model.dit = DiTConfig.from_variant(dit).to_dict()
    config.model.vae = VAEConfig.from_variant("tiny").to_dict()
    config.data.resolution = (resolution, resolution)
    config.data.encoder.dim = config.model.dit["text_dim"]
    config.data.encoder.context_length = 32  # the longest shapes caption (5 shapes) has 26 words
    config.batch.seg = config.batch.gen = batch
    config.data.seg_sources = config.data.gen_sources = "shapes"
    config.data.encoder.name = "toy"
    config.data.num_threads = 1
    config.data.prefetch_buffer_size = 4
    config.mesh.shape = (-1, 1, 1)
    config.total_steps = steps
    config.log_every = 5
    config.eval_every = config.sample_every = 10
    config.quick_eval.num_examples = 4
    config.quick_eval.gen_steps = 4
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 2
    config.checkpoint.every_steps = 10
    config.checkpoint.async_save = False
