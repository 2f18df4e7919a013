"""The shapes world: a procedural renderer of 64x64 images and their captions.

Every image holds at most one shape with four attributes, each of which a caption may or may
not name:

- shape: circle, square, triangle, star, cross, heart (or none: an empty background)
- colour: red, orange, yellow, green, blue, purple
- background: black, gray, white
- style: solid or striped fill

Position, size and rotation are random. Everything is deterministic for a seed: the same seed
gives the same scenes, the same pixels and the same captions.

The toy text-to-image model in ``weights/toy`` is trained on these renders, and the judge in
``weights/judge.safetensors`` is trained to read the four attributes back from an image.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, for smooth edges

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS = ("black", "gray", "white")
STYLES = ("solid", "striped")
NO_SHAPE = "none"

ATTRIBUTES = ("shape", "color", "background", "style")
# What the judge can answer for each attribute (shape has the extra "none" for empty scenes).
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES + (NO_SHAPE,),
    "color": COLORS,
    "background": BACKGROUNDS,
    "style": STYLES,
}

COLOR_RGB = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (35, 170, 60),
    "blue": (40, 80, 225),
    "purple": (140, 50, 190),
}
STRIPE_SHADE = 0.45  # brightness of the dark bands between the stripes of a striped shape
BACKGROUND_RGB = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}

# Words a caption may use for an attribute value. The first is the canonical name.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "heart": ("heart",),
    "gray": ("gray", "grey"),
    "black": ("black", "dark"),
    "white": ("white",),
}

# Caption templates; "a" becomes "an" before a vowel.
_TEMPLATES_BY_NAMED = {
    ("shape", "color", "background", "style"): (
        "a {style} {color} {shape} on a {background} background",
        "{style} {color} {shape}, {background} background",
    ),
    ("shape", "color", "background"): (
        "a {color} {shape} on a {background} background",
        "a picture of a {color} {shape} on a {background} background",
        "{color} {shape}, {background} background",
    ),
    ("shape", "color", "style"): ("a {style} {color} {shape}",),
    ("shape", "color"): ("a {color} {shape}", "a picture of a {color} {shape}"),
    ("shape", "background"): ("a {shape} on a {background} background",),
    ("shape", "style"): ("a {style} {shape}",),
    ("shape",): ("a {shape}", "a picture of a {shape}"),
    ("color",): ("something {color}",),
    ("background",): ("an empty {background} background", "a plain {background} background"),
}
# How often each subset of attributes is named in a caption (weights, normalised below).
_NAMED_WEIGHTS = {
    ("shape", "color", "background", "style"): 0.20,
    ("shape", "color", "background"): 0.30,
    ("shape", "color", "style"): 0.05,
    ("shape", "color"): 0.20,
    ("shape", "background"): 0.10,
    ("shape", "style"): 0.05,
    ("shape",): 0.07,
    ("color",): 0.03,
}
# Random placement. The ranges are kept narrow enough for the embedded model to learn the geometry in its
# CPU budget: at radius 13-22 px anywhere in the frame (centre jitter up to +-17 px, rotation +-25 degrees), a
# 2.5M-parameter UNet trained for 800 steps on 256 renders drew blobs (shape right on 21% of its own training
# captions); at radius 16-22, jitter +-6 and rotation +-15 the same test gave 38%.
SIZE_RANGE = (17.0, 23.0)  # radius of the bounding circle, in pixels
POSITION_JITTER = 5.0  # the centre is within this many pixels of the image centre, on each axis
MAX_ROTATION = 15.0  # degrees, either way
EMPTY_SCENE_RATE = 0.03  # share of scenes with no shape; their caption names only the background


@dataclass(frozen=True)
class Scene:
    """One image's content. ``shape`` is ``"none"`` for an empty background."""

    shape: str
    color: str
    background: str
    style: str
    cx: float  # centre, in pixels
    cy: float
    size: float  # radius of the shape's bounding circle, in pixels
    angle: float  # rotation in degrees

    def labels(self) -> dict[str, int]:
        """Class indices of the four attributes, as the judge predicts them."""
        return {name: ATTRIBUTE_VALUES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def sample_scene(rng: np.random.Generator, **fixed: str) -> Scene:
    """Draw a random scene; keyword arguments (e.g. ``shape="circle"``) fix attributes."""
    for name, value in fixed.items():
        if name not in ATTRIBUTES or value not in ATTRIBUTE_VALUES[name]:
            raise ValueError(f"unknown attribute {name}={value!r}; choose from {ATTRIBUTE_VALUES}")
    shape = fixed.get("shape") or (NO_SHAPE if rng.random() < EMPTY_SCENE_RATE else SHAPES[rng.integers(len(SHAPES))])
    color = fixed.get("color") or COLORS[rng.integers(len(COLORS))]
    background = fixed.get("background") or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    style = fixed.get("style") or STYLES[rng.integers(len(STYLES))]
    size = float(rng.uniform(*SIZE_RANGE))
    cx = IMAGE_SIZE / 2 + float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))
    cy = IMAGE_SIZE / 2 + float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))
    angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    return Scene(shape, color, background, style, cx, cy, size, angle)


