"""The demo world: one or two flat shapes moving over a flat background, described by a sentence.

Owns the vocabulary (object colours, background colours, shapes, motions, speeds and their
synonyms), the RGB values of every colour, :class:`Scene` and :class:`SceneObject`, reading a
prompt sentence into a scene (:func:`parse_prompt`), the canonical sentence of a scene
(:func:`describe`), varied phrasings and random scenes for training data (:func:`phrase`,
:func:`random_scene`, :func:`random_prompt`), the fixed evaluation prompts (:data:`EVAL_PROMPTS`)
and the renderer (:func:`render`). Does not own judging rendered or generated frames
(``memrope.runtime.demo.evaluate``), nor encoding prompts or training a model.

Frames are uint8 RGB ``[T, H, W, 3]``; T frames at :data:`FPS`, H rows, W columns. Lengths are in
pixels at the rendered size; speeds in pixels per frame. The reference size is 64 x 96 (H x W);
other sizes (multiples of 16) scale object sizes and speeds by ``min(H / 64, W / 96)``.

Rules (docs/demo_world.md has the full list):

* Words outside the vocabulary are ignored. A prompt naming nothing known is :data:`DEFAULT_SCENE`,
  a white ball bouncing on a black background; a partial prompt takes the rest from the defaults.
* An object's colour never equals the background's: an explicit object colour wins and the
  background falls back to black; an object with no colour named takes the first of
  white, red, yellow, green, blue that is neither the background nor the other object's colour.
* Every moving object reflects off the frame's walls (angle in = angle out) and stays inside the
  frame. "moving left" starts in the right half of its travel heading left, so a clip shows a long
  leftward run before the first reflection; "bouncing" moves diagonally at 45 degrees.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FPS = 16
REFERENCE_HEIGHT = 64
REFERENCE_WIDTH = 96
MAX_OBJECTS = 2

# Object and background colours are separate palettes: the same name (white, blue, green) is a
# brighter shade on an object than on a background, so any allowed pair stays far apart in RGB.
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (50, 200, 60),
    "blue": (50, 100, 240),
    "yellow": (240, 210, 30),
    "white": (240, 240, 240),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (225, 225, 225),
    "blue": (20, 40, 120),
    "green": (20, 90, 40),
    "gray": (128, 128, 128),
}
SHAPES = ("ball", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "bouncing", "still")
# Speed of a moving object at the reference size, in pixels per frame (the length of its velocity).
SPEEDS_PX_PER_FRAME: dict[str, float] = {"slow": 0.75, "normal": 1.5, "fast": 3.0}

# Object extents at the reference size: the ball's diameter, the square's side, the triangle's
# base and height (apex up); about equal areas (201, 196, 162 px).
SHAPE_SIZES_PX: dict[str, float] = {"ball": 16.0, "square": 14.0, "triangle": 18.0}

DEFAULT_BACKGROUND = "black"
DEFAULT_SHAPE = "ball"
DEFAULT_MOTION = "bouncing"
DEFAULT_SPEED = "normal"
# An object with no colour named takes the first of these not already taken.
DEFAULT_COLOR_ORDER = ("white", "red", "yellow", "green", "blue")

_COLOR_WORDS = {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "white": "white",
                "black": "black", "gray": "gray", "grey": "gray"}
_SHAPE_WORDS = {"ball": "ball", "balls": "ball", "circle": "ball", "circles": "ball", "disc": "ball",
                "disk": "ball", "dot": "ball",
                "square": "square", "squares": "square", "box": "square", "boxes": "square",
                "block": "square",
                "triangle": "triangle", "triangles": "triangle"}
_MOTION_WORDS = {
    **dict.fromkeys(("left", "leftward", "leftwards"), "left"),
    **dict.fromkeys(("right", "rightward", "rightwards"), "right"),
    **dict.fromkeys(("up", "upward", "upwards", "rising", "rises", "rise", "ascending", "ascends"), "up"),
    **dict.fromkeys(("down", "downward", "downwards", "falling", "falls", "fall", "sinking", "sinks",
                     "dropping", "drops", "descending", "descends"), "down"),
    **dict.fromkeys(("bouncing", "bounces", "bounce", "bouncy", "diagonally", "diagonal"), "bouncing"),
    **dict.fromkeys(("still", "stationary", "static", "motionless", "resting", "rests", "sitting", "sits",
                     "standing", "stands", "idle", "unmoving", "stopped"), "still"),
}
_SPEED_WORDS = {
    **dict.fromkeys(("slowly", "slow", "gently", "lazily", "leisurely"), "slow"),
    **dict.fromkeys(("quickly", "quick", "fast", "rapidly", "rapid", "swiftly", "swift", "briskly"), "fast"),
}
_BACKGROUND_NOUNS = frozenset(("background", "backdrop", "backgrounds", "bg"))
_BACKGROUND_PREPOSITIONS = frozenset(("on", "over", "against", "across", "onto", "atop", "upon"))
# Words that may sit between a colour and the noun it belongs to ("on a plain gray background").
_FILLER = frozenset(("a", "an", "the", "plain", "solid", "flat", "dark", "light", "bright", "pale",
                     "simple", "uniform", "empty", "colored", "coloured", "of"))
_NEW_OBJECT_JOINERS = frozenset(("and", "with", "plus", "beside", "while", "next"))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class SceneObject:
    """One shape: its colour (a key of :data:`OBJECT_COLORS`), shape, motion and speed word.

    ``speed`` is a key of :data:`SPEEDS_PX_PER_FRAME`; a still object's speed is ``"normal"``.
    """

    color: str = "white"
    shape: str = DEFAULT_SHAPE
    motion: str = DEFAULT_MOTION
    speed: str = DEFAULT_SPEED

    def __post_init__(self) -> None:
        _require(self.color in OBJECT_COLORS,
                 f"SceneObject.color={self.color!r} is not one of {tuple(OBJECT_COLORS)}")
        _require(self.shape in SHAPES, f"SceneObject.shape={self.shape!r} is not one of {SHAPES}")
        _require(self.motion in MOTIONS, f"SceneObject.motion={self.motion!r} is not one of {MOTIONS}")
        _require(self.speed in SPEEDS_PX_PER_FRAME,
                 f"SceneObject.speed={self.speed!r} is not one of {tuple(SPEEDS_PX_PER_FRAME)}")
        _require(self.motion != "still" or self.speed == DEFAULT_SPEED,
                 f"SceneObject.speed={self.speed!r} with motion 'still': a still object's speed must be "
                 f"{DEFAULT_SPEED!r}")


@dataclass(frozen=True)
class Scene:
    """A background colour (a key of :data:`BACKGROUND_COLORS`) and one or two objects.

    Objects have distinct colours, none equal to the background's name; later objects are drawn
    on top of earlier ones.
    """

    background: str = DEFAULT_BACKGROUND
    objects: tuple[SceneObject, ...] = (SceneObject(),)

    def __post_init__(self) -> None:
        _require(self.background in BACKGROUND_COLORS,
                 f"Scene.background={self.background!r} is not one of {tuple(BACKGROUND_COLORS)}")
        _require(isinstance(self.objects, tuple) and all(isinstance(o, SceneObject) for o in self.objects),
                 f"Scene.objects must be a tuple of SceneObject, got {type(self.objects).__name__}")
        _require(1 <= len(self.objects) <= MAX_OBJECTS,
                 f"Scene.objects has {len(self.objects)} objects; a scene has 1 to {MAX_OBJECTS}")
        colors = [o.color for o in self.objects]
        _require(len(set(colors)) == len(colors), f"Scene.objects colours {colors} must be distinct")
        _require(self.background not in colors,
                 f"Scene.background={self.background!r} equals an object's colour; they must differ")


DEFAULT_SCENE = Scene()


# --- prompts -> scenes ---------------------------------------------------------------------------

def _next_word(tokens: Sequence[str], start: int) -> str | None:
    for token in tokens[start:]:
        if token not in _FILLER:
            return token
    return None


def _previous_word(tokens: Sequence[str], end: int) -> str | None:
    for token in reversed(tokens[:end]):
        if token not in _FILLER:
            return token
    return None


def _names_background(tokens: Sequence[str], i: int) -> bool:
    """Whether the colour word at ``tokens[i]`` names the background.

    Yes when a background noun follows ("blue background"), when it follows "background of"
    ("a background of blue"), or when it follows a preposition and no shape follows it ("on gray").
    """
    following = _next_word(tokens, i + 1)
    if following in _BACKGROUND_NOUNS:
        return True
    if i >= 2 and tokens[i - 1] == "of" and tokens[i - 2] in _BACKGROUND_NOUNS:
        return True
    return _previous_word(tokens, i) in _BACKGROUND_PREPOSITIONS and following not in _SHAPE_WORDS


def parse_prompt(text: str) -> Scene:
    """Read a prompt sentence into a :class:`Scene`.

    A shape word closes an object: colour words before it are its colour; motion and speed words
    after it (until the next object's words begin) are its motion and speed, as are motion and speed
    words before it that no earlier object took. For each object the first colour, motion and speed
    word wins, except that "still" yields to any other motion word. A third shape is ignored.
    Colour and defaults conflicts resolve as the module docstring says.

    Raises:
        TypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    tokens = re.findall(r"[a-z]+", text.lower())
    background: str | None = None
    objects: list[dict] = []
    pending: dict = {}
    current: dict | None = None
    # Set once the next object's words begin: by a joiner ("and a ...") or by a colour word after an
    # object. Motion and speed words then wait for the next shape instead of going to ``current``.
    new_phrase: str | None = None

    def put(target: dict, key: str, value: str) -> None:
        if key == "motion" and value == "still":
            target.setdefault("still", True)
        else:
            target.setdefault(key, value)

    for i, token in enumerate(tokens):
        if token in _COLOR_WORDS:
            color = _COLOR_WORDS[token]
            if _names_background(tokens, i):
                if background is None and color in BACKGROUND_COLORS:
                    background = color
            elif color in OBJECT_COLORS:
                pending.setdefault("color", color)
                if current is not None and new_phrase is None:
                    new_phrase = "color"
        elif token in _SHAPE_WORDS:
            if len(objects) == MAX_OBJECTS:
                pending = {}
                current = None
                continue
            current = {**pending, "shape": _SHAPE_WORDS[token]}
            objects.append(current)
            pending = {}
            new_phrase = None
        elif token in _MOTION_WORDS or token in _SPEED_WORDS:
            key, value = ("motion", _MOTION_WORDS[token]) if token in _MOTION_WORDS else \
                ("speed", _SPEED_WORDS[token])
            put(pending if current is None or new_phrase else current, key, value)
        elif token in _NEW_OBJECT_JOINERS and current is not None:
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            if following in ("a", "an", "the", "another", "one", "something") or following in _COLOR_WORDS:
                new_phrase = "joiner"
    if pending:
        # Trailing words with no shape: a new object after a joiner ("and something red"), else
        # more about the last object ("a ball, red, moving left").
        if not objects or (new_phrase == "joiner" and len(objects) < MAX_OBJECTS):
            objects.append({**pending, "shape": DEFAULT_SHAPE})
        else:
            for key, value in pending.items():
                objects[-1].setdefault(key, value)
    if not objects:
        objects.append({})
    return _resolve(background, objects)


def _resolve(background: str | None, objects: list[dict]) -> Scene:
    """Fill defaults and settle colour conflicts (explicit beats default; object beats background)."""
    explicit_colors: list[str | None] = []
    for obj in objects:
        color = obj.get("color")
        explicit_colors.append(None if color in explicit_colors else color)
    if background is None or background in explicit_colors:
        background = DEFAULT_BACKGROUND
    taken = {background, *(c for c in explicit_colors if c is not None)}
    resolved = []
    for obj, color in zip(objects, explicit_colors, strict=True):
        if color is None:
            color = next(c for c in DEFAULT_COLOR_ORDER if c not in taken)
            taken.add(color)
        motion = obj.get("motion") or ("still" if obj.get("still") else DEFAULT_MOTION)
        speed = DEFAULT_SPEED if motion == "still" else obj.get("speed", DEFAULT_SPEED)
        resolved.append(SceneObject(color=color, shape=obj.get("shape", DEFAULT_SHAPE), motion=motion,
                                    speed=speed))
    return Scene(background=background, objects=tuple(resolved))


# --- scenes -> sentences -------------------------------------------------------------------------

_CANONICAL_MOTION = {"left": "moving {speed}to the left", "right": "moving {speed}to the right",
                     "up": "moving {speed}up", "down": "moving {speed}down",
                     "bouncing": "bouncing{speed}", "still": "standing still"}


def describe(scene: Scene) -> str:
    """The canonical prompt of ``scene``; ``parse_prompt(describe(scene)) == scene``.

    E.g. "a red ball bouncing on a blue background", "a yellow square moving slowly to the left
    on a gray background".
    """
    parts = []
    for obj in scene.objects:
        motion = _CANONICAL_MOTION[obj.motion]
        if obj.motion == "bouncing":
            motion = motion.format(speed={"slow": " slowly", "fast": " quickly"}.get(obj.speed, ""))
        else:
            motion = motion.format(speed={"slow": "slowly ", "fast": "quickly "}.get(obj.speed, ""))
        parts.append(f"a {obj.color} {obj.shape} {motion}")
    return f"{' and '.join(parts)} on a {scene.background} background"


_SHAPE_SYNONYMS = {"ball": ("ball", "ball", "circle"), "square": ("square", "square", "box"),
                   "triangle": ("triangle",)}
_SPEED_SYNONYMS = {"slow": ("slowly", "slowly", "gently"), "fast": ("quickly", "quickly", "fast", "rapidly")}
_MOTION_PHRASES = {
    "left": ("moving {s} to the left", "moves {s} to the left", "{s} moving left", "drifting {s} leftwards",
             "travelling {s} to the left", "slides {s} left"),
    "right": ("moving {s} to the right", "moves {s} to the right", "{s} moving right",
              "drifting {s} rightwards", "travelling {s} to the right", "slides {s} right"),
    "up": ("moving {s} up", "moves {s} upwards", "{s} rising", "floating {s} up", "rises {s}",
           "travelling {s} upward"),
    "down": ("moving {s} down", "moves {s} downwards", "{s} falling", "sinking {s} down", "falls {s}",
             "travelling {s} downward"),
    "bouncing": ("bouncing {s}", "bounces {s} off the walls", "{s} bouncing around", "bouncing {s} diagonally",
                 "that bounces {s} around the frame"),
    "still": ("standing still", "resting", "sitting still", "staying still", "that is stationary"),
}
_BACKGROUND_PHRASES = ("on a {b} background", "on a {b} background", "over a {b} background",
                       "against a {b} backdrop", "in front of a plain {b} background", "on {b}")


def phrase(scene: Scene, rng: np.random.Generator) -> str:
    """A randomly worded prompt that :func:`parse_prompt` reads back as ``scene``.

    Varies synonyms, word order, capitalisation and punctuation; leaves out what the defaults
    supply (a black background, bouncing at normal speed) some of the time.
    """
    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    subjects = []
    for obj in scene.objects:
        shape = pick(_SHAPE_SYNONYMS[obj.shape])
        article = pick(("a", "a", "the"))
        if obj.motion == DEFAULT_MOTION and obj.speed == DEFAULT_SPEED and rng.random() < 0.3:
            subjects.append(f"{article} {obj.color} {shape}")
            continue
        speed = pick(_SPEED_SYNONYMS[obj.speed]) if obj.speed in _SPEED_SYNONYMS else ""
        motion = " ".join(pick(_MOTION_PHRASES[obj.motion]).format(s=speed).split())
        subjects.append(f"{article} {obj.color} {shape} {motion}")
    subject = " and ".join(subjects)
    background = scene.background
    if background == "gray" and rng.random() < 0.5:
        background = "grey"
    if scene.background == DEFAULT_BACKGROUND and rng.random() < 0.3:
        text = subject
    elif rng.random() < 0.2:
        setting = pick(_BACKGROUND_PHRASES[:-1]).format(b=background)
        text = f"{setting}, {subject}"
    else:
        text = f"{subject} {pick(_BACKGROUND_PHRASES).format(b=background)}"
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:] + "."
    return text


