r"""Prepares data sets from what users download, without TensorFlow.

  python -m genmask_jax.data.prepare refcoco --refer-dir REFER --coco-images COCO/train2014 --out DATA_DIR \
      [--configs refcoco_unc,refcocoplus_unc,refcocog_umd,refcocog_google] [--overwrite]

writes `DATA_DIR/ref_coco_seg/<config>/1.0.0/*.array_record-*` (read with `tfds.data_source` or
`data.refcoco.{name,data_dir}`), the COCO image id of each record (`genmask_image_ids.json`, read by
`data.refcoco.exclude_eval_images`) and the skip summary (`genmask_prepare.json`), checks each split's
expression count against the published counts and exits with status 1 when one differs (unless
--no-count-check); skips are counted in expressions, so published - prepared = skipped. A read error that
may pass (`skips.transient`: EIO, a stale NFS handle, ...) stops it, keeping nothing of that config: run it
again. Each expression's record holds its image's JPEG (all four configs: about 75 GB), so
the free space of DATA_DIR is checked first. COCO's train2017/ folder works too. A config already prepared
in DATA_DIR is reused, with the skip summary of its preparation, unless --overwrite.

  python -m genmask_jax.data.prepare refcoco-index --data-dir DATA_DIR --names ref_coco_bv/refcoco_unc,...

writes only that image-id index, for big_vision's `ref_coco_bv` or sets prepared before it existed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys

from etils import epath

from genmask_jax.data.skips import transient

log = logging.getLogger("genmask_jax.data.prepare")

# Beside a preparation's dataset_info.json: {"skips": summary line, "skip_counts": {kind: n}}, reported
# again when a later run reuses that preparation.
PREPARE_REPORT_FILE = "genmask_prepare.json"


def reused_summary(report_path: epath.Path, name: str) -> str:
    """The skip summary of the preparation in `report_path`'s folder, from its `PREPARE_REPORT_FILE`,
    marked as reused; `name` is the skip log's name."""
    reused = f"reused {report_path.parent}; --overwrite prepares it again"
    if not report_path.exists():
        return f"{name}: skips unknown (prepared before {PREPARE_REPORT_FILE} was written); {reused}"
    return f"{json.loads(report_path.read_text())['skips']} when prepared; {reused}"


def prepare_refcoco(refer_dir: str, coco_images: str, out: str, config: str, overwrite: bool = False) -> dict:
    """Prepares one config; an earlier preparation in `out` is reused (with its skip summary, logged as
    such) unless `overwrite`.

    Returns {"counts": {split: n}, "skips": summary line, "report": [lines], "ok": counts match,
    "index": path of the image-id index, "reused": whether an earlier preparation was reused}.
    """
    import tensorflow_datasets as tfds

    from genmask_jax.data.refcoco import (
        RefCocoSeg,
        check_published_counts,
        check_refer_inputs,
        write_image_index,
    )

    check_refer_inputs(refer_dir, coco_images, config)  # TFDS makes its folders before it reads them
    builder = RefCocoSeg(
        config=config, data_dir=out, file_format="array_record", refer_dir=refer_dir, coco_images=coco_images
    )
    reused = builder.data_path.exists() and not overwrite  # TFDS's own test for reusing
    mode = tfds.download.GenerateMode
    download_config = tfds.download.DownloadConfig(
        beam_runner=None,
        download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS,
    )
    try:
        builder.download_and_prepare(download_config=download_config)
    except AssertionError as e:  # TFDS refuses a split that yields nothing: say why, in one line
        if "No examples were yielded" not in str(e):
            raise
        raise ValueError(
            f"{config}: no example of a split could be prepared ({e}); {builder.skips.summary()}"
        ) from e
    report_path = epath.Path(builder.data_dir) / PREPARE_REPORT_FILE
    if reused:
        summary = reused_summary(report_path, builder.skips.name)
        log.warning(
            "%s is already prepared in %s: reused as it is, nothing read from --refer-dir or "
            "--coco-images; to prepare it again (e.g. after fixing the inputs) pass --overwrite",
            config,
            builder.data_dir,
        )
    else:
        summary = builder.skips.summary()
        report_path.write_text(json.dumps({"skips": summary, "skip_counts": dict(builder.skips.counts)}))
    index = write_image_index(config, out, keep_current=reused)  # a reused set's index: not read again
    counts = {name: split.num_examples for name, split in builder.info.splits.items()}
    report = check_published_counts(config, counts)
    log.info("%s", summary)
    ok = not any(line.startswith("MISMATCH") for line in report)
    for line in report:
        (log.info if not line.startswith("MISMATCH") else log.error)("%s", line)
    if not ok:
        banner = "=" * 100
        log.error(
            "%s\n%s: prepared expression counts differ from the published ones (see above); %s\n%s",
            banner,
            config,
            summary,
            banner,
        )
    return {"counts": counts, "skips": summary, "report": report, "ok": ok, "index": index, "reused": reused}


