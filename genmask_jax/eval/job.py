"""The batch evaluation job: named splits -> per-example predictions at the original size + metrics.

The split names and the data config that reads each are `genmask_jax.data.splits` (DATASETS,
`split_data_config`), shared with the embedding-cache precompute (`--eval=<split>`).

Each process reads its own examples (`data.pipeline.make_eval_iterator`: every example exactly once
over all processes) and predicts them on its own devices. A prediction is a score at the model
resolution, mapped back to the image's original size bilinearly and thresholded there
(`infer.segmenter.original_size_mask`, as LISA upsamples its logits). One evaluation batch is one
*shard*: `<out>/<dataset>-<split>/shards/shard-<first index>-<last index>-<write stamp>.json` lists, per
example, the global index, id, text, intersection and union at the original size (LISA's protocol,
`eval/metrics.py`) and where its prediction is (a PNG under `masks/`, or COCO RLE inline). A shard's
JSON is written last and atomically, so a shard exists only when complete, and under a name no other
write takes, so a rerun never replaces an earlier shard; a rerun skips batches whose examples all have
a shard (resumable, whatever the batch size or process count of the earlier run), and an example found
in several shards counts once, from the newest (a later failed read does not undo a prediction). An
example whose data
cannot be read is recorded as "unreadable" (left out of the metrics, listed in `metrics.json`); one
that failed for another reason (memory, a lost connection) gets no record, so a rerun retries it. When
every process is done, process 0 merges the shards into `metrics.json` (and, for RLE, `predictions.json`;
a split it cannot merge stops every process), so the processes must share `<out>`: one folder, gs:// or a
shared file system (`check_shared_out`). `run.json` in each split's folder says what produced its shards
(checkpoint, step, EMA or raw parameters, sampler settings, a digest of the config fields that change
predictions, the split's example count); a rerun with other settings is refused. Results are found by
index, so a rerun also checks that every finished example is still the one at its index (the ids its
shards recorded): when the data behind a split changed (an example added or dropped from a listing,
another copy of a data set) it is refused, while the same data moved elsewhere keeps its results.
`<out>/run.json` holds what every split of one `--out` shares (checkpoint, step, parameters, sampler
settings, the digest of the config less the split sources' sections): an evaluation of another checkpoint
into it is refused, so the `<out>/metrics.json` that gathers the splits' metrics describes one evaluation.
An `--out` written before `<out>/run.json` existed gets one only once its split folders' run.json agree
with it.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from genmask_jax.data.pipeline import make_eval_iterator
from genmask_jax.data.skips import is_data_error
from genmask_jax.data.splits import (  # noqa: F401  (re-exported: the split table lived here before data/)
    BIG_VISION_REFCOCO,
    DATASETS,
    SplitError,
    SplitSpec,
    parse_splits,
    refcoco_source_name,
    split_data_config,
)
from genmask_jax.eval.metrics import intersection_and_union, metrics_from_counts, per_sample_iou
from genmask_jax.parallel import multihost
from genmask_jax.parallel.multihost import gather_ints

log = logging.getLogger(__name__)

FORMATS = ("png", "rle")


class EvaluationError(ValueError):
    """Bad evaluation input (unknown split, an output folder of a different run): one line for the user."""


# eval batch -> float scores (B, h, w) at the model resolution, foreground > 0 (bool masks are taken as
# +-1); may return an unfinished jax.Array (the job converts it only after dispatching the next batch,
# so the device and the host work overlap).
PredictFn = Callable[[dict], Any]


def check_sources(data_config: ml_collections.ConfigDict, specs: Sequence[SplitSpec]) -> None:
    """Opens every split's source (cheap: no decoding), so a missing data set fails before any model
    is loaded; raises the source's own error (FileNotFoundError with what to prepare). With an
    embedding cache (`data.encoder.cache_dir`), also checks that it was written with the config's
    encoder settings (`encoders.cache.CacheMismatch`) and holds every example of each split (reading
    each example's id), else raises EvaluationError naming the split and how many it lacks."""
    from genmask_jax.data.sources import make_task_source

    cache = None
    if data_config.encoder.cache_dir:
        from genmask_jax.encoders import fingerprint
        from genmask_jax.encoders.cache import EmbeddingCache, readable

        cache = EmbeddingCache(data_config.encoder.cache_dir, fingerprint(data_config.encoder))
    for spec in specs:
        config = split_data_config(data_config, spec)
        source = make_task_source(config.seg_sources, spec.split, config, "seg")
        if len(source) == 0:
            raise EvaluationError(f"{spec.name} has no examples")
        if cache is not None:
            ids = [source.example_id(i) for i in range(len(source))]
            missing = cache.missing(ids)
            # precompute leaves out the examples it cannot read: those are data errors that the run
            # records as unreadable, so the split is refused only if a readable example is missing.
            index = {example_id: i for i, example_id in enumerate(ids)}
            if any(readable(source, index[example_id]) for example_id in missing):
                cache_dir = data_config.encoder.cache_dir
                raise EvaluationError(
                    f"{spec.name}: {len(missing)} of its {len(source)} examples are not in the embedding "
                    f"cache {cache_dir} (e.g. {missing[0]}); add them with `python -m "
                    f"genmask_jax.encoders.precompute --config=<the run's config, e.g. "
                    f"configs/checkpoint.py:CHECKPOINT> --out={cache_dir} --eval={spec.name}`"
                )


def encode_rle(mask: np.ndarray) -> dict:
    """bool `(H, W)` -> COCO RLE {"size": [H, W], "counts": str}."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def _tmp_path(path: epath.Path) -> epath.Path:
    # Unique per writer: processes on different hosts can share a pid, two runs on one host an index.
    return path.parent / f".{path.name}.tmp-{jax.process_index()}-{os.getpid()}"


def _write_atomic(path: epath.Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text)
    tmp.replace(path)


def on_process_0(what: str, fn: Callable[[], Any], is_process_0: bool | None = None) -> Any:
    """`multihost.on_process_0` for the evaluation: `fn()` on process 0 (`is_process_0`), and when it
    raises there the others raise EvaluationError "process 0 could not <what> (its error says why)"."""
    error = lambda: EvaluationError(f"process 0 could not {what} (its error says why)")  # noqa: E731
    return multihost.on_process_0(fn, error, is_process_0)


def shard_name(indices: Sequence[int], stamp_ns: int, process_index: int) -> str:
    """`shard-<first>-<last>-<stamp_ns>-<process>.json`: batches of a rerun with another batch size or
    process count can share their first index with an earlier shard, so the write time and the writer
    make the name unique."""
    return f"shard-{min(indices):09d}-{max(indices):09d}-{stamp_ns:019d}-{process_index}.json"


_STAMPED_SHARD = re.compile(r"shard-\d+-\d+-(\d+)-\d+\.json")


def write_order(path: epath.Path) -> tuple[int, str]:
    """Sort key of shard files, oldest first: unstamped `shard-<first index>.json` (written before shard
    names carried a stamp), then by write time."""
    match = _STAMPED_SHARD.fullmatch(path.name)
    return (int(match.group(1)) if match else -1, path.name)


class ShardStore:
    """The finished shards of one split under `directory` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, fmt: str = "png"):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.directory, self.fmt = epath.Path(directory), fmt
        self.shards = self.directory / "shards"
        self.masks = self.directory / "masks"

    def shard_files(self) -> list[epath.Path]:
        if not self.shards.exists():
            return []
        return sorted(p for p in self.shards.iterdir() if p.name.startswith("shard-") and p.suffix == ".json")

    def records(self) -> list[dict]:
        """Every finished example's record, one per global index, sorted by index. An example in several
        shards (a rerun's batch that mixed done and missing examples) takes its newest record: each write
        rewrites the example's PNG, so that record is the one describing it. Except an "unreadable" one
        over a prediction: a read that failed since (a mount gone for a moment) writes no PNG and says
        nothing of the prediction, which stands."""
        by_index = {}
        for path in sorted(self.shard_files(), key=write_order):
            for record in json.loads(path.read_text()):
                earlier = by_index.get(int(record["index"]))
                if record.get("unreadable") and earlier is not None and not earlier.get("unreadable"):
                    continue
                by_index[int(record["index"])] = record
        return [by_index[i] for i in sorted(by_index)]

    def write(self, records: list[dict], masks: Sequence[np.ndarray]) -> epath.Path:
        """Writes the predictions of one batch, then its shard JSON (the commit)."""
        self.shards.mkdir(parents=True, exist_ok=True)
        from genmask_jax.infer.images import write_mask

        for record, mask in zip(records, masks):
            if mask is None:
                continue
            if self.fmt == "png":
                record["file"] = f"masks/{record['index']:09d}.png"
                write_mask(mask, self.directory / record["file"])
            else:
                record["segmentation"] = encode_rle(mask)
        indices = [r["index"] for r in records]
        path = self.shards / shard_name(indices, time.time_ns(), jax.process_index())
        _write_atomic(path, json.dumps(records))
        return path


