"""The demo's report: the files written and the grids report.md links."""

import os

import numpy as np

from genmask_jax.eval import report

METRICS = {"giou": 0.5, "ciou": 0.5, "num_samples": 1, "precision@0.5": 1.0, "precision@0.9": 0.0}
REPORT = {
    "segmentation": METRICS,
    "baselines": {"empty_mask": METRICS},
    "eval_split": "test",
    "expression_kinds": "attribute",
    "resolution": [32, 32],
    "per_expression_kind": {"attribute": 0.5},
    "timing": {"total_s": 1.0},
}


def test_the_report_draws_and_links_only_the_grids_it_has(tmp_path):
    """`demo.num_grid=0` keeps no examples: the grid of none raised IndexError after metrics.json was
    written, and report.md linked a generated.png that `demo.num_generated=0` never wrote."""
    paths = report.write_report(str(tmp_path / "none"), REPORT, [], None)
    assert sorted(paths) == ["metrics.json", "report.md"]
    assert sorted(os.listdir(tmp_path / "none")) == ["metrics.json", "report.md"]
    assert ".png" not in (tmp_path / "none" / "report.md").read_text()

    image = np.full((32, 32, 3), 90, np.uint8)
    example = {
        "image": image,
        "mask": np.eye(32, dtype=bool),
        "pred": np.eye(32, dtype=bool),
        "text": "x",
        "iou": 1.0,
    }
    generated = (image[None], image[None], ["a caption"])
    paths = report.write_report(str(tmp_path / "both"), REPORT, [example], generated)
    grids = ["generated.png", "segmentation_grid.png"]
    assert sorted(paths) == sorted(["metrics.json", "report.md", *grids])
    assert all(os.path.isfile(paths[name]) for name in grids)
    markdown = (tmp_path / "both" / "report.md").read_text()
    assert markdown.endswith("![segmentations](segmentation_grid.png)\n\n![generated](generated.png)\n")

    paths = report.write_report(str(tmp_path / "segmentations"), REPORT, [example], None)
    markdown = (tmp_path / "segmentations" / "report.md").read_text()
    assert "generated.png" not in paths and "generated" not in markdown
