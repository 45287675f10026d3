"""The demo's report: metrics JSON, a Markdown summary and PNG grids (segmentations, generated images)."""

import json
import os
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

TILE = 128  # pixels per image in the grids (64x64 inputs are shown at 2x, nearest).
TEXT_LINES = 3
LINE = 12


def _tile(array: np.ndarray) -> Image.Image:
    """uint8 `(H, W, 3)` or bool `(H, W)` -> a TILE x TILE RGB image."""
    if array.dtype == bool or array.ndim == 2:
        array = np.repeat((np.asarray(array) > 0).astype(np.uint8)[..., None] * 255, 3, axis=-1)
    return Image.fromarray(np.asarray(array, np.uint8)).resize((TILE, TILE), Image.NEAREST)


def _captioned_row(tiles: Sequence[np.ndarray], text: str, width_chars: int) -> Image.Image:
    h = TILE + TEXT_LINES * LINE + 6
    cell = Image.new("RGB", (len(tiles) * (TILE + 2), h), (255, 255, 255))
    for i, tile in enumerate(tiles):
        cell.paste(_tile(tile), (i * (TILE + 2), 0))
    draw = ImageDraw.Draw(cell)
    for j, line in enumerate(textwrap.wrap(text, width_chars)[:TEXT_LINES]):
        draw.text((2, TILE + 3 + j * LINE), line, fill=(0, 0, 0))
    return cell


def grid(cells: Sequence[Image.Image], columns: int, title: str = "") -> Image.Image:
    columns = max(1, min(columns, len(cells)))
    rows = -(-len(cells) // columns)
    cw, ch = cells[0].size
    top = 18 if title else 0
    out = Image.new("RGB", (columns * (cw + 8), top + rows * (ch + 8)), (255, 255, 255))
    if title:
        ImageDraw.Draw(out).text((4, 3), title, fill=(0, 0, 0))
    for k, cell in enumerate(cells):
        out.paste(cell, ((k % columns) * (cw + 8), top + (k // columns) * (ch + 8)))
    return out


def segmentation_grid(examples: Sequence[dict], columns: int = 4) -> Image.Image:
    """Each cell: test image | true mask | predicted mask, with the expression and the IoU below."""
    cells = [
        _captioned_row([e["image"], e["mask"], e["pred"]], f'"{e["text"]}"  IoU {e["iou"]:.2f}', 62)
        for e in examples
    ]
    return grid(cells, columns, "image | true mask | predicted mask (single step)")


def generation_grid(
    generated: np.ndarray, references: np.ndarray, captions: Sequence[str], columns: int = 4
) -> Image.Image:
    """Each cell: generated image | the test scene the caption came from, with the caption below."""
    cells = [_captioned_row([g, r], c, 40) for g, r, c in zip(generated, references, captions)]
    return grid(cells, columns, "generated from the caption | the scene it describes")


GRIDS = {"segmentation_grid.png": "segmentations", "generated.png": "generated"}  # file -> alt text


def summary_markdown(report: dict, grids: Sequence[str] = tuple(GRIDS)) -> str:
    """The report as Markdown, with a link to each of `grids` (the files of `GRIDS` written beside it)."""
    seg, base = report["segmentation"], report["baselines"]
    rows = [("GenMask, single step", seg)] + [(name, m) for name, m in base.items()]
    lines = [
        "# GenMask demo report",
        "",
        f"Held-out split `{report['eval_split']}`, {seg['num_samples']} referring expressions "
        f"({report['expression_kinds']}), {report['resolution'][0]}x{report['resolution'][1]} images.",
        "",
        "| predictor | gIoU | cIoU | P@0.5 | P@0.9 |",
        "|---|---|---|---|---|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['giou']:.4f} | {m['ciou']:.4f} | "
            f"{m['precision@0.5']:.3f} | {m['precision@0.9']:.3f} |"
        )
    lines += [
        "",
        "gIoU by expression kind: "
        + ", ".join(f"{k} {v:.4f}" for k, v in report["per_expression_kind"].items()),
        "",
    ]
    lines += [
        f"Wall time: {report['timing']['total_s']:.0f} s, process CPU time "
        f"{report['timing'].get('process_cpu_s', 0.0):.0f} s ("
        + ", ".join(
            f"{k} {v:.0f} s"
            for k, v in report["timing"].items()
            if k.endswith("_s") and k not in ("total_s", "process_cpu_s")
        )
        + ")."
    ]
    for name in grids:
        lines += ["", f"![{GRIDS[name]}]({name})"]
    return "\n".join([*lines, ""])


def write_report(workdir: str, report: dict, examples: Sequence[dict], generated=None) -> dict[str, str]:
    """Writes metrics.json, report.md, segmentation_grid.png (if there are `examples`) and generated.png
    (if given); report.md links the grids written.

    examples: the segmentations to draw (`segmentation_grid`), possibly none (`demo.num_grid=0`).
    generated: (images uint8 (N, H, W, 3), reference images uint8 (N, H, W, 3), captions) or None.
    Returns name -> path of the files written.
    """
    os.makedirs(workdir, exist_ok=True)
    grids = {}
    if len(examples):
        grids["segmentation_grid.png"] = segmentation_grid(examples)
    if generated is not None:
        grids["generated.png"] = generation_grid(*generated)
    paths = {name: os.path.join(workdir, name) for name in ("metrics.json", "report.md", *grids)}
    with open(paths["metrics.json"], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths["report.md"], "w") as f:
        f.write(summary_markdown(report, list(grids)))
    for name, image in grids.items():
        image.save(paths[name])
    return paths