# Fields run.json has held only since 2026-12-07: a folder written before lacks them and keeps its results.
RECORDED_SINCE = ("num_examples",)


def recorded_settings(directory: epath.Path) -> dict | None:
    """The settings `check_settings` recorded in `directory` (its run.json), None if none yet."""
    path = directory / "run.json"
    return json.loads(path.read_text()) if path.exists() else None


def differing_fields(previous: dict, settings: dict, fields=None) -> list[str]:
    """The fields (default: all of both) whose values in `previous` (a run.json) and `settings` differ; one
    that `previous` lacks counts unless it is in RECORDED_SINCE."""
    fields = set(previous) | set(settings) if fields is None else fields
    return sorted(
        k for k in fields if previous.get(k) != settings.get(k) and (k in previous or k not in RECORDED_SINCE)
    )


def _refuse(directory: epath.Path, changed: Sequence[str]) -> None:
    raise EvaluationError(
        f"{directory} holds results of a different evaluation (differs in {', '.join(changed)}); "
        "use another --out or delete it"
    )


def check_settings(directory: epath.Path, settings: dict) -> None:
    """Refuses to mix results of different runs (checkpoint, steps, seed, ...) in one output folder;
    process 0 records `settings` there if it has none (`on_process_0`: every process calls this)."""
    previous = recorded_settings(directory)
    if previous is not None:
        changed = differing_fields(previous, settings)
        if changed:
            _refuse(directory, changed)

    def record():
        # Another process may find the run.json process 0 has just written: it compared the same settings.
        if previous is None:
            directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(directory / "run.json", json.dumps(settings, indent=1, sort_keys=True))

    on_process_0(f"write {directory / 'run.json'}", record)


