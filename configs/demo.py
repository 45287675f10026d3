"""The built-in demo (`python -m genmask_jax.demo`): GenMask learning to segment on a 2-core CPU.

configs/genmask.py's tiny variant with the demo's sizes: 64x64 synthetic referring shapes (8x8x16
latents from the shipped toy WAN VAE, genmask_jax/assets/toy_vae), a 4-layer WAN DiT with one token
per latent pixel (patch (1, 1, 1), width 64), segmentation and caption->image generation mixed 1:1
(16 + 16 examples per step), a = 0.05 for segmentation.

    get_config()                 the demo (about 790 CPU-seconds: 7.5 minutes on a 2-core Zen 4 VM)
    get_config("dit=coarse")     the previous demo DiT: patch (1, 2, 2), width 128, 5,000 steps
                                 (docs/REPRODUCTION.md's ablations were run with it)
    get_config("variant=smoke")  the same pipeline drastically reduced (tests)
"""

import os

import ml_collections

from configs import genmask
from configs.common import parse_arg
from genmask_jax.models.dit import DiTConfig
from genmask_jax.models.vae import VAEConfig

TOY_VAE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "genmask_jax", "assets", "toy_vae"
)


def toy_vae_config(path: str = TOY_VAE) -> VAEConfig:
    """The shipped toy VAE's config (its latent statistics included), or the tiny variant if absent."""
    if os.path.isfile(os.path.join(path, "config.json")):
        from genmask_jax.train.vae_pretrain import load_config  # lazily: it pulls in optax and PIL

        return load_config(path)
    return VAEConfig.from_variant("tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant="demo", dit="fine")
    config = genmask.get_config("variant=tiny")
    if arg.dit == "fine":
        # One token per latent pixel: a small shape covers about 2x2 latent pixels, and telling a small
        # star from a small circle inside one 2x2 patch token is what the coarse DiT learned last. At
        # width 64 a step costs 1.6x the coarse one on two CPU devices (126 vs 80 ms), and 3,200 steps
        # score gIoU 0.81-0.83 over three seeds where 5,000 coarse steps scored 0.73-0.80 (BENCHMARKS.md,
        # built-in demo).
        dit = dict(patch_size=(1, 1, 1), dim=64, ffn_dim=128)
        config.total_steps = 3200
        # One CPU device on every core: 101 ms a step against 121 ms on one single-threaded device per
        # core (the coarse DiT took the same time either way).
        device_per_core = False
    elif arg.dit == "coarse":
        dit = dict(patch_size=(1, 2, 2), dim=128, ffn_dim=256)
        config.total_steps = 5000
        device_per_core = True
    else:
        raise ValueError(f"unknown dit {arg.dit!r}; use 'fine' or 'coarse'")
    config.model.dit = DiTConfig.from_variant(
        "tiny", **dit, num_heads=4, num_layers=4, text_dim=64, scan_layers=False, use_context_mask=True,
    ).to_dict()  # unrolled: at 4 layers the scan's per-layer slicing costs more than it saves on CPU.
    # With padded keys masked the latent pool cuts the contexts to their real length (5 of 32 tokens
    # for an expression): same model, fewer text matmuls.
    config.model.vae = toy_vae_config().to_dict()
    config.vae_from = TOY_VAE
    config.model.timesteps.segmentation.a = 0.05
    config.model.text_dropout = 0.1

    config.data.resolution = (64, 64)
    config.data.shapes.expression_kinds = "attribute"
    config.data.shapes.max_shapes = 4
    config.data.shapes.test_size = 500
    config.data.encoder.dim = config.model.dit["text_dim"]
    config.data.encoder.context_length = 32  # the longest captions fit.

    # On CPU an example costs less in a batch of 16 than of 32 (measured; probably cache), and
    # 5,000 steps of 16 reach the gIoU of 3,500 steps of 32 (coarse DiT; BENCHMARKS.md, built-in demo).
    config.batch.seg = config.batch.gen = 16
    config.log_every = 50
    # Muon on the 2-D kernels (train/muon.py), 3 Newton-Schulz iterations: 3,000 steps reach gIoU 0.73
    # where 4,000 AdamW steps reach 0.69, for about 20% more time per step (coarse DiT; BENCHMARKS.md).
    config.optimizer.name = "muon"
    config.optimizer.muon_lr = 0.02
    config.optimizer.muon_ns_steps = 3
    config.optimizer.lr = 5e-3  # AdamW's, for the other parameters
    config.optimizer.warmup_steps = 50
    config.optimizer.schedule = "cosine"
    config.optimizer.end_lr_factor = 0.05
    config.optimizer.weight_decay = 0.0
    config.checkpoint.every_steps = 1000  # each save costs about 1.5 s of training here.
    # The demo evaluates after training (below). `--config.eval_every=N --config.sample_every=N` add
    # the loop's quick evaluation and samples every N steps (TensorBoard and <workdir>/train/samples).
    config.eval_every = config.sample_every = 0
    config.checkpoint.keep = 1
    # One process: the demo renders and VAE-encodes its scenes with JAX before the training loop would
    # call jax.distributed.initialize(), which then fails; inside a SLURM or MPI job "auto" could try.
    config.distributed.mode = "off"

    config.demo = ml_collections.ConfigDict()
    # `python -m genmask_jax.demo` makes each core a single-threaded CPU device (mesh.cpu_device_flags,
    # the batch split over them) when True and XLA_FLAGS is unset; else jax's one CPU device.
    config.demo.device_per_core = device_per_core
    # Rendered and VAE-encoded once (about 4-5 ms a scene), then sampled for both tasks. With 6,000 the
    # coarse DiT's 5,000-step model scored gIoU 0.87 on its training scenes and 0.79 on the test split;
    # with 18,000, 0.82 and 0.80 (BENCHMARKS.md, built-in demo).
    config.demo.num_train_scenes = 18000
    config.demo.eval_split = "test"
    config.demo.eval_batch_size = 50
    config.demo.num_grid = 16  # test examples drawn in the report's grid.
    config.demo.num_generated = 8
    config.demo.generation_steps = 20
    config.demo.guidance_scale = 3.0
    config.demo.generation_shift = 1.0
    # Pretrains the toy VAE here when `vae_from` has no checkpoint (slow; the shipped one is normal).
    config.demo.vae_pretrain_steps = 400

    if arg.variant == "smoke":
        config.model.dit = DiTConfig.from_variant(
            "tiny", text_dim=32, patch_size=config.model.dit["patch_size"]
        ).to_dict()
        config.data.encoder.dim = 32
        config.data.resolution = (32, 32)
        config.data.shapes.test_size = 8
        config.batch.seg = config.batch.gen = 8  # divisible by the 8 simulated test devices.
        config.total_steps = 4
        config.log_every = 2
        config.optimizer.warmup_steps = 1
        config.checkpoint.every_steps = 4
        config.demo.num_train_scenes = 16
        config.demo.eval_batch_size = 8
        config.demo.num_grid = 4
        config.demo.num_generated = 2
        config.demo.generation_steps = 2
        config.demo.vae_pretrain_steps = 2
    elif arg.variant != "demo":
        raise ValueError(f"unknown variant {arg.variant!r}; use 'demo' or 'smoke'")
    return config