def random_scene(rng: np.random.Generator, *, two_objects_probability: float = 0.0) -> Scene:
    """A scene drawn from the vocabulary: colours, shapes, motions uniform; speeds 1:2:1 slow:normal:fast.

    The background is uniform over the backgrounds whose name differs from the object colours.
    With probability ``two_objects_probability`` the scene has a second object of another colour.

    Raises:
        ValueError: ``two_objects_probability`` is outside [0, 1].
    """
    _require(0.0 <= two_objects_probability <= 1.0,
             f"two_objects_probability={two_objects_probability!r} must be in [0, 1]")
    count = 2 if rng.random() < two_objects_probability else 1
    colors = [str(c) for c in rng.choice(list(OBJECT_COLORS), size=count, replace=False)]
    objects = []
    for color in colors:
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        speed = ("slow", "normal", "normal", "fast")[int(rng.integers(4))]
        objects.append(SceneObject(color=color, shape=SHAPES[int(rng.integers(len(SHAPES)))], motion=motion,
                                   speed=DEFAULT_SPEED if motion == "still" else speed))
    backgrounds = [b for b in BACKGROUND_COLORS if b not in colors]
    return Scene(background=backgrounds[int(rng.integers(len(backgrounds)))], objects=tuple(objects))


def random_prompt(rng: np.random.Generator, *, two_objects_probability: float = 0.0) -> str:
    """A randomly worded prompt of a :func:`random_scene` (training data)."""
    return phrase(random_scene(rng, two_objects_probability=two_objects_probability), rng)