def shared_settings(
    directory, step: int, params_key: str | None, num_steps: int, seed: int, resolution
) -> dict:
    """What every split of one --out shares, in `<out>/run.json` and each split's: the checkpoint (manager
    directory, step, "ema_params" | "params"), the sampler settings and the model resolution `(H, W)`.
    `params_key` None (not known before the checkpoint loads) leaves "params" out."""
    settings = {
        "checkpoint": str(directory),
        "step": step,
        "params": params_key,
        "num_steps": num_steps,
        "seed": seed,
        "resolution": [int(x) for x in resolution],
    }
    return {k: v for k, v in settings.items() if v is not None}


def check_out(
    out_dir: str | os.PathLike, settings: dict, config: ml_collections.ConfigDict, record: bool = True
) -> None:
    """Refuses (EvaluationError) an --out holding another evaluation than `settings` (`shared_settings`)
    of `config` (`prediction_config_digest`), then, with `record`, has process 0 write `<out>/run.json`
    if it has none. An --out written before `<out>/run.json` existed is checked against each split
    folder's run.json first (in the fields both hold: a split's config digest covers its own source),
    so a mistaken rerun there does not record its settings and then refuse the ones that made the splits.
    Without `record` only the fields of `settings` are compared and nothing is written (`evaluate` before
    the checkpoint loads; `run` before a split's own check has passed). Every process decides alike:
    one that finds the run.json process 0 has just written finds the settings it checks, written only if
    the split folders agreed with them."""
    out = epath.Path(out_dir)
    settings = {**settings, "config": prediction_config_digest(config)}
    previous = recorded_settings(out)
    if previous is None and out.is_dir():
        for split_dir in sorted(p for p in out.iterdir() if p.is_dir()):
            recorded = recorded_settings(split_dir)
            if recorded is None or "split" not in recorded:
                continue
            changed = differing_fields(recorded, settings, (set(recorded) & set(settings)) - {"config"})
            if changed:
                _refuse(split_dir, changed)
    if record:
        check_settings(out, settings)
    elif previous is not None:
        changed = differing_fields(previous, settings, set(settings))
        if changed:
            _refuse(out, changed)


