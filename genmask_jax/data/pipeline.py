"""Grain pipelines: the stratified seg/gen training mix and the deterministic evaluation iterator.

Training (`make_train_iterator`): one grain `MapDataset` per task,
`range(len(source)) -> shuffle(seed) -> repeat() -> slice(process_index::process_count) -> load`
(with `data.seg_repeats` / `gen_repeats`, the range holds a source's indices k times), where
`load` reads, fits to the model resolution and attaches the instruction-encoder context (the `toy`
encoder in-process, or the embedding cache by example id). Here a "process" is a data shard: a jax
process, or, when a mesh axis other than the batch's spans hosts, a data-loading group of processes
that hold the same batch rows and so load the same examples (`parallel.data_groups`). The two tasks are
interleaved at fixed positions (`_StratifiedMix`): in every per-process batch the first `Bs` elements
are segmentation and the next `Bg` generation, so every global batch holds exactly `process_count * Bs`
and `process_count * Bg` of each, whatever the ratio (`Bg = 0` allowed). Elements are decoded by
`data.num_threads` threads with a `data.prefetch_buffer_size` buffer, then batched into
`{"seg": {...}, "gen": {...}}` (keys and shapes: `_feature_shapes`).

The returned object is a grain `DatasetIterator`: `get_state()` / `set_state(state)` give a small JSON-able
dict, and grain's orbax handler saves it (`grain.checkpoint.CheckpointSave(iterator)` /
`CheckpointRestore(iterator)` under an item name in the `CheckpointManager`). Restoring it, in any
process, continues with exactly the batches that would have followed; with another process (group)
count and the same global batch, `state_for_process_count` gives every global batch the same examples.

Bad examples (unreadable file, empty mask, ...) are logged with their id, counted in
`iterator_skips(...)`, summarised at each epoch boundary, and replaced deterministically by the next
readable example of the same source (so batch shapes, task counts and resumption stay exact). A context
that cannot be made as configured (`encoders.ContextError`: an id missing from the embedding cache, a
cache of other settings or texts, a prompt longer than the context) is a setup error, not a bad
example: it stops the iterator with what to fix.

Evaluation (`make_eval_iterator`): every example of the split exactly once across processes, in a
fixed order: batch `s` of process `p` holds the global slots `(s * P + p) * B + j`; slots past the end
are padding (`valid` False, `index` -1, a copy of example 0). `iter_with_meta()` also yields per
example host metadata (id, text, geometry, and the target at the original size for LISA-style metrics).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator, Sequence

import grain
import numpy as np
from ml_collections import ConfigDict

from genmask_jax.data import preprocess
from genmask_jax.data.skips import BadExample, SkipLog, skip_reason
from genmask_jax.data.sources import (
    DataConfigError,
    data_set_span,
    make_task_source,
    max_consecutive_skips,
    parse_names,
)
from genmask_jax.data.splits import precompute_selection
from genmask_jax.encoders import DEFAULT_MAX_PIXELS
from genmask_jax.encoders.base import ContextError

log = logging.getLogger(__name__)


def default_data_config() -> ConfigDict:
    """The data config with every field documented; experiments override fields, not the structure."""
    c = ConfigDict()
    c.resolution = (64, 64)  # (H, W) model input; images are fitted to it.
    c.fit = "pad"  # "pad": resize keeping aspect, pad with 0 (mid grey); "crop": resize and centre-crop.
    c.seg_sources = "shapes"  # comma-separated segmentation sources: shapes, reasonseg, refcoco.
    c.gen_sources = "shapes"  # comma-separated generation sources: shapes, captions, tfds_captions.
    # "name:k,...": training reads source `name` of the task k times per epoch (an integer >= 1), to give a
    # small set a share beside a large one, as LISA samples its data sets by weight: with the RefCOCO
    # union (about 320,000 expressions) and ReasonSeg train (about a thousand texts), "reasonseg:30" makes
    # ReasonSeg about 9% of the segmentation examples instead of 0.3%. Evaluation reads each once.
    c.seg_repeats = ""
    c.gen_repeats = ""
    c.train_split = "train"  # split the training iterator reads from every source.
    c.shuffle = True  # reshuffle every epoch (seeded); False reads sources in order (debugging).
    c.num_threads = 4  # decode/fit threads per process.
    c.prefetch_buffer_size = 32  # elements (not batches) read ahead per process.
    c.max_consecutive_skips = 64  # a source that fails this many times in a row is an error, not a skip.

    c.shapes = ConfigDict()  # the synthetic referring-shapes source (genmask_jax/data/shapes.py)
    c.shapes.seed = 0  # scene seed; splits use disjoint random streams.
    c.shapes.train_size = 100_000  # examples per split (scenes are generated on the fly).
    c.shapes.val_size = 1_000
    c.shapes.test_size = 1_000
    c.shapes.min_shapes = 2
    c.shapes.max_shapes = 5
    c.shapes.expression_kinds = "attribute,position,relation"  # a subset makes the demo easier to learn.
    c.shapes.render_resolution = ()  # (H, W) to render at; () = `resolution` (no resampling).

    c.reasonseg = ConfigDict()  # ReasonSeg in LISA's layout (genmask_jax/data/reasonseg.py)
    c.reasonseg.root = ""  # folder holding train/ val/ test/ with *.jpg + *.json.
    c.reasonseg.eval_all_texts = False  # evaluation: False = text[0] per image (LISA), True = every text.
    c.reasonseg.use_templates = True  # wrap short phrases / long sentences in LISA-style query templates.

    c.refcoco = ConfigDict()  # RefCOCO family prepared by genmask_jax.data.prepare (or big_vision's).
    # refcoco_unc | refcocoplus_unc | refcocog_umd | refcocog_google | ref_coco_bv/...; a comma-separated
    # list trains on their union.
    c.refcoco.name = "refcoco_unc"
    c.refcoco.data_dir = ""  # the TFDS data_dir given to `prepare --out`.
    # Training on a union: drop train examples whose COCO image is in any listed set's val/test split
    # (big_vision's refcocox_combined, MAttNet). False trains on the plain union, as LISA does.
    c.refcoco.exclude_eval_images = False

    c.captions = ConfigDict()  # caption pairs for generation (genmask_jax/data/captions.py)
    c.captions.path = ""  # a folder of image + same-stem .txt files, or a JSONL with {"image", "caption"}.
    c.captions.tfds_name = ""  # a locally prepared TFDS image-caption set, e.g. "coco_captions".
    c.captions.tfds_data_dir = ""  # its data_dir ("" = TFDS default).
    c.captions.tfds_split = "train"
    c.captions.image_key = "image"  # feature holding the image (encoded bytes or uint8 array).
    c.captions.caption_key = "caption"  # feature holding the caption(s); lists use their first entry.

    c.encoder = ConfigDict()  # the instruction encoder (genmask_jax/encoders)
    c.encoder.name = "toy"  # "toy" (in-process, download-free) | "qwen2_5_vl" (use cache_dir at scale).
    # L: contexts are zero-padded to this length; a longer Qwen prompt is an error (it ends with the
    # instruction), `toy` truncates with a warning.
    c.encoder.context_length = 32
    c.encoder.dim = 64  # D for `toy`; Qwen2.5-VL-7B gives 3584.
    c.encoder.seed = 0  # `toy` word-embedding seed.
    c.encoder.model_path = ""  # the local Qwen2.5-VL folder (nothing is downloaded)
    c.encoder.dtype = "bfloat16"  # torch dtype for the VLM ("float32" on CPU tests).
    # Where the VLM runs: "auto" = CUDA where torch has it and JAX holds no GPU in this process (the
    # precompute), else the CPU with a warning (segment/generate/evaluate/train without a cache: JAX reserves
    # 75-92% of the GPU); "cpu", "cuda", "cuda:N" as given. Not part of the cache key.
    c.encoder.device = "auto"
    # The VLM sees the *original* image resized to at most this many pixels (aspect kept), one token
    # per 28x28 patch: 448*448 -> at most 256 image tokens, which leaves 256 of the paper's 512-token
    # context to the chat template (~20 tokens) and the instruction (a ReasonSeg sentence: a few dozen).
    # The processor's own default (12.8 MP) gives a 640x640 COCO image 529 tokens, more than the whole
    # context. The DiT sees the image itself through the VAE shortcut; the VLM needs it to ground the
    # instruction, not for pixel detail. 0 = the model's preprocessor_config.json value, for a model whose
    # own value fits the context: Qwen2.5-VL-7B's (12845056, up to 16384 tokens) is refused at any
    # context_length up to that.
    c.encoder.max_pixels = DEFAULT_MAX_PIXELS
    # Two-stage reasoning: the VLM rewrites ReasonSeg's long queries (is_sentence) into a short
    # description, which is then encoded (genmask_jax.encoders.encoder_input); other texts unchanged.
    c.encoder.rewrite_reasoning = False
    c.encoder.rewrite_max_new_tokens = 32
    # An embedding cache written by `python -m genmask_jax.encoders.precompute` with these encoder
    # settings: contexts are read from it by example id and no encoder runs in the pipeline.
    c.encoder.cache_dir = ""
    return c


def context_shape(data_config) -> tuple[int, int]:
    """(L, D) of the contexts the pipelines will produce, without building the encoder: D is the DiT's
    `text_dim` (toy: `encoder.dim`; cache: its meta.json; Qwen2.5-VL: the model config's hidden size)."""
    e = data_config.encoder
    if e.cache_dir:
        from genmask_jax.encoders.cache import cache_meta

        return e.context_length, int(cache_meta(e.cache_dir)["dim"])
    if e.name == "toy":
        return e.context_length, e.dim
    from transformers import AutoConfig

    return e.context_length, int(AutoConfig.from_pretrained(e.model_path).text_config.hidden_size)


def _task_seed(seed: int, task: str) -> int:
    return int(np.random.SeedSequence([seed, {"seg": 0, "gen": 1}[task]]).generate_state(1)[0])


class _ContextProvider:
    """(source example, task, split) -> (context (L, D), mask (L,)) from the encoder or the cache."""

    def __init__(self, data_config):
        from genmask_jax.encoders import fingerprint

        self.config, self.data_config = data_config.encoder, data_config
        self._lock = threading.Lock()
        self.sources = data_config.seg_sources, data_config.gen_sources, data_config.refcoco.name
        if self.config.cache_dir:
            from genmask_jax.encoders.cache import EmbeddingCache

            self.cache = EmbeddingCache(self.config.cache_dir, fingerprint(self.config))
            self.encoder = None
        else:
            from genmask_jax.encoders import make_encoder

            self.cache = None
            self.encoder = make_encoder(self.config)
        self.context_length = self.config.context_length

    @property
    def dim(self) -> int:
        return self.cache.dim if self.cache is not None else self.encoder.dim

    def __call__(self, raw: dict, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is not None:
            return self._lookup(raw, task, split)
        from genmask_jax.encoders import encoder_input

        image, text, rewrite = encoder_input(raw, task, self.config)
        try:
            if self.encoder.name == "toy":
                context, mask = self.encoder.encode(None, [text])
            else:
                with self._lock:  # one VLM call at a time; use the cache for real throughput
                    context, mask = self.encoder.encode([image], [text], rewrite=[rewrite])
        except ContextError as e:
            raise type(e)(f"example {raw['id']!r}: {e}") from None
        return context[0], mask[0]

    def _lookup(self, raw: dict, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        from genmask_jax.encoders import encoder_input
        from genmask_jax.encoders.cache import CacheMiss

        try:
            return self.cache.lookup(raw["id"], raw["text"], image=encoder_input(raw, task, self.config)[0])
        except CacheMiss as e:
            raise CacheMiss(f"{e}: {self._precompute_advice(task, split)}") from None

    def check_covers(self, source, task: str, split: str, num_samples: int) -> None:
        """Raises CacheMiss unless the cache holds `num_samples` examples spread over `source`: a split
        that was never precomputed fails here, before a model is built, not at the first batch."""
        from genmask_jax.encoders.cache import CacheMiss, missing_from_sample

        if self.cache is None:
            return
        missing, checked = missing_from_sample(self.cache, source, num_samples)
        if missing:
            raise CacheMiss(
                f"embedding cache {self.cache.folder} lacks {len(missing)} of {checked} sampled {task} "
                f"examples of split {split!r} (e.g. {missing[0]}): {self._precompute_advice(task, split)}"
            )

    def _precompute_advice(self, task: str, split: str) -> str:
        seg, gen, refcoco = self.sources
        names = seg if task == "seg" else gen
        if "refcoco" in names.split(","):
            names += f" ({refcoco})"
        selection = precompute_selection(self.data_config, split, task)
        return (
            f"precompute split {split!r} of the {task} sources {names} into it "
            f"(python -m genmask_jax.encoders.precompute --config=... --out={self.cache.folder} {selection})"
        )


class _Loader:
    """Reads example `index` of a source and turns it into model inputs, skipping bad examples."""

    def __init__(
        self,
        source,
        task: str,
        data_config,
        contexts: _ContextProvider,
        skips: SkipLog,
        split: str,
        evaluation: bool = False,
    ):
        self.source, self.task, self.contexts, self.skips = source, task, contexts, skips
        self.split = split
        self.resolution = tuple(data_config.resolution)
        self.fit = data_config.fit
        self.max_skips = max_consecutive_skips(data_config)
        self.evaluation = evaluation

    def _example_id(self, index: int) -> str:
        try:
            return self.source.example_id(index)
        except Exception:  # noqa: BLE001  (the id is only for the log line)
            return f"<index {index}>"

    def convert(self, raw: dict) -> tuple[dict, dict]:
        image = raw["image"]
        if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or min(image.shape[:2]) == 0:
            raise BadExample("bad_image", f"shape {getattr(image, 'shape', None)}")
        fitted, geometry = preprocess.fit_image(image, self.resolution, self.fit)
        context, context_mask = self.contexts(raw, self.task, self.split)
        out = {
            "image": fitted,
            "context": context.astype(np.float32),
            "context_mask": context_mask.astype(bool),
        }
        meta = {"id": raw["id"], "text": raw["text"], "geometry": geometry.to_dict()}
        if self.task == "seg":
            mask = np.asarray(raw["mask"])
            if mask.shape != image.shape[:2]:
                raise BadExample("bad_mask", f"mask {mask.shape} vs image {image.shape[:2]}")
            if not self.evaluation and not mask.any():
                raise BadExample("empty_mask", "no foreground pixel")
            out["mask"] = preprocess.fit_mask(mask > 0, geometry).astype(np.float32)
            # A target cropped away (fit "crop") or thinner than an output pixel would train an expression
            # that names an object against an all-background mask.
            if not self.evaluation and not out["mask"].any():
                raise BadExample(
                    "empty_after_fit",
                    f"{int(np.count_nonzero(mask))} foreground pixels, none left at {self.resolution} "
                    f"(fit {self.fit!r})",
                )
            ignore = raw.get("ignore")
            ignore = np.zeros(mask.shape, bool) if ignore is None else np.asarray(ignore, bool)
            if self.evaluation:
                out["ignore"] = preprocess.fit_mask(ignore, geometry, fill=True)
                meta["mask"], meta["ignore"] = mask > 0, ignore
        return out, meta

    def load(self, index: int) -> tuple[dict, dict]:
        """Example `index`, or the next readable one of the same source (logged, counted) when it is bad."""
        start, n = data_set_span(self.source, index)  # a bad example is replaced within its own data set
        for attempt in range(self.max_skips):
            k = start + (index - start + attempt) % n
            try:
                return self.convert(self.source[k])
            except ContextError:
                raise
            except Exception as e:  # noqa: BLE001  (any failure of one example becomes a logged skip)
                self.skips.add(self._example_id(k), skip_reason(e))
                if self.evaluation:
                    raise
        raise RuntimeError(
            f"{self.skips.name}: {self.max_skips} consecutive unreadable examples from "
            f"index {index}; {self.skips.summary()}"
        )


class _StratifiedMix(grain.MapDataset):
    """Element `i` of step `s = i // (Bs + Bg)`: position `j = i % (Bs + Bg)` < Bs is segmentation
    element `s * Bs + j`, otherwise generation element `s * Bg + j - Bs`."""

    def __init__(
        self, seg: grain.MapDataset | None, gen: grain.MapDataset | None, batch_seg: int, batch_gen: int
    ):
        super().__init__([p for p in (seg, gen) if p is not None])
        self._seg, self._gen, self._bs, self._bg = seg, gen, batch_seg, batch_gen

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, j = divmod(index, self._bs + self._bg)
        if j < self._bs:
            return self._seg[step * self._bs + j]
        return self._gen[step * self._bg + j - self._bs]

    def __str__(self) -> str:
        return f"_StratifiedMix(seg={self._bs}, gen={self._bg})"


def _stack(elements: list[dict], keys_shapes: dict) -> dict:
    if not elements:
        return {k: np.zeros((0,) + shape, dtype) for k, (shape, dtype) in keys_shapes.items()}
    return {k: np.stack([e[k] for e in elements]) for k in keys_shapes}


def _feature_shapes(task: str, resolution, context_length: int, dim: int, evaluation: bool = False) -> dict:
    h, w = resolution
    shapes = {
        "image": ((h, w, 3), np.float32),
        "context": ((context_length, dim), np.float32),
        "context_mask": ((context_length,), np.bool_),
    }
    if task == "seg":
        shapes["mask"] = ((h, w), np.float32)
        if evaluation:
            shapes["ignore"] = ((h, w), np.bool_)
    return shapes


def iterator_skips(iterator) -> dict[str, SkipLog]:
    """The per-task `SkipLog`s of a training iterator made by `make_train_iterator`."""
    return getattr(iterator, "skip_logs", {})


def split_global_batch(global_seg: int, global_gen: int, process_count: int | None = None) -> tuple[int, int]:
    """Per-process (batch_seg, batch_gen) for global task counts; each must divide by the process count
    (the number of data shards: jax processes, or data-loading groups)."""
    if process_count is None:
        import jax

        process_count = jax.process_count()
    if global_seg % process_count or global_gen % process_count:
        raise ValueError(
            f"global task counts seg={global_seg}, gen={global_gen} must be divisible by the "
            f"{process_count} data-loading processes (or groups of processes) so every global batch has "
            "exactly these counts"
        )
    return global_seg // process_count, global_gen // process_count


def _process_index_count(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def parse_repeats(text: str, names: Sequence[str], field: str) -> list[int]:
    """The repeat count of each of `names` (a task's sources, in order) from `field`'s "name:k,..."
    (unnamed sources: 1)."""
    repeats = {}
    for item in parse_names(text):
        name, _, count = (part.strip() for part in item.partition(":"))
        if name not in names or not count.isdigit() or int(count) < 1 or name in repeats:
            raise DataConfigError(
                f"data.{field}={text!r}: expected 'name:k,...' with each name once, a source of this task "
                f"({', '.join(names)}) and k an integer >= 1"
            )
        repeats[name] = int(count)
    return [repeats.get(name, 1) for name in names]


def _source_indices(sizes: Sequence[int], repeats: Sequence[int]) -> grain.MapDataset:
    """The indices of a concatenation of sources of `sizes`, source k's `repeats[k]` times over
    (consecutively, in source order): `range(sum(sizes))` when nothing repeats."""
    if all(r == 1 for r in repeats):
        return grain.MapDataset.range(sum(sizes))
    starts = np.cumsum([0, *sizes])
    repeated_starts = np.cumsum([0, *(n * r for n, r in zip(sizes, repeats))])

    def source_index(index: int) -> int:
        k = int(np.searchsorted(repeated_starts, index, side="right")) - 1
        return int(starts[k] + (index - repeated_starts[k]) % sizes[k])

    return grain.MapDataset.range(int(repeated_starts[-1])).map(source_index)


def _task_dataset(
    source,
    task: str,
    seed: int,
    shuffle: bool,
    process_index: int,
    process_count: int,
    loader: _Loader,
    skips: SkipLog,
    sizes: Sequence[int],
    repeats: Sequence[int],
) -> grain.MapDataset:
    """`sizes`: the lengths of the sources that `source` concatenates, read `repeats` times each per
    epoch."""
    if sum(sizes) == 0:
        raise ValueError(f"the {task} source is empty")
    ds = _source_indices(sizes, repeats)
    n = len(ds)  # an epoch
    if shuffle:
        ds = ds.shuffle(seed=_task_seed(seed, task))
    ds = ds.repeat()[process_index::process_count]

    def load(local_index: int, source_index: int) -> dict:
        skips.log_epoch_summary(task, (local_index * process_count + process_index) // n)
        return loader.load(int(source_index))[0]

    return ds.map_with_index(load)


# Examples of each task's training split looked up in the embedding cache when the iterator is made:
# enough to catch a split that was not precomputed, or only in part; the pipeline stops on any other.
CACHE_SPOT_CHECKS = 16


def make_train_iterator(
    data_config,
    batch_seg: int,
    batch_gen: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """The training iterator: per-process batches `{"seg": ..., "gen": ...}` of exactly `batch_seg` and
    `batch_gen` examples. These are PER-PROCESS counts: the global batch holds `process_count` times
    each (`split_global_batch` converts global counts). The skip logs are `iterator.skip_logs`.

    process_index, process_count: this data shard and the number of shards (default: the jax process's);
        training passes its data-loading group (`parallel.data_groups.data_group`), so the processes of
        a group, which hold the same batch rows, get the same batches.

    Returns a grain `DatasetIterator` (`next(it)`, `it.get_state()`, `it.set_state(state)`); checkpoint it
    with `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`. Each sub-batch has the keys
    of `_feature_shapes`; a task with batch size 0 has arrays with leading dimension 0.
    """
    if batch_seg < 0 or batch_gen < 0 or batch_seg + batch_gen == 0:
        raise ValueError(f"need non-negative batch sizes, not both 0: seg {batch_seg}, gen {batch_gen}")
    process_index, process_count = _process_index_count(process_index, process_count)
    contexts = _ContextProvider(data_config)
    skip_logs, datasets = {}, {}
    for task, count, names in (
        ("seg", batch_seg, data_config.seg_sources),
        ("gen", batch_gen, data_config.gen_sources),
    ):
        if count == 0:
            continue
        names = parse_names(names)
        repeats = parse_repeats(data_config.get(f"{task}_repeats", ""), names, f"{task}_repeats")
        source = make_task_source(names, data_config.train_split, data_config, task)
        if source is None:
            raise ValueError(f"batch_{task}={count} but data.{task}_sources is empty")
        sizes = [len(source)] if len(names) == 1 else [len(part) for part in source.sources]
        if any(r > 1 for r in repeats):
            epoch = sum(n * r for n, r in zip(sizes, repeats))
            shares = ", ".join(f"{name} {n * r / epoch:.1%}" for name, n, r in zip(names, sizes, repeats))
            log.info("train/%s: source shares per epoch with data.%s_repeats: %s", task, task, shares)
        contexts.check_covers(source, task, data_config.train_split, CACHE_SPOT_CHECKS)
        skip_logs[task] = SkipLog(f"train/{task}")
        loader = _Loader(source, task, data_config, contexts, skip_logs[task], data_config.train_split)
        datasets[task] = _task_dataset(
            source,
            task,
            seed,
            data_config.shuffle,
            process_index,
            process_count,
            loader,
            skip_logs[task],
            sizes,
            repeats,
        )
    mix = _StratifiedMix(datasets.get("seg"), datasets.get("gen"), batch_seg, batch_gen)
    shapes = {
        task: _feature_shapes(task, data_config.resolution, data_config.encoder.context_length, contexts.dim)
        for task in ("seg", "gen")
    }

    def batch_fn(elements):
        return {
            "seg": _stack(list(elements[:batch_seg]), shapes["seg"]),
            "gen": _stack(list(elements[batch_seg:]), shapes["gen"]),
        }

    read = grain.ReadOptions(
        num_threads=data_config.num_threads, prefetch_buffer_size=data_config.prefetch_buffer_size
    )
    iterator = iter(mix.to_iter_dataset(read).batch(batch_seg + batch_gen, batch_fn=batch_fn))
    iterator.skip_logs = skip_logs
    iterator.elements_per_step, iterator.process_count = batch_seg + batch_gen, process_count
    # Its saved position counts both tasks' elements interleaved: it means nothing under other counts
    # (checkpoints record them: train.checkpointing.data_layout).
    iterator.batch_seg, iterator.batch_gen = batch_seg, batch_gen
    return iterator


def state_for_process_count(saved_state: dict, saved_process_count: int, iterator) -> dict:
    """The state that resumes `iterator` (made for this run's process count, same global batch) where a
    run with `saved_process_count` data shards stopped; `saved_state` is any one of that run's states.
    Both counts are the iterators' `process_count`: the data-loading GROUP count where groups of
    processes loaded the same data, since the saved `next_index` counts one shard's elements.

    Global batch `s` holds the contiguous chunk `[s * N, (s + 1) * N)` of each task's shuffled stream
    (N = that task's global count) whatever the process count, since process `p` takes stream
    positions `p, p + P, ...`; so the step count is all that carries over."""
    per_step = iterator.elements_per_step * iterator.process_count
    if per_step % saved_process_count:
        raise ValueError(
            f"the global batch ({per_step} examples) does not split over the saved run's "
            f"{saved_process_count} data-loading processes (or groups): was the batch size changed?"
        )
    saved_per_step = per_step // saved_process_count
    steps, rest = divmod(int(saved_state["next_index"]), saved_per_step)
    if rest:
        raise ValueError(f"saved data state {saved_state} is not at a step boundary of {saved_per_step}")
    return {**saved_state, "next_index": steps * iterator.elements_per_step}


class EvalIterator:
    """Deterministic evaluation batches of one split; see the module docstring for the order.

    `len(it)` batches per process (equal on every process); `for batch in it` gives the batch dicts;
    `it.iter_with_meta()` gives `(batch, metas)` with one host dict per row (`None` for padding):
    id, text, geometry (for `preprocess.unfit_mask`), and `mask` / `ignore` at the original size.
    """

    def __init__(
        self,
        data_config,
        split: str,
        batch_size: int,
        source_names: str | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.process_index, self.process_count = _process_index_count(process_index, process_count)
        self.batch_size, self.split = batch_size, split
        self.source = make_task_source(source_names or data_config.seg_sources, split, data_config, "seg")
        self.num_examples = len(self.source)
        per_step = batch_size * self.process_count
        self.num_batches = -(-self.num_examples // per_step)
        self.skips = SkipLog(f"eval/{split}")
        # index -> skip reason of each example that could not be read (SkipLog keeps only the first
        # 10,000 ids; the evaluation job tells data errors from passing ones by this, for all of them)
        self.failures: dict[int, str] = {}
        self.contexts = _ContextProvider(data_config)
        self.loader = _Loader(
            self.source, "seg", data_config, self.contexts, self.skips, split, evaluation=True
        )
        self.shapes = _feature_shapes(
            "seg",
            data_config.resolution,
            data_config.encoder.context_length,
            self.contexts.dim,
            evaluation=True,
        )
        self.read = grain.ReadOptions(
            num_threads=data_config.num_threads, prefetch_buffer_size=data_config.prefetch_buffer_size
        )

    def __len__(self) -> int:
        return self.num_batches

    def global_index(self, step: int, row: int) -> int:
        return (step * self.process_count + self.process_index) * self.batch_size + row

    def _element(self, slot: int) -> tuple[dict, dict | None]:
        step, row = divmod(slot, self.batch_size)
        index = self.global_index(step, row)
        if index >= self.num_examples:  # the last batches' padding: nothing is read (or encoded) for it
            return self._empty(-1), None
        try:
            out, meta = self.loader.load(index)
        except ContextError:
            raise
        except Exception as e:  # noqa: BLE001  (already logged and counted by the loader)
            self.failures[index] = skip_reason(e)
            return self._empty(index), None
        out.update(valid=True, index=np.int64(index))
        return out, meta

    def _empty(self, index: int) -> dict:
        """An invalid row: zeros, every pixel ignored."""
        out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.shapes.items()}
        out["ignore"] = np.ones_like(out["ignore"])
        out.update(valid=False, index=np.int64(index))
        return out

    def _batch(self, elements):
        batch = {k: np.stack([e[0][k] for e in elements]) for k in list(self.shapes) + ["valid", "index"]}
        batch["valid"] = batch["valid"].astype(bool)
        batch["index"] = batch["index"].astype(np.int64)
        return batch, [e[1] for e in elements]

    def iter_with_meta(self, steps: Sequence[int] | None = None) -> Iterator[tuple[dict, list]]:
        """`(batch, metas)` for every batch step of this process, or only `steps` (the others are not
        read at all, so a resumed evaluation skips finished batches for free)."""
        b = self.batch_size
        steps = range(self.num_batches) if steps is None else steps
        ds = grain.MapDataset.source([s * b + r for s in steps for r in range(b)]).map(self._element)
        yield from ds.to_iter_dataset(self.read).batch(b, batch_fn=self._batch)
        log.info("evaluation %s: %d examples, %s", self.split, self.num_examples, self.skips.summary())

    def __iter__(self) -> Iterator[dict]:
        for batch, _ in self.iter_with_meta():
            yield batch


def make_eval_iterator(
    data_config,
    split: str,
    batch_size: int,
    source_names: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterator:
    """Evaluation over `split` of the segmentation sources (`source_names`, default `data.seg_sources`)."""
    return EvalIterator(data_config, split, batch_size, source_names, process_index, process_count)
