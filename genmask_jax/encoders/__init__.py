"""Instruction encoders: `encode(images, texts) -> (context (B, L, D), mask (B, L))`.

`toy` (deterministic, word-level, no download) for the built-in demo; `qwen2_5_vl` (transformers,
PyTorch) for the paper's setting; contexts of a whole data set can be precomputed into an embedding
cache (`python -m genmask_jax.encoders.precompute`) that the data pipelines read by example id.
"""

from genmask_jax.encoders.base import InstructionEncoder, pad_or_truncate

ENCODERS = ("toy", "qwen2_5_vl")


def make_encoder(config) -> InstructionEncoder:
    """Builds the encoder named by `config.name` from the `data.encoder` config."""
    if config.name == "toy":
        from genmask_jax.encoders.toy import ToyEncoder

        return ToyEncoder(context_length=config.context_length, dim=config.dim, seed=config.seed)
    if config.name == "qwen2_5_vl":
        from genmask_jax.encoders.qwen2_5_vl import Qwen25VLEncoder

        return Qwen25VLEncoder(
            config.model_path,
            context_length=config.context_length,
            dtype=config.dtype,
            rewrite_reasoning=config.rewrite_reasoning,
            rewrite_max_new_tokens=config.rewrite_max_new_tokens,
        )
    raise ValueError(f"unknown encoder {config.name!r}; expected one of {ENCODERS}")


__all__ = ["ENCODERS", "InstructionEncoder", "make_encoder", "pad_or_truncate"]