def placeholder_id(index: int) -> str:
    """The id recorded for example `index` when even its id cannot be read."""
    return f"<index {index}>"


def source_example_id(source, index: int) -> str:
    """The id of example `index` of `source`, `placeholder_id(index)` when even that cannot be read (the
    id only labels the record of an unreadable example)."""
    try:
        return str(source.example_id(index))
    except Exception:  # noqa: BLE001
        return placeholder_id(index)


def check_same_examples(
    directory: epath.Path, spec: SplitSpec, records: Sequence[dict], num_examples: int, example_id
) -> None:
    """Raises EvaluationError when the split's examples are no longer those `records` were made of: a
    count other than the one run.json recorded, a record past the split's end, or a finished record whose
    id is not that of the example now at its index (`example_id(index)`; ReasonSeg's and the synthetic
    split's are look-ups, RefCOCO's parses its serialized record, decoding nothing).
    Results are found by index, and would otherwise be reused for other examples (one counted twice,
    another never evaluated). An id that could not be read, then or now (`placeholder_id`), is not
    compared: a read that failed briefly says nothing about the data.

    Every process runs this at its start on the same shard files, run.json and source, so all refuse or
    none does (one leaving alone would keep the others waiting at the split's barrier): an id read that
    fails on one process only is not compared, and the shards that faster processes of this run write
    meanwhile hold the ids read now. Processes could decide differently only when reading different copies
    of the data (which would evaluate different examples anyway) or when another evaluation writes into
    the same folder at the same time (which nothing guards against)."""
    previous = (recorded_settings(directory) or {}).get("num_examples", num_examples)
    change = None
    if previous != num_examples:
        change = f"{previous} examples then, {num_examples} now"
    else:
        for record in records:
            index = int(record["index"])
            if index >= num_examples:
                change = f"example {index} was {record['id']}, now past the end of the split"
                break
            now = example_id(index)
            if placeholder_id(index) not in (now, record["id"]) and now != record["id"]:
                change = f"example {index} was {record['id']}, now {now}"
                break
    if change is not None:
        raise EvaluationError(
            f"{spec.name}: the data behind the split changed since {directory} was written ({change}); "
            "use a new --out, or delete that folder to evaluate the split again"
        )


def _batch_indices(iterator, step: int) -> list[int]:
    rows = (iterator.global_index(step, r) for r in range(iterator.batch_size))
    return [i for i in rows if i < iterator.num_examples]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_shared_out(out_dir: str | os.PathLike) -> None:
    """Stops every process (EvaluationError) when one cannot see a file that process 0 has just written
    in `out_dir`: each process writes its own examples' shards there and process 0 merges them, so under
    a multi-process launch `out_dir` must be one folder every process shares (gs://..., a shared file
    system), not a path on each host's own disk, where process 0 would find the others' examples missing
    on every rerun. Creates `out_dir` (process 0); no-op on one process."""
    if jax.process_count() == 1:
        return
    import secrets

    out, token, problem = epath.Path(out_dir), 0, None
    if jax.process_index() == 0:
        try:
            token = secrets.randbelow(2**31 - 1) + 1  # 0: process 0 wrote nothing
            out.mkdir(parents=True, exist_ok=True)
            (out / f".shared-check-{token}").write_text("")
        except OSError as e:
            token, problem = 0, f"cannot write in --out {out}: {e.strerror or e}"
    token = int(gather_ints(token)[0])  # also the barrier: every process looks once process 0 has written
    if token == 0:
        raise EvaluationError(problem or f"process 0 cannot write in --out {out} (its error says why)")
    marker = out / f".shared-check-{token}"
    try:
        seen = marker.exists()
    except OSError:
        seen = False
    blind = [i for i, s in enumerate(gather_ints(seen)) if not s]
    if jax.process_index() == 0:
        with contextlib.suppress(OSError):  # a marker left behind is harmless, a process leaving alone is not
            marker.unlink(missing_ok=True)
    if blind:
        raise EvaluationError(
            f"--out {out} is not one folder that every process shares (process {blind[0]} cannot see what "
            "process 0 writes there): under a multi-process launch --out must be a folder every process "
            "shares, e.g. gs://... or a shared file system"
        )