def _shape_polygon(scene: Scene, scale: float) -> list[tuple[float, float]]:
    """The outline of the scene's shape as a polygon in supersampled pixel coordinates."""
    r = scene.size * scale
    if scene.shape == "circle":
        points = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 72, endpoint=False)]
        r *= 0.92
    elif scene.shape == "square":
        points = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif scene.shape == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        points = [(x, y + 0.15) for x, y in points]
    elif scene.shape == "star":
        points = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            radius = 1.0 if i % 2 == 0 else 0.42
            points.append((radius * math.cos(a), radius * math.sin(a) + 0.08))
    elif scene.shape == "cross":
        w = 0.3
        points = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        points = [(0.9 * x, 0.9 * y) for x, y in points]
    elif scene.shape == "heart":
        points = []
        for a in np.linspace(0, 2 * math.pi, 72, endpoint=False):
            x = 16 * math.sin(a) ** 3
            y = -(13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a))
            points.append((x / 17.0, y / 17.0 + 0.05))
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    rot = math.radians(scene.angle)
    cos, sin = math.cos(rot), math.sin(rot)
    cx, cy = scene.cx * scale, scene.cy * scale
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def render(scene: Scene) -> np.ndarray:
    """Render a scene as a uint8 array of shape (64, 64, 3)."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND_RGB[scene.background])
    if scene.shape != NO_SHAPE:
        mask = Image.new("L", (big, big), 0)
        ImageDraw.Draw(mask).polygon(_shape_polygon(scene, _SUPERSAMPLE), fill=255)
        if scene.style == "striped":
            # the whole silhouette in a dark shade of the colour, then horizontal bands of the colour with a
            # 10 px period at 64 px (6 px of colour, 4 px of shade): the outline stays visible on any background
            shade = tuple(int(round(v * STRIPE_SHADE)) for v in COLOR_RGB[scene.color])
            image.paste(shade, (0, 0, big, big), mask)
            rows = (np.arange(big) // _SUPERSAMPLE) % 10 < 6
            stripes = np.where(rows[:, None], 255, 0).astype(np.uint8)
            mask = Image.fromarray((np.asarray(mask, dtype=np.uint16) * stripes // 255).astype(np.uint8))
        image.paste(COLOR_RGB[scene.color], (0, 0, big, big), mask)
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.uint8)


def _fill(template: str, words: dict[str, str]) -> str:
    """Format a template and turn "a" into "an" before a vowel."""
    text = template.format(**words)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption(scene: Scene, rng: np.random.Generator, named: Optional[tuple[str, ...]] = None) -> str:
    """A caption for the scene that names the attributes in ``named`` (random subset if None)."""
    if scene.shape == NO_SHAPE:
        named = ("background",)
    elif named is None:
        keys = [k for k in _NAMED_WEIGHTS if k != ("background",)]
        weights = np.array([_NAMED_WEIGHTS[k] for k in keys])
        named = keys[rng.choice(len(keys), p=weights / weights.sum())]
    templates = _TEMPLATES_BY_NAMED[named]
    template = templates[rng.integers(len(templates))]
    words = {}
    for name in ATTRIBUTES:
        options = SYNONYMS.get(getattr(scene, name), (getattr(scene, name),))
        words[name] = options[rng.integers(len(options))]
    return _fill(template, words)


def prompt_for(**attributes: str) -> str:
    """The canonical prompt naming the given attributes, e.g. ``prompt_for(shape="circle", color="red")``."""
    named = tuple(name for name in ATTRIBUTES if name in attributes)
    if named not in _TEMPLATES_BY_NAMED:
        raise ValueError(f"no prompt template names exactly {named}; named attributes: {list(_TEMPLATES_BY_NAMED)}")
    return _fill(_TEMPLATES_BY_NAMED[named][0], attributes)


def sample_dataset(seed: int, n: int) -> Iterator[tuple[np.ndarray, str, Scene]]:
    """``n`` (image, caption, scene) triples, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = sample_scene(rng)
        yield render(scene), caption(scene, rng), scene


