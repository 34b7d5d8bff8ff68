"""The demo world: procedurally generated images of one object and captions that describe it.

Every image shows one object on a background; six independent attributes
define it, and a caption names some of them::

    shape       circle, square, triangle, diamond, hexagon, star, cross, heart
    colour      red, orange, yellow, green, cyan, blue, purple, pink
    size        small, medium, large
    position    center, top left, top right, bottom left, bottom right
    texture     plain, striped, dotted, checkered
    background  black, gray, white

Nuisances that no caption names (rotation, a jitter of position, size and
colour, pixel noise) make no two images alike. :class:`Style` says how a scene
is drawn: the pretraining style (``Style()``) fills the shape on a flat
background; the downstream few-shot tasks (:data:`TASKS`) draw in a style the
pretraining never saw (thick outlines), and their classes are shape-colour
pairs, some of which the pretraining never showed together (:data:`HELD_OUT`).
The other settings add targets beside them: :data:`TARGETS`, a task with other
classes (texture + shape) for cross-dataset transfer, and :data:`SHIFTS`,
WorldShapes' classes in four held-out styles (test images only) for domain
generalisation and test-time training, as ImageNet's variants are for ImageNet.

Rendering is vectorised in torch (every image of a batch at once, 2×
supersampled) and seeded: the same scenes, style and seed give the same bytes.
Nothing here trains or downloads anything.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> scenes = sample_scenes(4, generator=g)
>>> images = render(scenes, generator=g)          # (4, 64, 64, 3) uint8
>>> captions(scenes, generator=g)[0]              # e.g. 'a photo of a large red striped star in the top left.'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT",
    "IMAGE_SIZE",
    "POSITIONS",
    "SHAPES",
    "SHIFTS",
    "SIZES",
    "Scenes",
    "Style",
    "TARGETS",
    "TASKS",
    "TEXTURES",
    "Task",
    "TaskImages",
    "WORLD_VERSION",
    "caption",
    "captions",
    "checkerboard",
    "contact_sheet",
    "render",
    "sample_scenes",
]

WORLD_VERSION = "1"  # bump when rendering or captions change: the shipped weights were trained on this world
IMAGE_SIZE = 64

# -- the attributes --------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "heart")
# RGB in [0, 1]; names a caption uses, values the renderer draws (before jitter and style)
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.14, 0.14),
    "orange": (0.96, 0.55, 0.10),
    "yellow": (0.93, 0.85, 0.15),
    "green": (0.18, 0.68, 0.24),
    "cyan": (0.15, 0.78, 0.82),
    "blue": (0.16, 0.30, 0.88),
    "purple": (0.56, 0.22, 0.72),
    "pink": (0.96, 0.50, 0.72),
}
SIZES = ("small", "medium", "large")
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.06, 0.06, 0.07),
    "gray": (0.50, 0.50, 0.52),
    "white": (0.95, 0.95, 0.93),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
    "texture": TEXTURES,
    "background": tuple(BACKGROUNDS),
}
# (shape, colour) pairs that pretraining never draws: a downstream class may be a combination
# whose parts the model knows but whose pairing it has never seen.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("circle", "purple"),
    ("square", "cyan"),
    ("triangle", "pink"),
    ("diamond", "orange"),
    ("hexagon", "red"),
    ("star", "green"),
    ("cross", "yellow"),
    ("heart", "blue"),
)

_RADIUS = {"small": 0.15, "medium": 0.21, "large": 0.28}  # object radius as a fraction of the image side
_CENTRES = {  # object centre (x, y) as fractions of the image side
    "center": (0.5, 0.5),
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}


@dataclass(frozen=True)
class Style:
    """How a scene is drawn. ``Style()`` is the pretraining style: a filled shape on a flat background.

    Args:
        outline: 0 fills the shape; ``w > 0`` draws only a band of relative width ``w`` along its edge
            (the inside shows the background).
        clutter: 0 keeps the background flat; ``c > 0`` blends in random low-frequency coloured
            blotches with weight ``c``.
        tint: an RGB colour cast multiplied into the whole image (``(1, 1, 1)``: none).
        desaturate: 0 keeps colours; ``s`` in ``[0, 1]`` mixes the object colour toward its grey level.
        noise: standard deviation of the per-pixel Gaussian noise (in ``[0, 1]`` intensity).
        jitter: how much each object's colour varies around its named value (per-channel std).
    """

    outline: float = 0.0
    clutter: float = 0.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    desaturate: float = 0.0
    noise: float = 0.02
    jitter: float = 0.04

    def __post_init__(self) -> None:
        if not 0 <= self.outline < 1:
            raise ValueError(f"outline must be in [0, 1) (0 fills the shape), got {self.outline}")
        if not 0 <= self.clutter <= 1 or not 0 <= self.desaturate <= 1:
            raise ValueError("clutter and desaturate must be in [0, 1]")
        if len(self.tint) != 3 or min(self.tint) < 0:
            raise ValueError(f"tint must be three non-negative channel factors, got {self.tint}")
        if self.noise < 0 or self.jitter < 0:
            raise ValueError("noise and jitter must be >= 0")


@dataclass
class Scenes:
    """A batch of N scenes: one index per attribute into its tuple in :data:`ATTRIBUTES`.

    Args:
        shape, colour, size, position, texture, background: ``(N,)`` int64 indices.
        rotation: ``(N,)`` angle in radians (a nuisance: captions never name it).
        offset: ``(N, 2)`` jitter of the centre, as a fraction of the image side.
        scale: ``(N,)`` factor on the size's radius.
        tone: ``(N, 3)`` per-channel colour jitter in units of :attr:`Style.jitter`.
    """

    shape: Tensor
    colour: Tensor
    size: Tensor
    position: Tensor
    texture: Tensor
    background: Tensor
    rotation: Tensor
    offset: Tensor
    scale: Tensor
    tone: Tensor

    def __len__(self) -> int:
        return self.shape.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> Scenes:
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def names(self, index: int) -> dict[str, str]:
        """The attribute words of scene ``index``: ``{"shape": "star", "colour": "red", ...}``."""
        return {key: values[int(getattr(self, key)[index])] for key, values in ATTRIBUTES.items()}


def _index(name: str, value: str | int | None, n: int, generator: torch.Generator) -> Tensor:
    values = ATTRIBUTES[name]
    if value is None:
        return torch.randint(len(values), (n,), generator=generator)
    if isinstance(value, str):
        if value not in values:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(values)}")
        value = values.index(value)
    if not 0 <= int(value) < len(values):
        raise ValueError(f"{name} index {value} is outside 0..{len(values) - 1}")
    return torch.full((n,), int(value), dtype=torch.int64)


def sample_scenes(
    n: int,
    *,
    generator: torch.Generator,
    exclude: Sequence[tuple[str, str]] = (),
    **fixed: str | int | None,
) -> Scenes:
    """``n`` random scenes; attributes not fixed are uniform and independent.

    Args:
        n: how many.
        generator: the seeded source of every random choice.
        exclude: (shape, colour) pairs never drawn (redrawn until none is left), e.g. :data:`HELD_OUT`.
        **fixed: an attribute fixed for every scene, by name or index (``shape="star"``, ``colour=0``).

    Returns:
        :class:`Scenes` with the nuisances drawn too.
    """
    unknown = sorted(set(fixed) - set(ATTRIBUTES))
    if unknown:
        raise TypeError(f"unknown attribute(s) {unknown}; known: {', '.join(ATTRIBUTES)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    idx = {name: _index(name, fixed.get(name), n, generator) for name in ATTRIBUTES}
    if exclude:
        banned = torch.zeros(len(SHAPES), len(COLOURS), dtype=torch.bool)
        for shape, colour in exclude:
            banned[SHAPES.index(shape), tuple(COLOURS).index(colour)] = True
        for _ in range(100):
            bad = banned[idx["shape"], idx["colour"]]
            if not bad.any():
                break
            for name in ("shape", "colour"):
                if fixed.get(name) is None:
                    idx[name][bad] = torch.randint(len(ATTRIBUTES[name]), (int(bad.sum()),), generator=generator)
        else:
            raise ValueError(f"the fixed attributes {fixed} only allow excluded (shape, colour) pairs")
    return Scenes(
        **idx,
        rotation=(torch.rand(n, generator=generator) * 2 - 1) * math.pi / 6,
        offset=(torch.rand(n, 2, generator=generator) * 2 - 1) * 0.05,
        scale=1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1,
        tone=torch.randn(n, 3, generator=generator),
    )


# -- rendering -------------------------------------------------------------------------------
# Shapes are gauge functions g(u, v) of local coordinates (positively homogeneous of degree 1):
# the shape is g <= 1, so an outline of width w is the band 1 - w <= g <= 1 for every shape.


def _polygon(u: Tensor, v: Tensor, sides: int, phase: float) -> Tensor:
    """Regular polygon with circumradius 1: the largest projection on its edge normals over the apothem."""
    apothem = math.cos(math.pi / sides)
    angles = [phase + (2 * k + 1) * math.pi / sides for k in range(sides)]
    return torch.stack([u * math.cos(a) + v * math.sin(a) for a in angles]).amax(0) / apothem


def _star(u: Tensor, v: Tensor, points: int = 5, inner: float = 0.45) -> Tensor:
    """Star polygon with outer radius 1: r over the star's radius along the same direction."""
    r = torch.sqrt(u * u + v * v)
    half = math.pi / points
    t = (torch.remainder(torch.atan2(u, -v) + half, 2 * half) - half).abs()  # angle from the nearest point
    # the edge from the point (1, 0) to the inner vertex inner·(cos half, sin half), in polar form
    px, py = inner * math.cos(half) - 1, inner * math.sin(half)
    nx, ny = py, -px  # normal of the edge
    c = nx * 1.0  # n · (1, 0)
    radius = c / (nx * torch.cos(t) + ny * torch.sin(t))
    return r / radius