def to_records(
    scores, batch: dict, metas: list, num_examples: int, example_id=str, reason=lambda index: None
) -> tuple[list[dict], list[np.ndarray | None], list[tuple[str, str]]]:
    """Maps each valid row's score back to its image's original size, thresholds and scores it.

    Rows of examples that could not be read (no meta, an index inside the split) become records
    marked "unreadable" when their data is to blame (`reason(index)`, `is_data_error`), so a rerun does
    not retry them forever; the others get no record (a rerun retries them) and are returned as
    (id, reason) in the third list. Padding rows are dropped.
    """
    from genmask_jax.infer.segmenter import original_size_mask

    scores = np.asarray(scores)
    records, originals, retried = [], [], []
    for row, meta in enumerate(metas):
        index = int(batch["index"][row])
        if meta is None:
            if 0 <= index < num_examples:
                name = example_id(index)
                cause = reason(index)
                if is_data_error(cause):
                    records.append({"index": index, "id": name, "unreadable": True, "reason": cause})
                    originals.append(None)
                else:
                    retried.append((name, cause))
            continue
        pred = original_size_mask(scores[row], meta["geometry"])
        inter, union = intersection_and_union(pred, meta["mask"], meta["ignore"])
        iou = float(per_sample_iou(np.array([inter]), np.array([union]))[0])
        records.append(
            {
                "index": index,
                "id": str(meta["id"]),
                "text": str(meta["text"]),
                "intersection": int(inter),
                "union": int(union),
                "iou": iou,
            }
        )
        originals.append(pred)
    return records, originals, retried


