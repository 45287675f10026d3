"""The batch evaluation job: named splits -> per-example predictions at the original size + metrics.

Each process reads its own examples (`data.pipeline.make_eval_iterator`: every example exactly once
over all processes) and predicts them on its own devices. One evaluation batch is one *shard*:
`<out>/<dataset>-<split>/shards/shard-<first index>.json` lists, per example, the global index, id,
text, intersection and union at the original size (LISA's protocol, `eval/metrics.py`) and where its
prediction is (a PNG under `masks/`, or COCO RLE inline). A shard's JSON is written last and
atomically, so a shard exists only when complete; a rerun skips batches whose examples all have a
shard (resumable, whatever the batch size or process count of the earlier run). When every process is
done, process 0 merges the shards into `metrics.json` (and, for RLE, `predictions.json`).
"""

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from genmask_jax.data import preprocess
from genmask_jax.data.pipeline import make_eval_iterator
from genmask_jax.eval.metrics import intersection_and_union, metrics_from_counts, per_sample_iou

log = logging.getLogger(__name__)

# Dataset name -> (segmentation source, RefCOCO config or None, its splits).
DATASETS = {
    "synthetic": ("shapes", None, ("val", "test")),
    "refcoco_unc": ("refcoco", "refcoco_unc", ("val", "testA", "testB")),
    "refcocoplus_unc": ("refcoco", "refcocoplus_unc", ("val", "testA", "testB")),
    "refcocog_umd": ("refcoco", "refcocog_umd", ("val", "test")),
    "reasonseg": ("reasonseg", None, ("val", "test")),
}
FORMATS = ("png", "rle")


class EvaluationError(ValueError):
    """Bad evaluation input (unknown split, an output folder of a different run): one line for the user."""


# eval batch -> bool masks (B, h, w) at the model resolution; may return an unfinished jax.Array (the job
# converts it only after dispatching the next batch, so the device and the host work overlap).
PredictFn = Callable[[dict], Any]


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    dataset: str
    split: str

    @property
    def name(self) -> str:
        return f"{self.dataset}:{self.split}"

    @property
    def dirname(self) -> str:
        return f"{self.dataset}-{self.split}"


def parse_splits(text: str | Sequence[str]) -> list[SplitSpec]:
    """`"refcoco_unc:testA,reasonseg:val"` -> SplitSpecs; unknown names raise ValueError listing the known."""
    items = text.split(",") if isinstance(text, str) else list(text)
    specs = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        dataset, _, split = item.partition(":")
        if dataset not in DATASETS:
            raise EvaluationError(
                f"unknown dataset {dataset!r} in split {item!r}; known: {', '.join(DATASETS)}"
            )
        splits = DATASETS[dataset][2]
        if split not in splits:
            raise EvaluationError(
                f"split {item!r}: {dataset} has splits {', '.join(splits)} (write {dataset}:NAME)"
            )
        specs.append(SplitSpec(dataset, split))
    if not specs:
        raise EvaluationError(
            "no split given; e.g. --split=synthetic:test or --split=refcoco_unc:testA,refcoco_unc:testB"
        )
    return specs


def split_data_config(data_config: ml_collections.ConfigDict, spec: SplitSpec) -> ml_collections.ConfigDict:
    """A copy of the data config reading `spec`'s source."""
    config = ml_collections.ConfigDict(data_config.to_dict())
    source, refcoco_name, _ = DATASETS[spec.dataset]
    config.seg_sources = source
    if refcoco_name is not None:
        config.refcoco.name = refcoco_name
    return config


def check_sources(data_config: ml_collections.ConfigDict, specs: Sequence[SplitSpec]) -> None:
    """Opens every split's source (cheap: no decoding), so a missing data set fails before any model
    is loaded; raises the source's own error (FileNotFoundError with what to prepare)."""
    from genmask_jax.data.sources import make_task_source

    for spec in specs:
        config = split_data_config(data_config, spec)
        source = make_task_source(config.seg_sources, spec.split, config, "seg")
        if len(source) == 0:
            raise EvaluationError(f"{spec.name} has no examples")


def encode_rle(mask: np.ndarray) -> dict:
    """bool `(H, W)` -> COCO RLE {"size": [H, W], "counts": str}."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def _write_atomic(path: epath.Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{jax.process_index()}"
    tmp.write_text(text)
    tmp.replace(path)


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
        """Every finished example's record, one per global index, sorted by index."""
        by_index = {}
        for path in self.shard_files():
            for record in json.loads(path.read_text()):
                by_index[int(record["index"])] = record
        return [by_index[i] for i in sorted(by_index)]

    def done_indices(self) -> set[int]:
        return {int(r["index"]) for r in self.records()}

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
        path = self.shards / f"shard-{min(r['index'] for r in records):09d}.json"
        _write_atomic(path, json.dumps(records))
        return path


