"""Synthetic referring shapes: the built-in demo data.

Each example is a scene of 2-5 flat coloured shapes on a softly shaded dark background, a referring
expression that picks out exactly one shape (by colour, shape, size, position or a relation to another
shape), that shape's mask, and a caption of the whole scene for the generation task.

Everything is a pure function of `(seed, split, index)` and the picture's aspect ratio: scenes are drawn
in normalised coordinates and rendered at any resolution, so the same example exists at 32x32 and at
512x512, or at 240x416 and 480x832. Relations are judged in pixels, so another aspect ratio can give
another scene (at every square size it is the same). The splits draw from disjoint random streams
(`numpy.random.default_rng([seed, split_code, index])`).

A relation ("the star left of the red circle") names the dominant axis of the target's pixel offset from
its anchor: the target lies at least RELATION_MARGIN in the named direction, and further in it than
across it. Every other shape the phrase could mean fails: its offset's dominant direction is not the
named one (a tie counts as not), or it lies less than RELATION_MARGIN / 3 in the named direction. So a
shape diagonal to the anchor fails even when it lies well on the named side.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (245, 220, 40),
    "purple": (170, 70, 220),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": (0.10, 0.12), "large": (0.17, 0.20)}
BACKGROUNDS = {
    "gray": (80, 80, 80),
    "brown": (85, 62, 45),
    "slate": (55, 68, 85),
    "olive": (70, 75, 45),
}
SPLIT_CODES = {"train": 0, "val": 1, "validation": 1, "test": 2}
DEFAULT_SIZES = {"train": 100_000, "val": 1_000, "validation": 1_000, "test": 1_000}

# Margins that make positional words unambiguous: the extreme shape must beat the runner-up by
# POSITION_MARGIN (in units of that axis's side); relations use RELATION_MARGIN as the module docstring
# says (in units of the picture's shorter side, the unit of `Shape.radius`).
POSITION_MARGIN = 0.12
RELATION_MARGIN = 0.15
SHAPE_GAP = 0.04


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float

    def polygon(self, height: int, width: int) -> list[tuple[float, float]]:
        """Outline in pixel coordinates (x, y) for a `height` x `width` image."""
        side = min(height, width)
        cx, cy, r = self.cx * width, self.cy * height, self.radius * side
        if self.kind == "circle":
            angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
            radii = np.full_like(angles, r)
        elif self.kind == "square":
            angles = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
            radii = np.full_like(angles, r)
        elif self.kind == "triangle":
            angles = -math.pi / 2 + np.array([0, 2, 4]) * math.pi / 3
            radii = np.full_like(angles, r * 1.15)
        elif self.kind == "star":
            angles = -math.pi / 2 + np.arange(10) * math.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, r * 1.15, r * 0.5)
        else:
            raise ValueError(f"unknown shape {self.kind!r}")
        return [(float(cx + q * math.cos(a)), float(cy + q * math.sin(a))) for a, q in zip(angles, radii)]

    def noun_phrase(self, with_size: bool = True) -> str:
        words = ([self.size] if with_size else []) + [self.colour, self.kind]
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str
    gradient: tuple[float, float, float]  # (direction in radians, amplitude, noise level)
    target: int
    expression: str
    expression_kind: str  # "attribute" | "position" | "relation"

    def caption(self) -> str:
        ordered = sorted(self.shapes, key=lambda s: s.cx)
        phrases = [f"a {s.noun_phrase()}" for s in ordered]
        listing = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        article = "an" if self.background[0] in "aeiou" else "a"
        return f"{listing} on {article} {self.background} background"


def _matches(shape: Shape, kind: str | None, colour: str | None, size: str | None) -> bool:
    return (
        (kind is None or shape.kind == kind)
        and (colour is None or shape.colour == colour)
        and (size is None or shape.size == size)
    )


def _describe(kind: str | None, colour: str | None, size: str | None) -> str:
    words = [w for w in (size, colour) if w] + [kind or "shape"]
    return " ".join(words)


def _attribute_expressions(shapes: tuple[Shape, ...], target: int) -> list[str]:
    t = shapes[target]
    out = []
    for use_size in (False, True):
        for use_colour in (False, True):
            for use_kind in (False, True):
                if not (use_colour or use_kind):
                    continue
                key = (
                    t.kind if use_kind else None,
                    t.colour if use_colour else None,
                    t.size if use_size else None,
                )
                if sum(_matches(s, *key) for s in shapes) == 1:
                    out.append(f"the {_describe(*key)}")
    return out


def _unique_descriptions(shapes: tuple[Shape, ...], index: int) -> list[tuple[str | None, str | None]]:
    """(kind, colour) pairs that pick out shapes[index] alone (anchors of relations)."""
    s = shapes[index]
    keys = [(s.kind, None), (None, s.colour), (s.kind, s.colour)]
    return [k for k in keys if sum(_matches(o, k[0], k[1], None) for o in shapes) == 1]


_POSITION_WORDS = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "lowest": (1, 1)}


def _position_expressions(shapes: tuple[Shape, ...], target: int) -> list[str]:
    t = shapes[target]
    out = []
    for key in ((t.kind, None), (None, t.colour), (None, None)):
        group = [s for s in shapes if _matches(s, key[0], key[1], None)]
        if len(group) < 2:
            continue
        for word, (axis, sign) in _POSITION_WORDS.items():
            coords = sorted(sign * (s.cx, s.cy)[axis] for s in group)
            if sign * (t.cx, t.cy)[axis] != coords[-1] or coords[-1] - coords[-2] < POSITION_MARGIN:
                continue
            out.append(f"the {word} {_describe(key[0], key[1], None)}")
    return out


_RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}


def picture_extent(height: int, width: int) -> tuple[float, float]:
    """(x, y) size of a `height` x `width` picture in units of its shorter side: (1.0, 1.0) if square."""
    side = min(height, width)
    return width / side, height / side


def _relation_strength(
    shape: Shape, anchor: Shape, axis: int, sign: int, extent: tuple[float, float] = (1.0, 1.0)
) -> float:
    """How far `shape` lies in the direction (axis, sign) of `anchor`, in units of the shorter side of a
    picture of `extent` (`picture_extent`); 0 unless mostly along that axis."""
    d = ((shape.cx - anchor.cx) * extent[0], (shape.cy - anchor.cy) * extent[1])
    along, across = sign * d[axis], abs(d[1 - axis])
    return along if along > across else 0.0


def _relation_expressions(
    shapes: tuple[Shape, ...], target: int, extent: tuple[float, float] = (1.0, 1.0)
) -> list[str]:
    t = shapes[target]
    out = []
    for a_index, anchor in enumerate(shapes):
        if a_index == target:
            continue
        anchor_keys = _unique_descriptions(shapes, a_index)
        if not anchor_keys:
            continue
        anchor_text = _describe(*anchor_keys[-1], None)
        for rel, (axis, sign) in _RELATIONS.items():
            if _relation_strength(t, anchor, axis, sign, extent) < RELATION_MARGIN:
                continue
            for key in ((t.kind, None), (None, t.colour), (None, None)):
                group = [
                    i for i, s in enumerate(shapes) if i != a_index and _matches(s, key[0], key[1], None)
                ]
                others = [shapes[i] for i in group if i != target]
                if all(
                    _relation_strength(o, anchor, axis, sign, extent) < RELATION_MARGIN / 3 for o in others
                ):
                    out.append(f"the {_describe(key[0], key[1], None)} {rel} the {anchor_text}")
                    break
    return out


def _sample_shapes(rng: np.random.Generator, num: int) -> tuple[Shape, ...] | None:
    shapes: list[Shape] = []
    for _ in range(num):
        for _attempt in range(50):
            size = str(rng.choice(list(SIZES)))
            radius = float(rng.uniform(*SIZES[size]))
            lo, hi = radius * 1.15 + 0.02, 1 - radius * 1.15 - 0.02
            cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
            if all(math.hypot(cx - s.cx, cy - s.cy) > 1.15 * (radius + s.radius) + SHAPE_GAP for s in shapes):
                kind = str(rng.choice(SHAPES))
                colour = str(rng.choice(list(COLOURS)))
                shapes.append(Shape(kind, colour, size, cx, cy, radius))
                break
        else:
            return None
    return tuple(shapes)


EXPRESSION_KINDS = ("attribute", "position", "relation")
# Draws of the first scene before a source calls its settings impossible (7 shapes fit 1 draw in 100, 8
# shapes 1 in 2,500); the scenes themselves are drawn until they fit.
MAX_SCENE_DRAWS = 10_000


def sample_scene(
    rng: np.random.Generator,
    min_shapes: int = 2,
    max_shapes: int = 5,
    expression_kinds: tuple[str, ...] = EXPRESSION_KINDS,
    extent: tuple[float, float] = (1.0, 1.0),
    max_draws: int | None = None,
) -> Scene:
    """Draws shapes until one of them has an unambiguous referring expression of an allowed kind in a
    picture of `extent` (`picture_extent` of the render's height and width). Raises ValueError after
    `max_draws` draws without one (None: no limit)."""
    for _ in itertools.count() if max_draws is None else range(max_draws):
        shapes = _sample_shapes(rng, int(rng.integers(min_shapes, max_shapes + 1)))
        if shapes is None:
            continue
        target = int(rng.integers(len(shapes)))
        candidates = {
            "attribute": _attribute_expressions(shapes, target),
            "position": _position_expressions(shapes, target),
            "relation": _relation_expressions(shapes, target, extent),
        }
        kinds = [k for k, v in candidates.items() if v and k in expression_kinds]
        if not kinds:
            continue
        kind = str(rng.choice(kinds))
        expression = str(rng.choice(candidates[kind]))
        background = str(rng.choice(list(BACKGROUNDS)))
        gradient = (float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(5, 25)), float(rng.uniform(0, 6)))
        return Scene(shapes, background, gradient, target, expression, kind)
    raise ValueError(
        f"no scene of {min_shapes} to {max_shapes} shapes with an expression of kind "
        f"{', '.join(expression_kinds)} in {max_draws} draws: data.shapes settings that (almost) never "
        "give one (more than 7 shapes rarely fit a picture)"
    )


def render_scene(scene: Scene, height: int, width: int, noise_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns image uint8 `(H, W, 3)` and target mask uint8 `(H, W)` in {0, 1}."""
    direction, amplitude, noise = scene.gradient
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = np.cos(direction) * (xs / max(width - 1, 1) - 0.5) + np.sin(direction) * (
        ys / max(height - 1, 1) - 0.5
    )
    base = np.asarray(BACKGROUNDS[scene.background], np.float32)
    noise_field = np.random.default_rng(noise_seed).normal(0, noise, (height, width, 1)).astype(np.float32)
    background = base + amplitude * ramp[..., None] + noise_field
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    mask = Image.new("L", (width, height), 0)
    for i, s in enumerate(scene.shapes):
        polygon = s.polygon(height, width)
        draw.polygon(polygon, fill=COLOURS[s.colour])
        if i == scene.target:
            ImageDraw.Draw(mask).polygon(polygon, fill=1)
    return np.asarray(canvas), np.asarray(mask)


class SyntheticShapes:
    """Random-access source of referring-shapes examples.

    `source[i]` -> dict(id str, image uint8 (H, W, 3), mask uint8 (H, W), text str, caption str,
    expression_kind str). `task="seg"` uses the referring expression as text, `task="gen"` the caption.
    """

    def __init__(
        self,
        split: str = "train",
        resolution: tuple[int, int] | int = 64,
        seed: int = 0,
        num_examples: int | None = None,
        min_shapes: int = 2,
        max_shapes: int = 5,
        task: str = "seg",
        expression_kinds: tuple[str, ...] | str = EXPRESSION_KINDS,
    ):
        if split not in SPLIT_CODES:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
        if not 1 <= min_shapes <= max_shapes:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
        self.split = split
        self.resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.seed = seed
        self.num_examples = DEFAULT_SIZES[split] if num_examples is None else int(num_examples)
        self.min_shapes, self.max_shapes = min_shapes, max_shapes
        self.task = task
        if isinstance(expression_kinds, str):
            expression_kinds = tuple(k.strip() for k in expression_kinds.split(",") if k.strip())
        unknown = set(expression_kinds) - set(EXPRESSION_KINDS)
        if unknown or not expression_kinds:
            raise ValueError(
                f"expression_kinds must be a non-empty subset of {EXPRESSION_KINDS}, got {expression_kinds}"
            )
        self.expression_kinds = tuple(expression_kinds)
        if max_shapes == 1 and "attribute" not in self.expression_kinds:
            raise ValueError(
                f"expression_kinds {','.join(self.expression_kinds)} need two shapes or more: max_shapes is 1"
            )
        self.scene(0, MAX_SCENE_DRAWS)  # settings that give no scene fail here, not hang a data loader

    def __len__(self) -> int:
        return self.num_examples

    def example_id(self, index: int) -> str:
        suffix = "" if self.task == "seg" else "-caption"
        return f"shapes-{self.seed}-{self.split}-{index}{suffix}"

    def scene(self, index: int, max_draws: int | None = None) -> Scene:
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], index])
        extent = picture_extent(*self.resolution)
        return sample_scene(rng, self.min_shapes, self.max_shapes, self.expression_kinds, extent, max_draws)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        scene = self.scene(index)
        noise_seed = int(
            np.random.default_rng([self.seed, SPLIT_CODES[self.split], index, 1]).integers(2**32)
        )
        image, mask = render_scene(scene, *self.resolution, noise_seed=noise_seed)
        caption = scene.caption()
        return {
            "id": self.example_id(index),
            "image": image,
            "mask": mask,
            "text": scene.expression if self.task == "seg" else caption,
            "caption": caption,
            "expression": scene.expression,
            "expression_kind": scene.expression_kind,
        }