def evaluate_split(
    predict: PredictFn,
    data_config: ml_collections.ConfigDict,
    spec: SplitSpec,
    out_dir: str | os.PathLike,
    batch_size: int,
    fmt: str = "png",
    settings: dict | None = None,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict | None:
    """Evaluates one split; returns its metrics on process 0 (None elsewhere).

    Args:
      predict: eval batch (interfaces.md) -> float scores `(B, h, w)` at the model resolution
        (foreground > 0; see PredictFn).
      data_config: the experiment's data config (the split's source is set from `spec`).
      out_dir: results go to `out_dir/<dataset>-<split>/`.
      batch_size: per-process batch size.
      settings: what identifies this evaluation (checkpoint, steps, ...); a rerun must match it.
    """
    from tqdm import tqdm

    store = ShardStore(epath.Path(out_dir) / spec.dirname, fmt)
    iterator = make_eval_iterator(
        split_data_config(data_config, spec),
        spec.split,
        batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    example_id = partial(source_example_id, iterator.source)
    records = store.records()
    count = {"num_examples": iterator.num_examples}
    check_same_examples(store.directory, spec, records, iterator.num_examples, example_id)
    check_settings(store.directory, {"split": spec.name, "format": fmt, **(settings or {}), **count})
    done = {int(r["index"]) for r in records}
    todo = [s for s in range(len(iterator)) if not set(_batch_indices(iterator, s)) <= done]
    skipped = len(iterator) - len(todo)
    log.info(
        "%s: %d examples, %d batches of %d on this process, %d already done",
        spec.name,
        iterator.num_examples,
        len(iterator),
        batch_size,
        skipped,
    )
    bar = tqdm(
        total=len(iterator),
        initial=skipped,
        desc=spec.name,
        unit="batch",
        disable=not progress or iterator.process_index != 0,
    )

    retried = []

    def finish(batch, metas, scores):
        records, originals, failed = to_records(
            scores, batch, metas, iterator.num_examples, example_id, iterator.failures.get
        )
        retried.extend(failed)
        if records:
            store.write(records, originals)
        bar.update(1)

    pending = None
    for batch, metas in iterator.iter_with_meta(todo):
        scores = predict(batch)
        if pending is not None:
            finish(*pending)
        pending = (batch, metas, scores)
    if pending is not None:
        finish(*pending)
    bar.close()
    if retried:
        log.warning(
            "%s: %d examples failed for a reason other than their data, e.g. %s (%s); rerun to retry them",
            spec.name,
            len(retried),
            *retried[0],
        )
    _barrier(f"evaluate {spec.name}")
    merge = partial(finish_split, store, spec, iterator.num_examples, settings)
    return on_process_0(f"merge {spec.name}", merge, iterator.process_index == 0)


def finish_split(store: ShardStore, spec: SplitSpec, num_examples: int, settings: dict | None = None) -> dict:
    """Merges the shards into `metrics.json` (+ `predictions.json` for RLE) and returns the metrics."""
    records = store.records()
    if len(records) != num_examples:
        raise EvaluationError(
            f"{spec.name}: {len(records)} of {num_examples} examples have predictions in {store.shards}; "
            "rerun to complete the missing ones"
        )
    unreadable = [r for r in records if r.get("unreadable")]
    records = [r for r in records if not r.get("unreadable")]
    if not records:
        kinds = sorted({(r.get("reason") or "unknown").split(":", 1)[0] for r in unreadable})
        raise EvaluationError(
            f"{spec.name}: none of its {num_examples} examples could be read ({', '.join(kinds)}; e.g. "
            f"{unreadable[0]['id']}: {unreadable[0].get('reason')}); fix the data, then delete "
            f"{store.directory} to retry them"
        )
    metrics = metrics_from_counts([r["intersection"] for r in records], [r["union"] for r in records])
    summary = {"split": spec.name, **(settings or {}), "metrics": metrics}
    if unreadable:
        log.warning(
            "%s: %d unreadable examples left out of the metrics: %s",
            spec.name,
            len(unreadable),
            [r["id"] for r in unreadable[:10]],
        )
        summary["unreadable"] = [r["id"] for r in unreadable]
    _write_atomic(store.directory / "metrics.json", json.dumps(summary, indent=1))
    if store.fmt == "rle":
        _write_atomic(store.directory / "predictions.json", json.dumps(records))
    log.info(
        "%s: %s", spec.name, " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    )
    return metrics


# Data config fields that do not change a prediction: where data lives and how fast it is read (moving
# the data must not invalidate finished shards), and what only training reads. The rest of `data`, the
# model and the frozen VAE's kind go into the digest of `prediction_config_digest`.
NON_PREDICTION_DATA_FIELDS = (
    "gen_sources",
    "seg_repeats",
    "gen_repeats",
    "train_split",
    "shuffle",
    "num_threads",
    "prefetch_buffer_size",
    "max_consecutive_skips",
    "captions",
    "refcoco.data_dir",
    "refcoco.exclude_eval_images",
    "reasonseg.root",
    "encoder.cache_dir",
    "encoder.device",
)


# The data config sections that say which examples a split is (its source's settings): each split's own
# digest covers them, the one an --out's splits share leaves them out.
SPLIT_SOURCE_DATA_FIELDS = ("seg_sources", "shapes", "reasonseg", "refcoco")


def prediction_config(config: ml_collections.ConfigDict, spec: SplitSpec | None = None) -> dict:
    """The fields of an experiment config that change `spec`'s predictions, as plain JSON data; with
    `spec` None those that change the predictions of every split (`SPLIT_SOURCE_DATA_FIELDS` left out).

    Weights are named by their folder, not their path (`encoders.model_name`): moving the converted VAE
    (`--config.vae_from`) or the Qwen weights to another machine or folder keeps finished shards."""
    from genmask_jax.encoders import model_name
    from genmask_jax.infer.checkpoint import as_json, vae_source

    data = as_json(config.data if spec is None else split_data_config(config.data, spec))
    left_out = NON_PREDICTION_DATA_FIELDS + (SPLIT_SOURCE_DATA_FIELDS if spec is None else ())
    for field in left_out:
        *parents, name = field.split(".")
        node = data
        for parent in parents:
            node = node.get(parent, {})
        node.pop(name, None)
    if "model_path" in data.get("encoder", {}):
        data["encoder"]["model_path"] = model_name(data["encoder"]["model_path"])
    vae = vae_source(config)
    if vae is not None and vae[0] == "converted":
        vae = ("converted", model_name(vae[1]))
    return {"model": as_json(config.model), "vae": as_json(vae), "data": data}


def prediction_config_digest(config: ml_collections.ConfigDict, spec: SplitSpec | None = None) -> str:
    text = json.dumps(prediction_config(config, spec), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def process_batch_size(batch_multiple: int, batch_size: int = 0) -> int:
    """The per-process batch `run` evaluates with: `batch_size`, 0 = 4 per batch shard of the mesh (4 per
    local device unless the mesh has a tensor axis), rounded up to a multiple of the `batch_multiple`
    batch shards."""
    batch_size = batch_size or 4 * batch_multiple
    return -(-batch_size // batch_multiple) * batch_multiple


def run(
    loaded,
    splits: Sequence[SplitSpec],
    out_dir: str | os.PathLike,
    num_steps: int = 1,
    fmt: str = "png",
    batch_size: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """Evaluates a loaded checkpoint (`infer.checkpoint.load`) on `splits`; returns {split: metrics}
    on process 0 and adds them to `out_dir/metrics.json`, each with the checkpoint, step and parameters
    beside its metrics. Refuses (EvaluationError) an `out_dir` whose run.json (or, without one, a split
    folder's) names another checkpoint, parameters, sampler settings or shared config (`check_out`), and
    under a multi-process launch one that the processes do not share (`check_shared_out`). Every process
    calls it; what process 0 does alone (merging a split, writing run.json or metrics.json) stops every
    process when it fails (`on_process_0`).

    batch_size: per process (`process_batch_size`).
    """
    from genmask_jax.infer.segmenter import Segmenter

    check_shared_out(out_dir)
    settings = shared_settings(
        loaded.directory, loaded.step, loaded.params_key, num_steps, seed, loaded.resolution
    )
    # Recorded only once a split's own check (its config digest included) has passed: a rerun that
    # differs in the config alone must not record itself in an --out written before <out>/run.json.
    check_out(out_dir, settings, loaded.config, record=False)
    segmenter = Segmenter(loaded, num_steps=num_steps, seed=seed)
    if not loaded.config.data.encoder.cache_dir:
        # Held over all splits: their pipelines share it (`encoders.make_encoder` keeps an encoder only
        # while someone holds it), else each split would load the VLM again.
        segmenter.encoder  # noqa: B018
    batch_size = process_batch_size(segmenter.batch_multiple, batch_size)
    results = {}
    for spec in splits:
        split_settings = {**settings, "config": prediction_config_digest(loaded.config, spec)}
        metrics = evaluate_split(
            segmenter.predict, loaded.config.data, spec, out_dir, batch_size, fmt, split_settings, progress
        )
        check_out(out_dir, settings, loaded.config)
        if metrics is not None:
            results[spec.name] = metrics
    path = epath.Path(out_dir) / "metrics.json"

    def summarize():
        merged = json.loads(path.read_text()) if path.exists() else {}
        source = {k: settings[k] for k in ("checkpoint", "step", "params")}
        merged.update({name: {**source, **metrics} for name, metrics in results.items()})
        _write_atomic(path, json.dumps(merged, indent=1))

    on_process_0(f"write {path}", summarize)
    return results