def _heart(u: Tensor, v: Tensor) -> Tensor:
    """Two discs (the lobes) and a diamond (the point), all holding the origin: the min of their gauges."""
    lobes = []
    for cx in (-0.38, 0.38):
        cy, rho = -0.28, 0.48
        a = rho * rho - cx * cx - cy * cy  # > 0: the origin is inside the disc
        b = u * cx + v * cy
        # smallest t with |p - t·c| <= t·rho, written without cancellation
        lobes.append((u * u + v * v) / (b + torch.sqrt(b * b + a * (u * u + v * v))).clamp(min=1e-6))
    c, d = 0.05, 0.8  # the diamond |u| + |v - c| <= d, as four half-planes
    point = torch.stack([(sx * u + sy * v) / (d + sy * c) for sx in (-1, 1) for sy in (-1, 1)]).amax(0)
    return torch.minimum(torch.minimum(*lobes), point)


def _gauge(shape: int, u: Tensor, v: Tensor) -> Tensor:
    name = SHAPES[shape]
    if name == "circle":
        return torch.sqrt(u * u + v * v)
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) * 1.25
    if name == "triangle":
        return _polygon(u, v - 0.25, 3, math.pi / 6) * 1.05
    if name == "diamond":
        return u.abs() / 0.8 + v.abs()
    if name == "hexagon":
        return _polygon(u, v, 6, 0.0)
    if name == "star":
        return _star(u, v)
    if name == "cross":
        a = 0.36  # arm half-width
        return torch.minimum(torch.maximum(u.abs() / a, v.abs()), torch.maximum(u.abs(), v.abs() / a))
    return _heart(u, v)