# 50 single-object prompts: each colour and each background 10 times, each shape 16 or 17 times,
# each motion 8 or 9 times, speeds slow:normal:fast about 1:2:1 among moving objects; worded
# variously. Test ``test_eval_prompts_cover_the_vocabulary`` checks the counts.
EVAL_PROMPTS: tuple[str, ...] = (
    "a red ball moving to the left on a black background",
    "A green square moves slowly to the right over a white background.",
    "a blue triangle rising quickly on a gray background",
    "A yellow ball falling on a blue background.",
    "a white square bouncing on a green background",
    "a red triangle standing still on a white background",
    "A green ball drifts leftwards against a gray backdrop.",
    "a blue square moving quickly to the right on a black background",
    "a yellow triangle moving up on a green background",
    "A white ball moves slowly down over a gray background.",
    "a red square bouncing slowly on a blue background",
    "a green triangle resting on a black background",
    "A blue ball moving left over a white background.",
    "a yellow square moving to the right on a gray background",
    "a white triangle moving up quickly on a blue background",
    "A red ball sinks down on a green background.",
    "a green square bouncing around on a blue background",
    "a blue triangle standing still on a gray background",
    "A yellow ball moves quickly to the left on a black background.",
    "a white square slowly moving right on a green background",
    "a red triangle moving up on a black background",
    "A green ball falling quickly over a white background.",
    "a blue square bouncing off the walls on a green background",
    "a yellow triangle that is stationary on a white background",
    "A white ball moving to the left on a gray background.",
    "a red square moving quickly to the right on a gray background",
    "a green triangle slowly rising on a blue background",
    "A blue ball moving down on a black background.",
    "a yellow square bouncing quickly on a blue background",
    "a white triangle sitting still on a green background",
    "A red ball moving slowly to the left over a white background.",
    "a green square moving right on a black background",
    "a blue triangle moving up on a white background",
    "A yellow ball moves down quickly against a green backdrop.",
    "a white square bouncing on a black background",
    "a red triangle standing still on a gray background",
    "A green ball moving to the left on a blue background.",
    "a blue square moving slowly to the right on a green background",
    "a yellow triangle rising on a black background",
    "A white ball falling on a blue background.",
    "a red square bouncing on a green background",
    "a green triangle resting on a white background",
    "A blue ball moves quickly left on a green background.",
    "a yellow square moving to the right on a white background",
    "a white triangle moving slowly up on a gray background",
    "A red ball moving down on a blue background.",
    "a green square bouncing slowly on a gray background",
    "a blue triangle standing still on a black background",
    "A yellow circle bouncing on a white background.",
    "a white box moving up on a blue background",
)


