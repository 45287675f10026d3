r"""Writes the instruction-encoder contexts of whole data sets into an embedding cache.

  python -m genmask_jax.encoders.precompute --config=configs/genmask.py:variant=paper \
      --config.data.encoder.model_path=/models/Qwen2.5-VL-7B-Instruct \
      --config.data.refcoco.data_dir=/data/tfds --config.data.reasonseg.root=/data/ReasonSeg \
      --config.data.captions.path=/data/captions.jsonl --out=/data/qwen_cache \
      [--splits=all] [--eval=refcocog_umd:val,reasonseg:test] [--batch_size=8] [--shard_size=1000] \
      [--dtype=bfloat16] [--part=I --num_parts=N]

`--config` is an experiment config (with a `data` field) or a data config
(`genmask_jax.data.pipeline.default_data_config()` layout), with `--config.field=value` overrides; for a
trained run, `--config=configs/checkpoint.py:CHECKPOINT` is the config saved with it.
Every example is encoded with `data.encoder`, read exactly as the pipelines that will look it up
read it:
  - the training split (`data.train_split`): the segmentation sources as the training pipeline reads
    them, and the generation sources;
  - the evaluation splits of each configured segmentation source, as the evaluation job reads them
    (`genmask_jax.data.splits.DATASETS`: e.g. refcoco_unc val/testA/testB, refcocog_umd val/test,
    reasonseg val/test).
`--splits=all` (the default without `--eval`) takes every one of them; `--splits=train,val` only these
names, each source only the splits it has (a name that no source has is an error).
`--eval=refcoco_unc:val,reasonseg:test` names evaluation splits as `genmask_jax.evaluate --split` does,
also of data sets the config does not train on (a run trained on `ref_coco_bv/refcocox_combined` is
evaluated on `refcoco_unc:val`), each read with the evaluation job's data config for it.

An example that does not read (the data layer's `BadExample`: a polygon without points, an empty caption;
a corrupt or missing image file), or that the encoder fails on by itself (an image its processor
refuses), is skipped and logged, as the pipelines skip it; an encoder failure is also recorded in the
cache, so that the pipelines reading it skip that example too (`cache.SkippedExample`). A read that
fails in a way that may pass (`transient`: an I/O error or stale handle of a network file system, a
timeout, a dropped connection, memory) is tried again (3 tries); examples that still do not read are
not cached, and once every other example is written the command fails naming them: a pipeline that
reads one later would stop on a cache miss. `data.max_consecutive_skips` reads in a row that fail, either
way, stop the command at once, as they stop a pipeline: a folder this user may not read, images not where
the annotations say or storage that is down, not bad examples (what was read is cached; a rerun goes on).
Rerunning the same command resumes: cached ids (and recorded failures) are skipped, unread ones tried,
and a shard damaged since it was written (cut short, deleted) is written again. A resume first compares a
few cached examples of each set with the data (`RESUME_SPOT_CHECKS`) and stops when the data changed
since (another text, an image of another shape): a resume would keep those records, so changed data
needs a new --out. A cache written with other encoder settings is refused, and so is a second writer on
the same folder (`writer.lock`; a lock left by a killed run on this host is taken over);
`--config.data.encoder.device=cuda:N` picks its GPU.
To use several GPUs or hosts, split the work: `--num_parts=N --part=I` (I = 0 ... N-1) encodes examples I,
I + N, I + 2N, ... of each set into the part folder `OUT/part-0000I-of-0000N`, one process per part, all at
once (a shared file system for several hosts); the cache `OUT` is read as one from them. A part resumes as
above. A run that splits another way (or not at all) is refused while they run; after them it encodes only
what they left (`CacheWriter`). A repeated id is refused within a part; in two parts (sets that share an
example) both are encoded and readers take the first part's record.
Then train / evaluate with `--config.data.encoder.cache_dir=CACHE` and the same `data.encoder`
settings. With `data.encoder.rewrite_reasoning`, ReasonSeg's long queries are first rewritten by the
VLM (`genmask_jax.encoders.encoder_input`) and the description is stored beside the context.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tqdm

from genmask_jax.data.skips import SkipLog, skip_reason, transient
from genmask_jax.data.sources import make_task_source, max_consecutive_skips, parse_names
from genmask_jax.data.splits import DATASETS, SplitSpec, parse_splits, refcoco_config, split_data_config
from genmask_jax.encoders import ContextError, PromptTooLong, encoder_input, fingerprint, make_encoder
from genmask_jax.encoders.cache import CacheMismatch, CacheWriter, EmbeddingCache, SkippedExample

log = logging.getLogger("genmask_jax.encoders.precompute")
RESUME_SPOT_CHECKS = 8  # cached examples of each set compared with the data before a resume goes on


class PrecomputeError(ValueError):
    """A request that cannot be precomputed as given (an unknown split, ids that repeat)."""


class UnreadExamples(PrecomputeError):
    """Examples whose read kept failing with a `transient` error: everything else was written, a rerun
    tries them again."""


class Job(NamedTuple):
    """One source set to encode: `data_config` reads it with `make_task_source(names, split, ...)`."""

    label: str
    task: str
    split: str
    names: str
    data_config: object


def plan_jobs(data_config, splits: Sequence[str] = ("all",), evals: str | Sequence[str] = ()) -> list[Job]:
    """The jobs of `splits` (the training split of every source and the evaluation splits of the
    configured segmentation sources that it names; "all": every one) and of `evals` (evaluation splits
    as `evaluate --split` names them), each read with the data config its consumer uses."""
    jobs = _configured_jobs(data_config, splits) if splits else []
    evals = [evals] if isinstance(evals, str) else list(evals)
    for spec in parse_splits(evals) if any(e.strip() for e in evals) else []:
        if f"{spec.dataset}/{spec.split}" not in {j.label for j in jobs}:
            jobs.append(_eval_job(data_config, spec))
    if not jobs:
        raise PrecomputeError("nothing to precompute: give --splits and/or --eval")
    return jobs


def _eval_job(data_config, spec: SplitSpec) -> Job:
    config = split_data_config(data_config, spec)  # what the evaluation job reads
    return Job(f"{spec.dataset}/{spec.split}", "seg", spec.split, config.seg_sources, config)


def _configured_jobs(data_config, splits: Sequence[str]) -> list[Job]:
    wanted = set(splits)
    every = "all" in wanted
    train = data_config.train_split
    jobs = []
    if every or train in wanted:
        for task, names in (("seg", data_config.seg_sources), ("gen", data_config.gen_sources)):
            if parse_names(names):
                jobs.append(Job(f"{task}/{train}", task, train, names, data_config))
    seg_names = parse_names(data_config.seg_sources)
    # "ref_coco_bv/refcoco_unc:1.0.0" holds the refcoco_unc splits too
    refcoco_configs = {refcoco_config(n) for n in parse_names(data_config.refcoco.name)}
    available = {train}
    for dataset, (source, refcoco, eval_splits) in DATASETS.items():
        if source not in seg_names or (refcoco is not None and refcoco not in refcoco_configs):
            continue
        available.update(eval_splits)
        jobs += [_eval_job(data_config, SplitSpec(dataset, s)) for s in eval_splits if every or s in wanted]
    unknown = sorted(wanted - available - {"all"})
    if unknown:
        raise PrecomputeError(
            f"no source has split(s) {', '.join(unknown)}; these sources have {', '.join(sorted(available))} "
            f"(an evaluation split of another data set: --eval=DATASET:SPLIT, e.g. --eval=refcoco_unc:val)"
        )
    return jobs


def _encode(encoder, batch: list, task: str, encoder_config) -> list[tuple]:
    """`[(valid token states (T, D), rewrite or None, image read or None)]` of a batch of
    `(example id, raw example)`."""
    inputs = [encoder_input(raw, task, encoder_config) for _, raw in batch]
    images, texts, flags = (list(column) for column in zip(*inputs))
    try:
        if any(flags):
            contexts, masks = encoder.encode(images, texts, rewrite=flags)
        else:
            contexts, masks = encoder.encode(images, texts)
    except PromptTooLong as e:
        raise PromptTooLong(f"example {batch[e.index][0]!r}: {e}", index=e.index) from None
    rewrites = getattr(encoder, "last_rewrites", None) or [None] * len(batch)
    return [
        (context[mask], rewrite, image)
        for context, mask, rewrite, image in zip(contexts, masks, rewrites, images)
    ]


def _encode_one_by_one(encoder, batch: list, writer: CacheWriter, task: str, encoder_config):
    """Encodes each example of `batch` alone into `writer`; returns ([(example, ValueError) of those the
    encoder refused], how many were written)."""
    refused = []
    for example in batch:
        try:
            [(states, rewrite, image)] = _encode(encoder, [example], task, encoder_config)
        except ContextError:
            raise
        except ValueError as e:
            refused.append((example, e))
            continue
        writer.add(example[0], states, text=example[1]["text"], rewrite=rewrite, image=image)
    return refused, len(batch) - len(refused)


def _encode_batch(
    encoder, batch: list, writer: CacheWriter, task: str, encoder_config, skips: SkipLog
) -> int:
    """Encodes `batch` into `writer`; returns how many examples were written.

    A batch that the encoder refuses with a ValueError (an input it cannot take: Qwen's image processor
    and an aspect ratio over 200) is encoded again one example at a time; an example refused alone is a
    bad example, as in the pipelines: logged in `skips` and recorded in the cache (`CacheWriter.add_skip`),
    so that pipelines reading the cache skip it as they would skip it running the encoder, and a resume
    goes past it. Any other failure (out of memory, a CUDA error, a broken model) stops the precompute
    and records nothing, and so does a batch of several whose every example is refused alone: the
    encoder is to blame, not the data; a rerun resumes."""
    try:
        results = _encode(encoder, batch, task, encoder_config)
    except ContextError:
        raise
    except ValueError as e:
        if len(batch) == 1:
            refused, written = [(batch[0], e)], 0
        else:
            refused, written = _encode_one_by_one(encoder, batch, writer, task, encoder_config)
            if len(refused) == len(batch):
                raise PrecomputeError(
                    f"the encoder refused each of the {len(batch)} examples of a batch alone "
                    f"({skip_reason(e)}): a setting or the encoder to fix, not the data; nothing recorded"
                ) from e
        for (example_id, raw), error in refused:
            skips.add(example_id, skip_reason(error))
            image = encoder_input(raw, task, encoder_config)[0]
            writer.add_skip(example_id, skip_reason(error), text=raw["text"], image=image)
        return written
    for (example_id, raw), (states, rewrite, image) in zip(batch, results):
        writer.add(example_id, states, text=raw["text"], rewrite=rewrite, image=image)
    return len(batch)


def _read(source, index: int, example_id: str, tries: int, retry_wait_s: float) -> dict:
    """`source[index]`, read up to `tries` times while it raises a `transient` error, waiting
    `retry_wait_s`, twice that, ... in between. Raises the last error, and any other one at once (a bad
    example, a corrupt image: they fail the same way again)."""
    for attempt in range(tries - 1):
        try:
            return source[index]
        except Exception as e:  # noqa: BLE001  (a transient error is tried again; the last try raises)
            if not transient(e):
                raise
            log.info("reading %s failed (%s): trying again", example_id, skip_reason(e))
            time.sleep(retry_wait_s * 2**attempt)
    return source[index]


def _unread_error(unread: list[tuple[str, str]], tries: int, show: int = 10) -> UnreadExamples:
    ids = ", ".join(example_id for example_id, _ in unread[:show]) + (", ..." if len(unread) > show else "")
    return UnreadExamples(
        f"{len(unread)} examples did not read after {tries} tries (an I/O error that may pass: a network "
        f"file system, a timeout, memory) and are not cached ({ids}; first error {unread[0][1][:300]}); "
        "every other example is: rerun the same command to try them again once the storage reads (an "
        "error that stays, a bad disk block, needs its file fixed or removed)"
    )


def _failing_source_error(job: Job, count: int, reason: str) -> PrecomputeError:
    return PrecomputeError(
        f"{job.label}: {count} examples in a row did not read (the last: {reason[:300]}); that is the data "
        "set's files or paths (a folder this user may not read, images not where the annotations say, "
        "storage that is down), not bad examples, as in the pipelines (data.max_consecutive_skips); "
        "what was read before is cached: fix it and rerun the same command to go on"
    )


def _check_resumed(
    cache: EmbeddingCache,
    job: Job,
    source,
    indices: range,
    cached_ids: set,
    encoder_config,
    read_tries: int,
    retry_wait_s,
) -> None:
    """Raises PrecomputeError when one of `RESUME_SPOT_CHECKS` examples at `indices` of `source` whose ids
    are in `cached_ids` (evenly spread over them) was encoded from another text or image shape than the
    data now gives (`EmbeddingCache.lookup`'s checks): the resume would count the stale records as done."""
    cached = [i for i in indices if source.example_id(i) in cached_ids]
    picks = np.unique(np.linspace(0, len(cached) - 1, min(RESUME_SPOT_CHECKS, len(cached))).astype(int))
    for index in (cached[k] for k in picks):
        example_id = source.example_id(index)
        try:
            raw = _read(source, index, example_id, read_tries, retry_wait_s)
        except Exception:  # noqa: BLE001  (an example that does not read now proves nothing)
            continue
        try:
            cache.lookup(example_id, raw["text"], image=encoder_input(raw, job.task, encoder_config)[0])
        except SkippedExample:  # its text and image matched: `lookup` checks them first
            pass
        except CacheMismatch as e:
            raise PrecomputeError(f"{job.label}: {e}") from None


def precompute(
    data_config,
    out: str,
    splits: Sequence[str] = ("all",),
    batch_size: int = 8,
    shard_size: int = 1000,
    dtype: str = "bfloat16",
    encoder=None,
    evals: str | Sequence[str] = (),
    read_tries: int = 3,
    retry_wait_s: float = 2.0,
    part: tuple[int, int] | None = None,
) -> dict:
    """Fills the cache at `out` with the jobs of `plan_jobs(data_config, splits, evals)`; returns
    {"written": n, "already": n, "skips": summary}. Raises `UnreadExamples` after writing everything
    else when some examples did not read in `read_tries` tries of a `transient` error (`retry_wait_s`
    seconds before the second, doubling); an example whose read fails otherwise is a logged skip. Raises
    `PrecomputeError` at once when `data_config.max_consecutive_skips` reads of a job fail in a row.

    `encoder`: an encoder built from `data_config.encoder` (tests pass one to reuse a loaded model).
    `part=(i, n)`: only the examples at indices i, i + n, i + 2n, ... of each job, written to the part
    folder `cache.part_folder(out, i, n)` (`CacheWriter`); the n parts run at once, one per process.
    """
    max_failed = max_consecutive_skips(data_config)  # as many as stop a pipeline reading the source
    jobs = plan_jobs(data_config, splits, evals)
    encoder = encoder or make_encoder(data_config.encoder)
    config = data_config.encoder
    if (encoder.name, encoder.context_length) != (config.name, config.context_length):
        raise ValueError(f"the encoder {encoder.name} (L={encoder.context_length}) is not data.encoder's")
    # Every source opens (cheap: nothing decoded) before the cache folder is made: a missing data set
    # fails first and leaves nothing behind.
    sources = [make_task_source(job.names, job.split, job.data_config, job.task) for job in jobs]
    skips = SkipLog("precompute")
    unread: list[tuple[str, str]] = []  # (example id, "kind: detail")
    written = already = 0
    part = part if part is not None and part[1] > 1 else None
    start, step = part or (0, 1)
    indices = [range(start, len(source), step) for source in sources]
    with CacheWriter(
        out, encoder.dim, encoder.context_length, dtype, fingerprint(data_config.encoder), shard_size, part
    ) as writer:
        # A resume: what is cached must still be what the data gives. Each folder is read on its own: a
        # damaged shard of another writer's is left to that writer (it unpublishes and redoes it).
        for folder, ids in [(writer.folder, writer.own), *writer.elsewhere.items()]:
            if not ids:
                continue
            try:
                cache = EmbeddingCache(folder, parts=False)
            except CacheMismatch:
                if folder == writer.folder:
                    raise
                log.warning("%s does not read as a cache now: its records are not spot-checked", folder)
                continue
            for job, source, mine in zip(jobs, sources, indices):
                _check_resumed(cache, job, source, mine, ids, config, read_tries, retry_wait_s)
            del cache
        for job, source, mine in zip(jobs, sources, indices):
            batch, seen, failed_in_a_row = [], set(), 0
            label = job.label if part is None else f"{job.label} (part {start} of {step})"
            for index in tqdm.tqdm(mine, desc=label, unit="ex"):
                example_id = source.example_id(index)
                if example_id in seen:
                    raise PrecomputeError(
                        f"{job.label}: example id {example_id!r} occurs twice (again at index {index}); "
                        "ids key the cache, so a source must give every example its own id"
                    )
                seen.add(example_id)
                if example_id in writer.done:  # read before: failures on either side are not in a row
                    already += 1
                    failed_in_a_row = 0
                    continue
                try:
                    batch.append((example_id, _read(source, index, example_id, read_tries, retry_wait_s)))
                    failed_in_a_row = 0
                except Exception as e:  # noqa: BLE001  (the pipelines' read fails too: they skip it)
                    if transient(e):  # reported once the rest is written
                        log.warning("%s did not read in %d tries: %s", example_id, read_tries, skip_reason(e))
                        unread.append((example_id, skip_reason(e)))
                    else:  # a bad example, a corrupt image: it fails every time, no record needed
                        skips.add(example_id, skip_reason(e))
                    failed_in_a_row += 1
                    if failed_in_a_row == max_failed:
                        raise _failing_source_error(job, failed_in_a_row, skip_reason(e)) from e
                    continue
                if len(batch) == batch_size:
                    written += _encode_batch(encoder, batch, writer, job.task, data_config.encoder, skips)
                    batch = []
            if batch:
                written += _encode_batch(encoder, batch, writer, job.task, data_config.encoder, skips)
            writer.flush()
    counts = f"{written} written, {already} already there, {len(unread)} unread"
    log.info("cache %s: %s; %s", writer.folder, counts, skips.summary())
    if unread:
        raise _unread_error(unread, read_tries)
    return {"written": written, "already": already, "skips": skips.summary()}


def _define_flags():
    from absl import flags

    from genmask_jax.infer import cli

    config = cli.define_config_flag()
    flags.DEFINE_string("out", None, "The cache folder (created; an existing cache is resumed).")
    flags.DEFINE_list(
        "splits", None, "Splits to encode (each source only those it has), or 'all' (default without --eval)."
    )
    flags.DEFINE_list(
        "eval", [], "Evaluation splits as `evaluate --split` names them, e.g. refcoco_unc:val,reasonseg:test."
    )
    flags.DEFINE_integer("batch_size", 8, "Examples per encoder call.")
    flags.DEFINE_integer("shard_size", 1000, "Records per array_record shard.")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Stored context dtype.")
    flags.DEFINE_integer(
        "num_parts", 1, "Split the examples into this many parts, each precomputed by its own process.",
        lower_bound=1,
    )
    flags.DEFINE_integer("part", 0, "The part (0 ... num_parts - 1) that this process precomputes.")
    flags.register_multi_flags_validator(
        ["part", "num_parts"],
        lambda f: 0 <= f["part"] < f["num_parts"],
        message="--part must be one of 0 ... --num_parts - 1",
    )
    flags.mark_flags_as_required(["config", "out"])
    return config


def main(config) -> None:
    from absl import flags

    from genmask_jax.encoders.cache import CacheLocked
    from genmask_jax.infer import cli

    args = flags.FLAGS
    data_config = config.data if "data" in config else config
    splits = args.splits if args.splits is not None else ([] if args.eval else ["all"])
    part = (args.part, args.num_parts) if args.num_parts > 1 else None
    try:
        jobs = plan_jobs(data_config, splits, args.eval)
        where = args.out if part is None else f"{args.out} (part {args.part} of {args.num_parts})"
        print(f"encoding {', '.join(j.label for j in jobs)} into {where}", flush=True)
        encoder = make_encoder(data_config.encoder)
    except ValueError as e:  # an unknown split, an empty model path, settings that cannot fit
        raise cli.InputError(str(e)) from e
    try:
        result = precompute(
            data_config, args.out, splits, args.batch_size, args.shard_size, args.dtype, encoder, args.eval,
            part=part,
        )
    except (PrecomputeError, ContextError, CacheLocked) as e:
        raise cli.InputError(str(e)) from e
    print(result, flush=True)


if __name__ == "__main__":
    from genmask_jax.infer import cli

    _CONFIG = _define_flags()
    cli.run(lambda: main(_CONFIG.value), prog="genmask_jax.encoders.precompute")
