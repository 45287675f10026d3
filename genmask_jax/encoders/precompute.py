"""Writes the instruction-encoder contexts of whole data sets into an embedding cache.

  python -m genmask_jax.encoders.precompute --config configs/genmask.py:variant=1.3b --out CACHE \
      [--splits train,val,testA] [--batch-size 8] [--shard-size 1000] [--dtype bfloat16]

`--config` is a config file whose `get_config(arg)` returns either the data config itself or a config
with a `data` field (`genmask_jax.data.pipeline.default_data_config()` layout). Every example of the
segmentation sources in every split and of the generation sources in the training split is encoded
with `data.encoder` and stored by example id. Rerunning the same command resumes: cached ids are
skipped. Then set `data.encoder.cache_dir = CACHE` and the pipelines read contexts from it.
With `data.encoder.rewrite_reasoning`, long reasoning queries (ReasonSeg sentences) are first rewritten
by the VLM and the description is stored in the record beside the context.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys

import tqdm

from genmask_jax.data.skips import SkipLog, skip_reason
from genmask_jax.data.sources import make_task_source
from genmask_jax.encoders import make_encoder
from genmask_jax.encoders.cache import CacheWriter

log = logging.getLogger("genmask_jax.encoders.precompute")


def load_data_config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("precompute_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    return config.data if "data" in config else config


def _fingerprint(encoder, config) -> dict:
    if hasattr(encoder, "fingerprint"):
        return encoder.fingerprint()
    return {
        "encoder": encoder.name,
        "dim": encoder.dim,
        "context_length": encoder.context_length,
        "seed": int(config.encoder.get("seed", 0)),
    }


def _encode_batch(encoder, batch, writer: CacheWriter, rewrite_reasoning: bool, task: str) -> None:
    """Segmentation encodes image + instruction; generation the caption alone (the image is the target)."""
    with_image = task == "seg" and encoder.name != "toy"
    images = [raw["image"] if with_image else None for _, raw in batch]
    flags = [rewrite_reasoning and bool(raw.get("is_sentence")) for _, raw in batch]
    texts = [raw.get("query", raw["text"]) if flag else raw["text"] for (_, raw), flag in zip(batch, flags)]
    if any(flags):
        contexts, masks = encoder.encode(images, texts, rewrite=flags)
    else:
        contexts, masks = encoder.encode(images, texts)
    rewrites = getattr(encoder, "last_rewrites", None) or [None] * len(batch)
    for (example_id, raw), context, mask, rewrite in zip(batch, contexts, masks, rewrites):
        writer.add(example_id, context[mask], text=raw["text"], rewrite=rewrite)


def precompute(
    data_config,
    out: str,
    splits: list[str],
    batch_size: int = 8,
    shard_size: int = 1000,
    dtype: str = "bfloat16",
    encoder=None,
) -> dict:
    """Fills the cache at `out`; returns {"written": n, "already": n, "skips": summary}."""
    encoder = encoder or make_encoder(data_config.encoder)
    writer = CacheWriter(
        out, encoder.dim, encoder.context_length, dtype, _fingerprint(encoder, data_config), shard_size
    )
    skips = SkipLog("precompute")
    rewrite_reasoning = bool(data_config.encoder.get("rewrite_reasoning", False))
    written = already = 0
    jobs = [(split, "seg", data_config.seg_sources) for split in splits]
    jobs.append((data_config.train_split, "gen", data_config.gen_sources))
    for split, task, names in jobs:
        if not names or (task == "gen" and data_config.train_split not in splits):
            continue
        source = make_task_source(names, split, data_config, task)
        batch = []
        for index in tqdm.trange(len(source), desc=f"{task}/{split}", unit="ex"):
            example_id = source.example_id(index)
            if example_id in writer.done:
                already += 1
                continue
            try:
                batch.append((example_id, source[index]))
            except Exception as e:  # noqa: BLE001  (a bad example is a logged skip)
                skips.add(example_id, skip_reason(e))
                continue
            if len(batch) == batch_size:
                _encode_batch(encoder, batch, writer, rewrite_reasoning, task)
                written, batch = written + len(batch), []
        if batch:
            _encode_batch(encoder, batch, writer, rewrite_reasoning, task)
            written += len(batch)
        writer.flush()
    writer.close()
    log.info("cache %s: %d written, %d already there; %s", out, written, already, skips.summary())
    return {"written": written, "already": already, "skips": skips.summary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m genmask_jax.encoders.precompute",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="config file[:arg]")
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--splits", default="train", help="comma-separated splits of the seg sources")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data_config = load_data_config(args.config)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    result = precompute(data_config, args.out, splits, args.batch_size, args.shard_size, args.dtype)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