# --- rendering -----------------------------------------------------------------------------------

def _check_size(num_frames: int, height: int, width: int) -> None:
    _require(isinstance(num_frames, (int, np.integer)) and not isinstance(num_frames, bool) and num_frames >= 1,
             f"num_frames={num_frames!r} must be an int >= 1")
    for name, value in (("height", height), ("width", width)):
        _require(isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 32
                 and value % 16 == 0, f"{name}={value!r} must be a multiple of 16 and >= 32")


def size_scale(height: int, width: int) -> float:
    """How much object sizes and speeds scale at ``height x width`` relative to 64 x 96."""
    return min(height / REFERENCE_HEIGHT, width / REFERENCE_WIDTH)


def object_half_extents_px(shape: str, scale: float) -> tuple[float, float]:
    """Half width and half height of a shape's bounding box, in pixels."""
    half = SHAPE_SIZES_PX[shape] * scale / 2
    return half, half


def _reflect(position_px: np.ndarray, low_px: float, high_px: float) -> np.ndarray:
    """Fold an unbounded straight-line position into [low, high]: a wall reflection in closed form."""
    span = high_px - low_px
    folded = np.mod(position_px - low_px, 2 * span)
    return low_px + np.where(folded > span, 2 * span - folded, folded)


def trajectories(scene: Scene, num_frames: int, *, height: int = REFERENCE_HEIGHT,
                 width: int = REFERENCE_WIDTH, seed: int | None = 0,
                 start_px: tuple[float, float] | None = None) -> np.ndarray:
    """Bounding-box centres of every object in every frame, ``[N, T, 2]`` (x, y) in pixels.

    The seed picks each object's start (uniform over where it fits; for left/right/up/down, in the
    half of its travel that leaves the longer run ahead) and, for "bouncing", one of the four
    diagonals. ``seed=None`` is the canonical start the demo model is trained on, a function of
    the motion alone: left/right/up/down from the far end of the travel, on the frame's centre
    line; bouncing from the centre towards the lower right; still at the centre. ``start_px``
    ``(x, y)``: the first object starts there instead (moved inside the walls if it does not
    fit; bouncing towards the lower right). Positions follow ``start + velocity * t`` folded at
    the walls.
    """
    _check_size(num_frames, height, width)
    canonical = seed is None
    rng = np.random.default_rng(0 if canonical else seed)
    scale = size_scale(height, width)
    t = np.arange(num_frames, dtype=np.float64)
    out = np.empty((len(scene.objects), num_frames, 2), dtype=np.float64)
    for n, obj in enumerate(scene.objects):
        half_w, half_h = object_half_extents_px(obj.shape, scale)
        x_low, x_high, y_low, y_high = half_w, width - half_w, half_h, height - half_h
        u_x, u_y = rng.random(2)
        diagonal = rng.integers(4)
        speed = 0.0 if obj.motion == "still" else SPEEDS_PX_PER_FRAME[obj.speed] * scale
        if canonical:  # the centre; left/right/up/down start at the far end of their travel
            u_x = u_y = 0.5
            diagonal = 3
            if obj.motion in ("left", "right"):
                u_x = 0.0 if obj.motion == "right" else 1.0
            elif obj.motion in ("up", "down"):
                u_y = 0.0 if obj.motion == "down" else 1.0
        placed = start_px is not None and n == 0
        if placed:
            diagonal = 3
        x0 = x_low + u_x * (x_high - x_low)
        y0 = y_low + u_y * (y_high - y_low)
        vx = vy = 0.0
        if obj.motion in ("left", "right"):
            vx = speed if obj.motion == "right" else -speed
            if not canonical and not placed:
                x0 = x_low + (0.5 * u_x if vx > 0 else 0.5 + 0.5 * u_x) * (x_high - x_low)
        elif obj.motion in ("up", "down"):
            vy = speed if obj.motion == "down" else -speed
            if not canonical and not placed:
                y0 = y_low + (0.5 * u_y if vy > 0 else 0.5 + 0.5 * u_y) * (y_high - y_low)
        elif obj.motion == "bouncing":
            vx = speed / np.sqrt(2.0) * (1 if diagonal & 1 else -1)
            vy = speed / np.sqrt(2.0) * (1 if diagonal & 2 else -1)
        if placed:
            x0 = float(np.clip(start_px[0], x_low, x_high))
            y0 = float(np.clip(start_px[1], y_low, y_high))
        out[n, :, 0] = _reflect(x0 + vx * t, x_low, x_high)
        out[n, :, 1] = _reflect(y0 + vy * t, y_low, y_high)
    return out


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, scale: float) -> np.ndarray:
    """Fraction of each pixel inside the shape, from a signed distance (1 px anti-aliasing ramp).

    ``dx``, ``dy``: pixel centre minus the object's centre, broadcastable to ``[T, H, W]``.
    """
    size = SHAPE_SIZES_PX[shape] * scale
    if shape == "ball":
        inside_px = size / 2 - np.sqrt(dx * dx + dy * dy)
    elif shape == "square":
        inside_px = size / 2 - np.maximum(np.abs(dx), np.abs(dy))
    else:
        half_base = size / 2
        to_base = size / 2 - dy
        # Distance to the slanted sides of the apex-up isosceles triangle (apex at dy = -size / 2).
        to_side = (half_base * (dy + size / 2) / size - np.abs(dx)) * size / np.hypot(size, half_base)
        inside_px = np.minimum(to_base, to_side)
    return np.clip(inside_px + 0.5, 0.0, 1.0)