def _prepared_path(out: str, config: str) -> epath.Path:
    from genmask_jax.data.refcoco import RefCocoSeg

    return epath.Path(out) / RefCocoSeg.name / config / str(RefCocoSeg.VERSION)


def _local_bytes(folder: epath.Path) -> int:
    """The bytes of the files under a local `folder` (0 for a remote one: its space is not checked)."""
    if "://" in str(folder):
        return 0
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def check_free_space(out: str, needed: int) -> None:
    """Raises ValueError when the file system of a local `out` has less than `needed` bytes free (TFDS
    would fill it hours in); logs the estimate. Remote paths (gs://) are not checked."""
    if needed <= 0:
        return
    log.info("the prepared sets take about %.1f GB in %s", needed / 1e9, out)
    if "://" in out:
        return
    existing = os.path.abspath(out)
    while not os.path.exists(existing):  # the nearest folder that exists holds the file system
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ValueError(
            f"the prepared sets need about {needed / 1e9:.1f} GB (every expression's record holds its "
            f"image's JPEG) and {existing} has {free / 1e9:.1f} GB free: free space, choose another --out "
            "or prepare fewer --configs at a time"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m genmask_jax.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="dataset", required=True)
    ref = sub.add_parser("refcoco", help="RefCOCO / RefCOCO+ / RefCOCOg from the REFER files and COCO images")
    ref.add_argument("--refer-dir", required=True, help="folder holding refcoco/, refcoco+/, refcocog/")
    ref.add_argument("--coco-images", required=True, help="COCO train2014/ image folder")
    ref.add_argument("--out", required=True, help="TFDS data_dir to write to")
    ref.add_argument("--configs", default="refcoco_unc,refcocoplus_unc,refcocog_umd,refcocog_google")
    ref.add_argument(
        "--no-count-check", action="store_true", help="do not fail on a published-count mismatch"
    )
    ref.add_argument(
        "--overwrite", action="store_true", help="prepare again a config already prepared in --out"
    )
    index = sub.add_parser(
        "refcoco-index", help="only the image-id index of prepared sets (ours or ref_coco_bv/<config>)"
    )
    index.add_argument("--data-dir", required=True, help="TFDS data_dir holding the prepared sets")
    index.add_argument("--names", required=True, help="comma-separated, as in data.refcoco.name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (FileNotFoundError, ValueError) as e:  # a missing or wrong input: one line, no traceback
        parser.exit(1, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
    except OSError as e:
        if not transient(e):
            raise
        parser.exit(1, f"{parser.prog}: error: {e} (an I/O error that may pass: run the command again)\n")


def _run(args) -> int:
    if args.dataset == "refcoco-index":
        from genmask_jax.data.refcoco import write_image_index

        for name in [n.strip() for n in args.names.split(",") if n.strip()]:
            print(write_image_index(name, args.data_dir))
        return 0
    from genmask_jax.data.refcoco import check_refer_inputs, prepared_bytes

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    needed = 0
    for config in configs:  # every config's inputs before anything is written
        refs, images = check_refer_inputs(args.refer_dir, args.coco_images, config)
        size = prepared_bytes(refs, images, args.coco_images)
        prepared = _prepared_path(args.out, config)
        if not prepared.exists():
            needed += size
        elif args.overwrite:  # TFDS deletes the earlier preparation before it writes
            needed += max(0, size - _local_bytes(prepared))
    check_free_space(args.out, needed)
    all_ok = True
    for config in configs:
        result = prepare_refcoco(args.refer_dir, args.coco_images, args.out, config, args.overwrite)
        all_ok &= result["ok"]
        print("\n".join(result["report"] + [result["skips"]]))
    return 0 if all_ok or args.no_count_check else 1


if __name__ == "__main__":
    sys.exit(main())