def check_settings(directory: epath.Path, settings: dict) -> None:
    """Refuses to mix results of different runs (checkpoint, steps, seed, ...) in one output folder."""
    path = directory / "run.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise EvaluationError(
                f"{directory} holds results of a different evaluation (differs in {', '.join(changed)}); "
                "use another --out or delete it"
            )
    elif jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(settings, indent=1, sort_keys=True))


def _batch_indices(iterator, step: int) -> list[int]:
    rows = (iterator.global_index(step, r) for r in range(iterator.batch_size))
    return [i for i in rows if i < iterator.num_examples]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_records(
    masks, batch: dict, metas: list, num_examples: int, example_id=str
) -> tuple[list[dict], list[np.ndarray | None]]:
    """Maps each valid row's predicted mask back to its image's original size and scores it.

    Rows of examples that could not be read (no meta, an index inside the split) become records
    marked "unreadable" (so a rerun does not retry them forever); padding rows are dropped.
    """
    masks = np.asarray(masks)
    records, originals = [], []
    for row, meta in enumerate(metas):
        index = int(batch["index"][row])
        if meta is None:
            if 0 <= index < num_examples:
                records.append({"index": index, "id": example_id(index), "unreadable": True})
                originals.append(None)
            continue
        pred = preprocess.unfit_mask(masks[row].astype(bool), meta["geometry"])
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
    return records, originals


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
      predict: eval batch (interfaces.md) -> bool masks `(B, h, w)` at the model resolution.
      data_config: the experiment's data config (the split's source is set from `spec`).
      out_dir: results go to `out_dir/<dataset>-<split>/`.
      batch_size: per-process batch size.
      settings: what identifies this evaluation (checkpoint, steps, ...); a rerun must match it.
    """
    from tqdm import tqdm

    store = ShardStore(epath.Path(out_dir) / spec.dirname, fmt)
    check_settings(store.directory, {"split": spec.name, "format": fmt, **(settings or {})})
    iterator = make_eval_iterator(
        split_data_config(data_config, spec),
        spec.split,
        batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    done = store.done_indices()
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

    def example_id(index: int) -> str:
        try:
            return str(iterator.source.example_id(index))
        except Exception:  # noqa: BLE001  (the id only labels an unreadable example)
            return f"<index {index}>"

    def finish(batch, metas, masks):
        records, originals = to_records(masks, batch, metas, iterator.num_examples, example_id)
        if records:
            store.write(records, originals)
        bar.update(1)

    pending = None
    for batch, metas in iterator.iter_with_meta(todo):
        masks = predict(batch)
        if pending is not None:
            finish(*pending)
        pending = (batch, metas, masks)
    if pending is not None:
        finish(*pending)
    bar.close()
    _barrier(f"evaluate {spec.name}")
    if iterator.process_index != 0:
        return None
    return finish_split(store, spec, iterator.num_examples, settings)


def finish_split(store: ShardStore, spec: SplitSpec, num_examples: int, settings: dict | None = None) -> dict:
    """Merges the shards into `metrics.json` (+ `predictions.json` for RLE) and returns the metrics."""
    records = store.records()
    if len(records) != num_examples:
        raise RuntimeError(
            f"{spec.name}: {len(records)} of {num_examples} examples have predictions in {store.shards}; "
            "rerun to complete the missing shards"
        )
    unreadable = [r["id"] for r in records if r.get("unreadable")]
    records = [r for r in records if not r.get("unreadable")]
    metrics = metrics_from_counts([r["intersection"] for r in records], [r["union"] for r in records])
    summary = {"split": spec.name, **(settings or {}), "metrics": metrics}
    if unreadable:
        log.warning(
            "%s: %d unreadable examples left out of the metrics: %s",
            spec.name,
            len(unreadable),
            unreadable[:10],
        )
        summary["unreadable"] = unreadable
    _write_atomic(store.directory / "metrics.json", json.dumps(summary, indent=1))
    if store.fmt == "rle":
        _write_atomic(store.directory / "predictions.json", json.dumps(records))
    log.info(
        "%s: %s", spec.name, " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    )
    return metrics


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
    on process 0 and writes `out_dir/metrics.json` with all of them.

    batch_size: per process; 0 = 4 per local device. Rounded up to a multiple of the batch shards.
    """
    from genmask_jax.infer.segmenter import Segmenter

    segmenter = Segmenter(loaded, num_steps=num_steps, seed=seed)
    multiple = segmenter.batch_multiple
    batch_size = batch_size or 4 * multiple
    batch_size = -(-batch_size // multiple) * multiple
    settings = {
        "checkpoint": str(loaded.directory),
        "step": loaded.step,
        "num_steps": num_steps,
        "seed": seed,
        "resolution": list(loaded.resolution),
    }
    results = {}
    for spec in splits:
        metrics = evaluate_split(
            segmenter.predict, loaded.config.data, spec, out_dir, batch_size, fmt, settings, progress
        )
        if metrics is not None:
            results[spec.name] = metrics
    if jax.process_index() == 0:
        out = epath.Path(out_dir)
        path = out / "metrics.json"
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged.update(results)
        _write_atomic(path, json.dumps(merged, indent=1))
    return results
