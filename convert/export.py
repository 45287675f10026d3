"""A trained GenMask checkpoint -> diffusers folders, so PyTorch users can load what was trained here.

    python -m convert.export CHECKPOINT DST [--no-ema] [--overwrite]

CHECKPOINT is a training workdir, its checkpoints/ folder or one step folder. DST gets `transformer/`
(the DiT, with its text embedder of the instruction encoder's width) and, when the run used converted
VAE weights (`config.vae_from`), `vae/`; both load with diffusers' `from_pretrained`. DST appears only
when both are written; it may not be CHECKPOINT, inside it or hold it. --overwrite replaces an earlier
export, and nothing else: each part holds a `genmask_export.json` that tells it from a downloaded model.
"""

import argparse
import logging
import re
import sys
from pathlib import Path

from convert import checkpoint_io as io
from convert import wan_dit, wan_vae
from convert.checkpoint_io import ConversionError

logger = logging.getLogger(__name__)

# diffusers' WanTransformer3DModel takes no text mask: its cross-attention sees every context token.
CONTEXT_MASK_WARNING = (
    "%s was trained with model.dit.use_context_mask=True, but diffusers' WanTransformer3DModel has no "
    "text mask: given a context zero-padded to a fixed length (WanPipeline pads to 512 tokens), it also "
    "attends to the padding, so its outputs differ from this model's. Contexts without padding (cut to "
    "the prompt's tokens) and the all-zero null context give the same outputs.")


# What an export killed by an earlier version, which wrote the parts one after the other in DST, leaves
# beside them: `io.atomic_folder`'s temporary folders.
_EXPORT_TEMPORARY = re.compile(r"\.(transformer|vae)\.tmp-.+")
EXPORT_FOLDER = "an exported folder (only diffusers transformer/ and vae/)"


def export_folder_refusal(path: Path) -> str | None:
    """None when an export may replace `path`: an empty folder, or one `export_checkpoint` wrote (its
    transformer/ and vae/ exports, beside the temporary folders of an export that was killed); otherwise
    why not."""
    names = io.folder_names(path)
    parts = sorted(n for n in names or () if not _EXPORT_TEMPORARY.fullmatch(n))
    if names is None or not set(parts) <= {"transformer", "vae"}:
        return f"is not {EXPORT_FOLDER}"
    for part in parts:
        reason = io.export_refusal(path / part)
        if reason:
            return f"is not {EXPORT_FOLDER}: its {part}/ {reason}"
    return None


def check_destination(dst: Path, overwrite: bool) -> None:
    """Raises ConversionError unless DST is new or, with `overwrite`, an earlier export."""
    io.check_destination(dst, overwrite, export_folder_refusal)


def export_checkpoint(checkpoint: str, dst: str | Path, use_ema: bool = True,
                      overwrite: bool = False) -> Path:
    """Writes DST/transformer (and DST/vae when the run loaded converted VAE weights); returns DST.

    Each holds the weights as they were saved: the run's parameters (or float32 EMA), and the converted
    VAE of `config.vae_from`, whatever the dtypes the experiment computes in.

    Both are written in one temporary sibling of DST, renamed to DST when complete: a failed export
    leaves an earlier one as it was (never a transformer/ without its vae/, or the other way round).
    """
    from genmask_jax.infer import checkpoint as ckpt
    from genmask_jax.models import build

    dst = Path(dst)
    # Before the run is read. DST may lie in a workdir given as CHECKPOINT, beside its checkpoints/
    # (evaluate writes <workdir>/eval there too), but not inside the checkpoints folder that is read.
    io.check_apart(checkpoint, dst, inside_ok=True)
    check_destination(dst, overwrite)
    directory, step = ckpt.resolve(checkpoint)
    io.check_apart(directory, dst)
    config = ckpt.saved_config(directory, step)
    model = build.build_model(config)
    wan_dit.check_exportable(model.dit)  # before the weights are read
    if model.dit.use_context_mask:
        logger.warning(CONTEXT_MASK_WARNING, checkpoint)
    # Host arrays only, in the dtypes they were saved in (a float32 EMA of bfloat16 params stays float32):
    # no device holds the run's weights, and nothing else is read.
    dit_params, _ = ckpt.restore_dit_params(directory, step, model, None, None, use_ema, saved_dtypes=True)
    with io.atomic_folder(dst, None, overwrite, export_folder_refusal) as tmp:
        wan_dit.export_diffusers(dit_params, model.dit, tmp / "transformer")
        del dit_params
        if config.get("vae_from") and model.vae is not None:
            # The weights as converted, not the copy in the experiment's model.vae.param_dtype.
            wan_vae.export_diffusers(build.converted_vae(config, model), model.vae, tmp / "vae")
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("checkpoint", help="training workdir, checkpoints/ folder or step folder")
    parser.add_argument("dst", help="output folder (transformer/ and vae/)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw parameters, not the EMA")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it is an earlier export")
    args = parser.parse_args(argv)
    from genmask_jax.infer import cli
    from genmask_jax.infer.checkpoint import CheckpointError
    from genmask_jax.models import build

    cli.setup_logging()  # as the other commands: orbax's notices on items it is not asked for stay quiet

    try:
        dst = export_checkpoint(args.checkpoint, args.dst, use_ema=not args.no_ema, overwrite=args.overwrite)
    except (ConversionError, CheckpointError, build.VAEConfigMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {dst}: {', '.join(sorted(p.name for p in dst.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