def vocabulary() -> list[str]:
    """Every word a caption can contain (the toy tokenizer gives each its own token)."""
    words: set[str] = {"a", "an", "on", "of", "picture", "background", "empty", "plain", "something", "sign"}
    for values in ATTRIBUTE_VALUES.values():
        words.update(v for v in values if v != NO_SHAPE)
    for options in SYNONYMS.values():
        for option in options:
            words.update(option.split())
    return sorted(words)


# ------------------------------------------------------------------------------ prompts <-> attributes
_WORD_TO_VALUE: dict[str, tuple[str, str]] = {}
for _name in ATTRIBUTES:
    for _value in ATTRIBUTE_VALUES[_name]:
        if _value == NO_SHAPE:
            continue
        for _word in SYNONYMS.get(_value, (_value,)):
            _WORD_TO_VALUE[_word] = (_name, _value)
_WORD_TO_VALUE["plus"] = ("shape", "cross")


def concept_attribute(concept: str) -> tuple[str, str]:
    """The (attribute, value) a concept word names: ``"ball"`` -> ``("shape", "circle")``."""
    key = concept.strip().lower()
    if key not in _WORD_TO_VALUE:
        known = sorted(v for values in ATTRIBUTE_VALUES.values() for v in values if v != NO_SHAPE)
        raise ValueError(f"{concept!r} is not a concept of the shapes world; choose from {', '.join(known)}")
    return _WORD_TO_VALUE[key]


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attribute values a prompt names, e.g. ``{"shape": "circle", "color": "red", "background": "gray"}``.

    A prompt that names a background but no shape and says "empty" or "plain" asks for no shape.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    named: dict[str, str] = {}
    for i, word in enumerate(words):
        if word in _WORD_TO_VALUE:
            name, value = _WORD_TO_VALUE[word]
            if value in BACKGROUNDS and "background" not in words[i + 1 : i + 2]:
                continue  # "black"/"white"/"gray" are backgrounds only when followed by "background"
            named.setdefault(name, value)
    if "shape" not in named and ("empty" in words or "plain" in words):
        named["shape"] = NO_SHAPE
    return named


def attribute_prompts(seed: int, n: int, named: tuple[str, ...] = ("shape", "color", "background"), **fixed: str) -> list[str]:
    """``n`` canonical prompts naming the attributes in ``named``, the values drawn at random (or fixed)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        scene = sample_scene(rng, **({"shape": SHAPES[rng.integers(len(SHAPES))]} | fixed))
        prompts.append(prompt_for(**{name: getattr(scene, name) for name in named}))
    return prompts


def concept_prompts(concept: str, seed: int, n: int) -> list[str]:
    """Prompts that name ``concept`` (e.g. "circle", "red", "striped"), other attributes varying."""
    name, value = concept_attribute(concept)
    named = ("shape", "color", "background") if name != "style" else ("shape", "color", "style")
    if name == "background":
        named = ("shape", "background")
    return attribute_prompts(seed, n, named=named, **{name: value})


def other_prompts(concept: str, seed: int, n: int) -> list[str]:
    """Prompts that do not name ``concept`` but name the other values of its attribute."""
    name, value = concept_attribute(concept)
    others = [v for v in ATTRIBUTE_VALUES[name] if v not in (value, NO_SHAPE)]
    rng = np.random.default_rng(seed)
    named = ("shape", "color", "background") if name != "style" else ("shape", "color", "style")
    return [attribute_prompts(int(rng.integers(2**31)), 1, named=named, **{name: others[i % len(others)]})[0]
            for i in range(n)]