def _texture(kind: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """1 where the texture's second colour shows, else 0: ``(N, H, W)`` from object coordinates."""
    out = torch.zeros_like(u)
    for index in kind.unique().tolist():
        name, chosen = TEXTURES[index], kind == index
        a, b = u[chosen], v[chosen]
        if name == "striped":
            out[chosen] = (torch.sin(a * 9.0) > 0).float()
        elif name == "dotted":
            fa, fb = torch.remainder(a * 2.2, 1.0) - 0.5, torch.remainder(b * 2.2, 1.0) - 0.5
            out[chosen] = (fa * fa + fb * fb < 0.09).float()
        elif name == "checkered":
            out[chosen] = torch.remainder(torch.floor(a * 2.2) + torch.floor(b * 2.2), 2.0)
    return out


def _blotches(n: int, side: int, generator: torch.Generator) -> Tensor:
    """Low-frequency random colour fields ``(N, 3, side, side)`` in [0, 1]."""
    coarse = torch.rand(n, 3, 5, 5, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)


def render(
    scenes: Scenes,
    style: Style | None = None,
    *,
    size: int = 64,
    generator: torch.Generator,
    supersample: int = 2,
) -> Tensor:
    """Draw scenes as RGB images.

    Args:
        scenes: what to draw (:func:`sample_scenes`).
        style: how (default :class:`Style`, the pretraining style).
        size: image side in pixels.
        generator: seeds the style's random parts (noise, clutter).
        supersample: draw at ``supersample × size`` and average down (anti-aliasing).

    Returns:
        ``(N, size, size, 3)`` uint8.
    """
    style = style or Style()
    n, side = len(scenes), size * supersample
    if n == 0:
        return torch.zeros(0, size, size, 3, dtype=torch.uint8)
    grid = (torch.arange(side, dtype=torch.float32) + 0.5) / side  # pixel centres in [0, 1]
    y, x = torch.meshgrid(grid, grid, indexing="ij")  # (H, W)
    centres = torch.tensor([_CENTRES[p] for p in POSITIONS])[scenes.position] + scenes.offset  # (N, 2)
    radius = torch.tensor([_RADIUS[s] for s in SIZES])[scenes.size] * scenes.scale  # (N,)
    dx = (x[None] - centres[:, 0, None, None]) / radius[:, None, None]  # (N, H, W)
    dy = (y[None] - centres[:, 1, None, None]) / radius[:, None, None]
    cos, sin = torch.cos(scenes.rotation)[:, None, None], torch.sin(scenes.rotation)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # object coordinates, rotated with the object

    gauge = torch.empty(n, side, side)
    for shape in scenes.shape.unique().tolist():
        chosen = scenes.shape == shape
        gauge[chosen] = _gauge(shape, u[chosen], v[chosen])
    inside = gauge <= 1.0
    if style.outline > 0:
        inside &= gauge >= 1.0 - style.outline

    colour = torch.tensor(list(COLOURS.values()))[scenes.colour] + style.jitter * scenes.tone  # (N, 3)
    if style.desaturate > 0:
        grey = colour.mean(-1, keepdim=True)
        colour = (1 - style.desaturate) * colour + style.desaturate * grey
    colour = colour.clamp(0, 1)
    second = _texture(scenes.texture, u, v)  # (N, H, W)
    pattern = colour[:, :, None, None] * (1 - 0.55 * second[:, None])  # (N, 3, H, W): darker second colour

    background = torch.tensor(list(BACKGROUNDS.values()))[scenes.background]  # (N, 3)
    canvas = background[:, :, None, None] * (0.92 + 0.16 * y[None, None])  # (N, 3, H, W): a faint gradient
    if style.clutter > 0:
        canvas = (1 - style.clutter) * canvas + style.clutter * _blotches(n, side, generator)
    image = torch.where(inside[:, None], pattern, canvas)
    image = image * torch.tensor(style.tint).view(1, 3, 1, 1)
    if supersample > 1:
        image = torch.nn.functional.avg_pool2d(image, supersample)  # (N, 3, size, size)
    if style.noise > 0:
        image = image + style.noise * torch.randn(image.shape, generator=generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# -- captions --------------------------------------------------------------------------------


def caption(names: dict[str, str], *, keep: dict[str, bool] | None = None, prefix: str = "a") -> str:
    """One caption from attribute words, naming the attributes that ``keep`` keeps (all by default).

    Example:
        >>> caption({"shape": "star", "colour": "red", "size": "large", "position": "top left",
        ...          "texture": "striped", "background": "white"})
        'a large red striped star in the top left on a white background.'
    """
    keep = keep or {}
    words = [prefix]
    for key in ("size", "colour", "texture"):
        if keep.get(key, not (key == "texture" and names[key] == "plain")):  # "plain" only when asked for
            words.append(names[key])
    words.append(names["shape"] if keep.get("shape", True) else "shape")
    if keep.get("position", True):
        words.append("in the " + names["position"])
    if keep.get("background", True):
        words.append(f"on a {names['background']} background")
    return " ".join(words) + "."


_PREFIXES = ("a", "a photo of a", "an image of a", "a picture of a")


def captions(
    scenes: Scenes,
    *,
    generator: torch.Generator,
    p_keep: float = 0.6,
    always: Sequence[Sequence[str]] | None = None,
) -> list[str]:
    """A random caption per scene: each attribute is named with probability ``p_keep``.

    The shape is named with probability 0.9 (else the caption says "shape"),
    the prefix is one of "a", "a photo of a", "an image of a" and "a picture of a",
    so that short prompts such as CoOp's ``"a photo of a {}."`` are in the
    pretraining distribution.

    Args:
        scenes: what to describe.
        generator: seeds which attributes are named and the prefix.
        p_keep: the probability of naming each attribute.
        always: per scene, attributes that are always named (e.g. the ones that tell it apart
            from similar scenes in the same batch).
    """
    n = len(scenes)
    if always is not None and len(always) != n:
        raise ValueError(f"always must name attributes for each of the {n} scenes, got {len(always)}")
    draws = torch.rand(n, len(ATTRIBUTES), generator=generator)
    prefixes = torch.randint(len(_PREFIXES), (n,), generator=generator)
    out = []
    for i in range(n):
        keep = {key: bool(draws[i, j] < p_keep) for j, key in enumerate(ATTRIBUTES)}
        keep["shape"] = bool(draws[i, 0] < 0.9)
        for key in always[i] if always is not None else ():
            keep[key] = True
        out.append(caption(scenes.names(i), keep=keep, prefix=_PREFIXES[int(prefixes[i])]))
    return out


# -- pictures --------------------------------------------------------------------------------


def contact_sheet(images: Tensor, *, columns: int = 8, gap: int = 2):
    """The images side by side as one ``PIL.Image`` (``columns`` per row), e.g. to look at a style."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = max(1, math.ceil(n / columns))
    canvas = torch.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        top, left = gap + r * (h + gap), gap + c * (w + gap)
        canvas[top : top + h, left : left + w] = images[i]
    return Image.fromarray(canvas.numpy())


# -- downstream tasks ------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskImages:
    """The rendered images of one split of a :class:`Task`: ``(N, H, W, 3)`` uint8 and ``(N,)`` labels."""

    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class Task:
    """A few-shot classification task in the world: each class fixes some attributes, the rest vary.

    Args:
        name: the dataset's name (``"WorldShapes"``).
        classes: per class, the attributes it fixes, e.g. ``{"colour": "red", "shape": "star"}``;
            the class name lists their words in caption order ("red star"). Labels follow this order,
            so the first ``ceil(C / 2)`` classes are CoOp's base classes.
        style: how its images are drawn (a style the pretraining did not see).
        counts: images per class in the train, val and test splits.
        seed: seeds the scenes and their rendering, per split.
        description: one line for people.
    """

    name: str
    classes: tuple[tuple[tuple[str, str], ...], ...]
    style: Style
    counts: tuple[int, int, int] = (32, 8, 50)
    seed: int = 0
    description: str = ""

    @property
    def classnames(self) -> list[str]:
        order = ("size", "colour", "texture", "shape", "position", "background")
        return [" ".join(value for key in order for k, value in cls if k == key) for cls in self.classes]

    def render(self, split: str, *, per_class: int | None = None) -> TaskImages:
        """Images of ``split`` (``"train"``, ``"val"`` or ``"test"``), class-major; the same every call."""
        splits = ("train", "val", "test")
        if split not in splits:
            raise ValueError(f"split must be one of {', '.join(splits)}, got {split!r}")
        n = self.counts[splits.index(split)] if per_class is None else per_class
        g = torch.Generator().manual_seed(self.seed * 1000 + splits.index(split))
        parts = [sample_scenes(n, generator=g, **dict(cls)) for cls in self.classes]
        scenes = Scenes(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Scenes)})
        labels = torch.arange(len(self.classes)).repeat_interleave(n)
        return TaskImages(images=render(scenes, self.style, generator=g), labels=labels)


def checkerboard(shapes: Sequence[str], colours: Sequence[str]) -> tuple[tuple[tuple[str, str], ...], ...]:
    """The classes of a shape × colour grid, base classes first: the cells ``(i + j)`` even, then the odd ones.

    Every shape and every colour is in both halves, so base-to-new asks for new
    combinations of known words, and base classes need both words to tell apart.
    """
    cells = [(s, c, (i + j) % 2) for i, s in enumerate(shapes) for j, c in enumerate(colours)]
    ordered = [cell for half in (0, 1) for cell in cells if cell[2] == half]
    return tuple((("colour", colour), ("shape", shape)) for shape, colour, _ in ordered)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="WorldShapes",
            # the grid holds four HELD_OUT pairs (circle-purple, square-cyan, triangle-pink, star-green),
            # all on the new side: half the new classes pair words pretraining never saw together
            classes=checkerboard(("circle", "square", "triangle", "star"), ("cyan", "purple", "green", "pink")),
            style=Style(outline=0.5),
            seed=1,
            description="colour + shape, drawn as thick outlines (pretraining only saw filled shapes)",
        ),
    )
}


# -- other settings' data ------------------------------------------------------------------------
# Added beside TASKS, which stays what the base-to-new demo runs: every image above is unchanged.


def _subset(task: Task, labels: slice) -> tuple[tuple[tuple[str, str], ...], ...]:
    """Some of ``task``'s classes in its own order, as ImageNet-A and -R hold 200 of ImageNet's 1000."""
    return task.classes[labels]


_SHAPES_TASK = TASKS["WorldShapes"]

# A cross-dataset target: other classes (texture + shape, four shapes WorldShapes does not use), drawn in the
# same thick-outline style. The pretraining named every texture, but never on an outline.
TARGETS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="WorldTextures",
            classes=tuple((("texture", t), ("shape", s)) for t in ("striped", "dotted", "checkered")
                          for s in ("diamond", "hexagon", "cross", "heart")),
            style=Style(outline=0.5),
            seed=3,
            description="texture + shape in thick outlines: other classes, the same drawing style",
        ),
    )
}

# Domain-generalisation targets: WorldShapes' classes in styles neither the pretraining nor WorldShapes used,
# as ImageNet-V2, -Sketch, -A and -R are ImageNet's classes in other domains. Test images only (25 per class);
# -A and -R hold half the classes (in WorldShapes' order), as ImageNet-A and -R hold 200 of ImageNet's.
SHIFTS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(name="WorldShapes-V2", classes=_SHAPES_TASK.classes, style=_SHAPES_TASK.style, counts=(0, 0, 25), seed=11,
             description="WorldShapes drawn again: the same style, new images"),
        Task(name="WorldShapes-Sketch", classes=_SHAPES_TASK.classes, style=Style(outline=0.3, desaturate=0.3),
             counts=(0, 0, 25), seed=12, description="thinner, faded outlines, as a sketch"),
        Task(name="WorldShapes-A", classes=_subset(_SHAPES_TASK, slice(0, None, 2)),
             style=Style(outline=0.5, clutter=0.25), counts=(0, 0, 25), seed=13,
             description="half the classes, on cluttered backgrounds"),
        Task(name="WorldShapes-R", classes=_subset(_SHAPES_TASK, slice(1, None, 2)), style=Style(tint=(0.5, 0.5, 0.55)),
             counts=(0, 0, 25), seed=14, description="half the classes, filled shapes in a dark light"),
    )
}
