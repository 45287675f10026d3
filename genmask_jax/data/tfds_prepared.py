"""Is a TFDS data set prepared in a data_dir, in a format `tfds.data_source` reads? Checked from its files
before TFDS opens it: TFDS's own errors for a missing set mislead (a registered builder with nothing
prepared reports the TFRecord format as unsupported, an unregistered one lists every data set it knows).

TFDS's layout: `<data_dir>/<builder>[/<config>]/<version>/dataset_info.json`, whose `fileFormat` is
absent for TFRecord files; a copy in another format made by `tfds convert_format` is listed under
`alternativeFileFormats`, and `tfds.data_source` reads that copy.
"""

from __future__ import annotations

import json

from etils import epath

from genmask_jax.data.sources import DataConfigError

RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def parse_name(tfds_name: str) -> tuple[str, str | None, str | None]:
    """`"builder[/config][:version]"` -> (builder, config or None, version or None; None for a pattern)."""
    name, _, version = tfds_name.partition(":")
    builder, _, config = name.partition("/")
    return builder, config or None, (version if version and "*" not in version else None)


def data_dirs(data_dir: str | None) -> list[epath.Path]:
    """The folders TFDS searches: `data_dir`, else its registered and default ones."""
    from tensorflow_datasets.core.utils import file_utils

    return [epath.Path(d) for d in file_utils.list_data_dirs(data_dir or None)]


def prepared_infos(tfds_name: str, data_dir: str | None) -> list[epath.Path]:
    """The dataset_info.json files of `tfds_name`'s prepared versions. Without a config in the name, the
    builder's folder and its config folders both count (a builder may have a default config)."""
    builder, config, version = parse_name(tfds_name)
    pattern = f"{version or '*'}/dataset_info.json"
    found = []
    for root in data_dirs(data_dir):
        folder = root / builder
        if config is not None:
            found += folder.joinpath(config).glob(pattern) if folder.joinpath(config).is_dir() else []
        elif folder.is_dir():
            found += [*folder.glob(pattern), *folder.glob(f"*/{pattern}")]
    return sorted(found)


def check_prepared(tfds_name: str, data_dir: str | None, how: str, split: str | None = None) -> None:
    """Raises FileNotFoundError `no prepared <tfds_name> in <data_dir>: <how>` when no version of it is
    prepared there, or when every prepared version is in a format that `tfds.data_source` cannot read;
    ValueError naming the prepared splits when `split` (`val`, `testA[:10%]`, `a+b`) asks for another.

    how: what to run to prepare it."""
    where = data_dir or " or ".join(str(d) for d in data_dirs(None))
    infos = prepared_infos(tfds_name, data_dir)
    if not infos:
        raise FileNotFoundError(f"no prepared {tfds_name} in {where} (no dataset_info.json): {how}")
    formats, splits = set(), set()
    for path in infos:  # `tfds convert_format` keeps the main format and lists its copy as alternative
        info = json.loads(path.read_text())
        formats |= {info.get("fileFormat") or "tfrecord", *info.get("alternativeFileFormats", [])}
        splits |= {entry["name"] for entry in info.get("splits", [])}
    if not formats & set(RANDOM_ACCESS_FORMATS):
        raise FileNotFoundError(
            f"{tfds_name} in {where} is prepared as {', '.join(sorted(formats))}; random access needs "
            f"{' or '.join(RANDOM_ACCESS_FORMATS)}: {how}"
        )
    requested = [part.split("[")[0].strip() for part in (split or "").split("+") if part.strip()]
    missing = [name for name in requested if name not in splits]
    if splits and missing:
        raise DataConfigError(
            f"{tfds_name} in {data_dir or 'the TFDS data dirs'} has no split {missing[0]!r}; "
            f"its prepared splits are {', '.join(sorted(splits))}"
        )
