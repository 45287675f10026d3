"""Random-access example sources and the registry that builds them from the data config.

A source has `__len__`, `example_id(index) -> str` (cheap, no decoding) and `__getitem__(index) -> dict`
with keys `id` (str, unique across sources and tasks: it keys the embedding cache), `image` uint8
`(H, W, 3)`, `text` (the instruction for segmentation, the caption for generation) and, for
segmentation, `mask` uint8 `(H, W)` in {0, 1} and optionally `ignore` bool `(H, W)`. Reading may raise on
bad input; the pipelines turn that into a logged, counted skip.

Names (`data.seg_sources` / `data.gen_sources`, comma separated):
  seg: `shapes`, `reasonseg`, `refcoco` (the TFDS configs named by `data.refcoco.name`; with
       `data.refcoco.exclude_eval_images` their `data.train_split` leaves out the COCO images of every
       listed config's other splits)
  gen: `shapes` (scene captions), `captions` (folder or JSONL at `data.captions.path`),
       `tfds_captions` (a locally prepared TFDS image-caption set, `data.captions.tfds_name`)
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

SEG_SOURCES = ("shapes", "reasonseg", "refcoco")
GEN_SOURCES = ("shapes", "captions", "tfds_captions")

log = logging.getLogger(__name__)


class DataConfigError(ValueError):
    """A data config the pipelines cannot read as given: a name that is no source, a malformed field."""


def max_consecutive_skips(data_config) -> int:
    """`data.max_consecutive_skips`, the reads in a row that may fail before a source is an error; one
    `DataConfigError` line below 1 (no read could succeed)."""
    value = data_config.max_consecutive_skips
    if value < 1:
        raise DataConfigError(f"data.max_consecutive_skips must be >= 1 (1: stop at the first bad example), "
                              f"got {value!r}")
    return value


class ConcatSource:
    """Several sources read as one (indices run through them in order)."""

    def __init__(self, sources: Sequence):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self.sources = list(sources)
        self._starts = [0]
        for s in self.sources:
            self._starts.append(self._starts[-1] + len(s))

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = bisect.bisect_right(self._starts, index) - 1
        return self.sources[k], index - self._starts[k]

    def example_id(self, index: int) -> str:
        source, local = self._locate(index)
        return source.example_id(local)

    def __getitem__(self, index: int) -> dict:
        source, local = self._locate(index)
        return source[local]


def data_set_span(source, index: int) -> tuple[int, int]:
    """(start, length) of the data set that holds example `index` of `source`: the concatenated source it
    is in (nested ConcatSources included), else the whole of `source`."""
    if not isinstance(source, ConcatSource):
        return 0, len(source)
    part, local = source._locate(index)
    offset = index - local
    start, length = data_set_span(part, local)
    return offset + start, length


def parse_names(names: str | Sequence[str]) -> list[str]:
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n.strip()]


def make_source(name: str, split: str, data_config, task: str):
    """One source by name for `task` ("seg" | "gen") and `split`."""
    valid = SEG_SOURCES if task == "seg" else GEN_SOURCES
    if name not in valid:
        raise DataConfigError(f"data.{task}_sources: unknown {task} source {name!r}; expected one of {valid}")
    if name == "shapes":
        from genmask_jax.data.shapes import SyntheticShapes

        c = data_config.shapes
        sizes = {"train": c.train_size, "val": c.val_size, "validation": c.val_size, "test": c.test_size}
        try:
            return SyntheticShapes(
                split,
                resolution=tuple(c.render_resolution or data_config.resolution),
                seed=c.seed,
                num_examples=sizes.get(split),
                min_shapes=c.min_shapes,
                max_shapes=c.max_shapes,
                task=task,
                expression_kinds=c.expression_kinds,
            )
        except ValueError as e:  # settings that give no scene, an unknown expression kind
            raise DataConfigError(f"data.shapes: {e}") from e
    if name == "reasonseg":
        from genmask_jax.data.reasonseg import ReasonSeg

        c = data_config.reasonseg
        return ReasonSeg(
            c.root,
            split,
            all_texts=(split == data_config.train_split or c.eval_all_texts),
            use_templates=c.use_templates,
        )
    if name == "refcoco":
        from genmask_jax.data.refcoco import RefCocoSource, eval_image_ids

        c = data_config.refcoco
        # Several prepared configs (e.g. "refcoco_unc,refcocoplus_unc,refcocog_umd") train as one source.
        names = parse_names(c.name)
        exclude = c.get("exclude_eval_images", False) and split == data_config.train_split
        excluded = eval_image_ids(names, split, c.data_dir) if exclude else frozenset()
        parts = [RefCocoSource(n, split, data_dir=c.data_dir, exclude_image_ids=excluded) for n in names]
        if exclude:
            log.info(
                "exclude_eval_images: %d %s expressions of %s left out, %d kept (%d val/test COCO images)",
                sum(p.num_excluded for p in parts),
                split,
                ",".join(names),
                sum(len(p) for p in parts),
                len(excluded),
            )
        return parts[0] if len(parts) == 1 else ConcatSource(parts)
    if name == "captions":
        from genmask_jax.data.captions import CaptionFiles

        return CaptionFiles(data_config.captions.path, split=split)
    if name == "tfds_captions":
        from genmask_jax.data.captions import TfdsCaptions

        c = data_config.captions
        return TfdsCaptions(
            c.tfds_name,
            split=c.tfds_split if split == "train" else split,
            data_dir=c.tfds_data_dir or None,
            image_key=c.image_key,
            caption_key=c.caption_key,
        )
    raise AssertionError(name)


def make_task_source(names: str | Sequence[str], split: str, data_config, task: str):
    sources = [make_source(n, split, data_config, task) for n in parse_names(names)]
    if not sources:
        return None
    return sources[0] if len(sources) == 1 else ConcatSource(sources)