def render(scene: Scene, num_frames: int, *, height: int = REFERENCE_HEIGHT, width: int = REFERENCE_WIDTH,
           seed: int | None = 0, start_px: tuple[float, float] | None = None) -> np.ndarray:
    """Render ``scene`` for ``num_frames`` frames: uint8 RGB ``[T, H, W, 3]``, deterministic per seed
    (``None``: the canonical start; ``start_px``: the first object's start; see :func:`trajectories`).

    ``scene`` may also be a prompt string (read with :func:`parse_prompt`).

    Raises:
        ValueError: ``num_frames`` < 1, or ``height`` / ``width`` not a multiple of 16 of at least 32.
        TypeError: ``scene`` is neither a :class:`Scene` nor a string.
    """
    if isinstance(scene, str):
        scene = parse_prompt(scene)
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene or a prompt string, got {type(scene).__name__}")
    centres_px = trajectories(scene, num_frames, height=height, width=width, seed=seed, start_px=start_px)
    scale = size_scale(height, width)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[...] = BACKGROUND_COLORS[scene.background]
    frame_index = np.arange(num_frames)[:, None, None]
    # Each object is drawn in a square window around it (the rest of the frame is background), so
    # the work is T x window^2 rather than T x H x W.
    for n, obj in enumerate(scene.objects):
        window_px = int(np.ceil(SHAPE_SIZES_PX[obj.shape] * scale)) + 4
        cx, cy = centres_px[n, :, 0], centres_px[n, :, 1]
        top = np.clip(np.floor(cy - window_px / 2), 0, height - window_px).astype(np.int64)
        left = np.clip(np.floor(cx - window_px / 2), 0, width - window_px).astype(np.int64)
        rows = top[:, None, None] + np.arange(window_px)[None, :, None]
        cols = left[:, None, None] + np.arange(window_px)[None, None, :]
        dy = (rows + 0.5 - cy[:, None, None]).astype(np.float32)
        dx = (cols + 0.5 - cx[:, None, None]).astype(np.float32)
        alpha = _coverage(obj.shape, dx, dy, scale)[..., None]
        window = frames[frame_index, rows, cols].astype(np.float32)
        window += alpha * (np.asarray(OBJECT_COLORS[obj.color], dtype=np.float32) - window)
        frames[frame_index, rows, cols] = np.clip(np.rint(window), 0, 255).astype(np.uint8)
    return frames
