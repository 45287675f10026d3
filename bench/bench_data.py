"""Data pipeline throughput: 512x512 model inputs, JPEG decode, segmentation and generation mixed 1:1.

  python bench/bench_data.py [--examples 256] [--threads 1,2,4] [--resolution 512]

Builds a temporary ReasonSeg-layout folder (640x480 JPEGs of ~110 KB with polygon annotations, the
segmentation source) and a caption folder (640x480 JPEGs, the generation source), then times the
training iterator (decode, polygon rasterisation, resize + pad, toy contexts, batching) in examples per
second, after one warm-up batch, for each thread count. Also times the single-example stages on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import numpy as np
from PIL import Image

from genmask_jax.data import preprocess
from genmask_jax.data.pipeline import default_data_config, make_train_iterator
from genmask_jax.data.reasonseg import ReasonSeg
from genmask_jax.data.shapes import SyntheticShapes


def make_folders(root: str, count: int) -> tuple[str, str]:
    shapes = SyntheticShapes("train", (480, 640), seed=123, num_examples=count)
    seg_dir, gen_dir = os.path.join(root, "reasonseg"), os.path.join(root, "captions")
    os.makedirs(os.path.join(seg_dir, "train"))
    os.makedirs(gen_dir)
    rng = np.random.default_rng(0)
    for i in range(count):
        example, scene = shapes[i], shapes.scene(i)
        # pixel noise brings the JPEGs to ~110 KB, near COCO's typical 640x480 file size
        image = Image.fromarray(
            np.clip(example["image"] + rng.normal(0, 12, example["image"].shape), 0, 255).astype(np.uint8)
        )
        image.save(os.path.join(seg_dir, "train", f"{i:05d}.jpg"), quality=90)
        image.save(os.path.join(gen_dir, f"{i:05d}.jpg"), quality=90)
        polygon = scene.shapes[scene.target].polygon(480, 640)
        annotation = {
            "text": [example["text"]],
            "is_sentence": False,
            "shapes": [{"label": "target", "points": [list(p) for p in polygon]}],
        }
        with open(os.path.join(seg_dir, "train", f"{i:05d}.json"), "w") as f:
            json.dump(annotation, f)
        with open(os.path.join(gen_dir, f"{i:05d}.txt"), "w") as f:
            f.write(example["caption"])
    return seg_dir, gen_dir


def time_stages(seg_dir: str, resolution: int, repeats: int = 20) -> dict:
    source = ReasonSeg(seg_dir, "train")
    start = time.perf_counter()
    for i in range(repeats):
        raw = source[i % len(source)]
    read = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        image, geometry = preprocess.fit_image(raw["image"], (resolution, resolution), "pad")
        preprocess.fit_mask(raw["mask"], geometry)
    fit = (time.perf_counter() - start) / repeats
    return {"decode_and_rasterise_ms": 1e3 * read, "fit_ms": 1e3 * fit}


def time_cache_lookup(root: str, tokens: int = 300, dim: int = 3584, count: int = 32) -> dict:
    """A Qwen2.5-VL-7B-sized embedding cache: (tokens, 3584) bfloat16 per example."""
    from genmask_jax.encoders.cache import CacheWriter, EmbeddingCache

    folder = os.path.join(root, "cache")
    writer = CacheWriter(folder, dim, 512, "bfloat16", shard_size=count)
    states = np.random.default_rng(0).standard_normal((tokens, dim)).astype(np.float32)
    for i in range(count):
        writer.add(f"ex{i}", states)
    writer.close()
    cache = EmbeddingCache(folder)
    start = time.perf_counter()
    for i in range(count):
        cache.lookup(f"ex{i}")
    per = (time.perf_counter() - start) / count
    return {"lookup_ms": 1e3 * per, "record_mb": tokens * dim * 2 / 2**20}


def time_iterator(config, batch: int, examples: int) -> tuple[int, float]:
    """(batches timed, seconds) of the training iterator after one warm-up batch. The iterator is closed
    and its reading threads joined before returning: left running, they would read while the next
    setting is timed, and after the data is deleted."""
    before = set(threading.enumerate())
    it = make_train_iterator(config, batch // 2, batch - batch // 2, seed=0, process_index=0, process_count=1)
    try:
        next(it)
        steps = max(1, examples // batch)
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        return steps, time.perf_counter() - start
    finally:
        it.close()  # cancels the queued reads; the threads finish the ones they are in
        for thread in set(threading.enumerate()) - before:
            if not thread.daemon:  # grain's daemon stats threads live as long as the process
                thread.join()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=256, help="examples timed per setting")
    parser.add_argument("--threads", default="1,2,4")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="per-process batch, half seg half gen")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        seg_dir, gen_dir = make_folders(root, 64)
        print(f"one core, per example: {time_stages(seg_dir, args.resolution)}")
        print(f"one core, 7B-sized cache (300 tokens x 3584, bf16): {time_cache_lookup(root)}")
        config = default_data_config()
        config.resolution = (args.resolution, args.resolution)
        config.seg_sources, config.gen_sources = "reasonseg", "captions"
        config.reasonseg.root, config.captions.path = seg_dir, gen_dir
        config.encoder.context_length = 32
        for threads in [int(t) for t in args.threads.split(",")]:
            config.num_threads, config.prefetch_buffer_size = threads, max(2 * args.batch, 4 * threads)
            steps, elapsed = time_iterator(config, args.batch, args.examples)
            print(
                f"threads={threads}: {steps * args.batch / elapsed:.1f} examples/s "
                f"({steps} batches of {args.batch}, {args.resolution}x{args.resolution}, seg:gen 1:1)"
            )


if __name__ == "__main__":
    main()
