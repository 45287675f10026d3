"""The named evaluation splits (`refcoco_unc:testA`, `reasonseg:val`, ...) and the data config that reads
each: one table for every consumer (the evaluation job, the embedding-cache precompute, the pipelines'
messages), so a split is read the same way by the job that evaluates it and the job that caches it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections

from genmask_jax.data.sources import parse_names

# Dataset name -> (segmentation source, RefCOCO config or None, its splits).
DATASETS = {
    "synthetic": ("shapes", None, ("val", "test")),
    "refcoco_unc": ("refcoco", "refcoco_unc", ("val", "testA", "testB")),
    "refcocoplus_unc": ("refcoco", "refcocoplus_unc", ("val", "testA", "testB")),
    "refcocog_umd": ("refcoco", "refcocog_umd", ("val", "test")),
    "refcocog_google": ("refcoco", "refcocog_google", ("val",)),  # Google's split has no test
    "reasonseg": ("reasonseg", None, ("val", "test")),
}
BIG_VISION_REFCOCO = "ref_coco_bv/"


class SplitError(ValueError):
    """An unknown dataset or split name: one line for the user."""


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
    """`"refcoco_unc:testA,reasonseg:val"` (or a list of such strings, as a repeated flag gives) ->
    SplitSpecs, each once; unknown names raise SplitError listing the known."""
    items = [text] if isinstance(text, str) else list(text)
    specs = []
    for item in (s.strip() for i in items for s in i.split(",")):
        if not item:
            continue
        dataset, _, split = item.partition(":")
        if dataset not in DATASETS:
            raise SplitError(f"unknown dataset {dataset!r} in split {item!r}; known: {', '.join(DATASETS)}")
        splits = DATASETS[dataset][2]
        if split not in splits:
            raise SplitError(
                f"split {item!r}: {dataset} has splits {', '.join(splits)} (write {dataset}:NAME)"
            )
        if SplitSpec(dataset, split) not in specs:
            specs.append(SplitSpec(dataset, split))
    if not specs:
        raise SplitError("no split given; e.g. synthetic:test or refcoco_unc:testA,refcoco_unc:testB")
    return specs


def refcoco_config(name: str) -> str:
    """The RefCOCO config of a source name: "ref_coco_bv/refcoco_unc:1.0.0" -> "refcoco_unc"."""
    return name.removeprefix(BIG_VISION_REFCOCO).split(":")[0]


def refcoco_source_name(configured: str, config: str) -> str:
    """The RefCOCO source to open for `config` (e.g. "refcoco_unc") given the configured name(s): the
    configured entry of that config as written (big_vision's `ref_coco_bv/refcoco_unc[:version]`
    included), else big_vision's builder when the configured names use it, else ours."""
    names = parse_names(configured)
    for name in names:
        if refcoco_config(name) == config:
            return name
    if any(name.startswith(BIG_VISION_REFCOCO) for name in names):
        return BIG_VISION_REFCOCO + config
    return config


def split_data_config(data_config: ml_collections.ConfigDict, spec: SplitSpec) -> ml_collections.ConfigDict:
    """A copy of the data config reading `spec`'s source."""
    config = ml_collections.ConfigDict(data_config.to_dict())
    source, refcoco, _ = DATASETS[spec.dataset]
    config.seg_sources = source
    if refcoco is not None:
        config.refcoco.name = refcoco_source_name(config.refcoco.name, refcoco)
    return config


def dataset_of(data_config) -> str | None:
    """The DATASETS name whose `split_data_config` reads the segmentation source of `data_config`, or
    None when it reads several (or one no dataset names)."""
    sources = parse_names(data_config.seg_sources)
    if len(sources) != 1:
        return None
    wanted = None
    if sources[0] == "refcoco":
        configs = {refcoco_config(n) for n in parse_names(data_config.refcoco.name)}
        if len(configs) != 1:
            return None
        wanted = configs.pop()
    return next((d for d, (s, r, _) in DATASETS.items() if (s, r) == (sources[0], wanted)), None)


def precompute_selection(data_config, split: str, task: str = "seg") -> str:
    """The `genmask_jax.encoders.precompute` flag that caches `split` of `data_config`'s `task` sources:
    `--eval=<dataset>:<split>` for an evaluation split of one named data set (planned exactly as the
    evaluation job reads it), else `--splits=<split>` (the training split, or that split of every
    configured source that has it)."""
    evaluation = task == "seg" and split != data_config.train_split
    dataset = dataset_of(data_config) if evaluation else None
    if dataset is not None and split in DATASETS[dataset][2]:
        return f"--eval={dataset}:{split}"
    return f"--splits={split}"
