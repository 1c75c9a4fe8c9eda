"""Scene evaluator for the demo world: what a clip shows, recovered with classical image processing.

Owns reading decoded frames back into a :class:`SceneReport` (background colour, and per object
its colour, shape and motion), scoring a report against a scene or prompt (:func:`score`), and
the degradations used to test that the evaluator survives a small VAE's output (:func:`degrade`:
Gaussian blur, Gaussian noise, JPEG-like 8 x 8 DCT quantisation with 4:2:0 chroma). Does not own
the vocabulary, colours or rendering rules (``memrope.runtime.demo.world``).

Method (docs/demo_world.md has the measured accuracy):

1. Background: the per-channel median of the pixels of up to 16 evenly spaced frames (objects
   cover a few percent of a frame), named by the nearest background colour.
2. Colour: each pixel is unmixed against every object colour ``c`` as ``bg + a (c - bg)``; the
   colour with the smallest residual labels the pixel and ``a`` is its coverage. Blurred edges are
   mixtures of object and background, so they are labelled by the object they belong to. Pixels
   with coverage >= 0.5 whose four neighbours have it too are cores; a colour whose cores number
   at least 12 px per frame (at 64 x 96) and a quarter of the largest colour's is an object (at
   most two). Everything below looks only inside each frame's box around the object's cores
   (grown by 5 px), so noise elsewhere in the frame neither adds objects nor moves them.
3. Shape, from coverage-weighted cumulants of the object's pixels in the frames where it shows at
   least 75% of its typical area (so frames where the other object hides it are skipped). Blur adds
   a Gaussian, whose third and fourth cumulants are zero, so these survive it: the asymmetry, the
   largest third cumulant over four directions divided by (coverage >= 0.5 area)^1.5 (0 for ball
   and square, 0.022 for the triangle; "triangle" at >= 0.01), and the ratio of the fourth
   cumulant along the axes to that along the diagonals (ball 1, square 2, a square turned 45
   degrees 0.5; "square" at >= 1.22 or <= 1 / 1.22). Medians over up to 8 frames.
4. Motion, from the coverage-weighted centroid track over the frames showing at least 60% of the
   typical area (interpolated across the rest): per-axis speed is the median displacement
   over 4-frame lags. Both axes below 0.2 px/frame (at 64 x 96) is "still"; both moving with the
   slower axis at least 40% of the faster is "bouncing" (the world's bouncing is diagonal);
   otherwise the faster axis and the sign of the first 6 frames' displacement give left, right,
   up or down. Walls reflect every object, so a "moving left" clip may later move right: the
   initial direction is what the prompt names.

Frames are uint8 RGB ``[T, H, W, 3]``. Lengths in pixels, speeds in pixels per frame.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .world import (
    BACKGROUND_COLORS,
    MAX_OBJECTS,
    MOTIONS,
    OBJECT_COLORS,
    SHAPES,
    Scene,
    parse_prompt,
    size_scale,
)

# Clean renders give asymmetry 0 / 0 / 0.022 and kurtosis ratio 1 / 2 / 1 for ball / square /
# triangle. Under blur (sigma 3 px) + noise (16) + JPEG (30) the per-clip medians stay apart:
# asymmetry <= 0.007 vs >= 0.013, kurtosis ratio <= 1.16 vs >= 1.27; the thresholds sit between.
TRIANGLE_MIN_ASYMMETRY = 0.01
SQUARE_MIN_KURTOSIS_RATIO = 1.22
_SHAPE_WINDOW_PAD_PX = 5.0  # at 64 x 96; holds a sigma-2 blurred edge's tail
STILL_SPEED_PX_PER_FRAME = 0.2  # at 64 x 96; the world's slowest per-axis speed is 0.53
DIAGONAL_RATIO = 0.4
VISIBLE_AREA_FRACTION = 0.6
MIN_OBJECT_PX_PER_FRAME = 12.0  # at 64 x 96; the world's objects cover 160 to 200 px
_MIN_CONTRAST = 40.0  # an object colour this close to the background cannot be told from it
_MIN_ALPHA = 0.15  # coverage below this is mostly noise: such pixels count as background
_SPEED_LAG_FRAMES = 4
_DIRECTION_FRAMES = 6  # the world's earliest first reflection is 7.7 frames in (fast triangle, vertical)
_BACKGROUND_SAMPLE_FRAMES = 16
_SHAPE_SAMPLE_FRAMES = 8
_CHUNK_FRAMES = 64


@dataclass(frozen=True)
class ObjectReport:
    """One object as seen: colour, shape, motion names, and the measurements behind them.

    ``area_px``: typical (90th percentile) pixels at coverage >= 0.5; ``asymmetry`` and
    ``kurtosis_ratio``: the median shape features (module docstring); ``speed_px_per_frame``: length
    of the median per-axis velocity; ``visible_frames``: frames where at least 60% of the typical
    area shows (the frames the motion is read from).
    """

    color: str
    shape: str
    motion: str
    area_px: float
    asymmetry: float
    kurtosis_ratio: float
    speed_px_per_frame: float
    visible_frames: int

    def __post_init__(self) -> None:
        if self.color not in OBJECT_COLORS or self.shape not in SHAPES or self.motion not in MOTIONS:
            raise ValueError(f"ObjectReport color={self.color!r} shape={self.shape!r} motion={self.motion!r}: "
                             f"each must be in the world's vocabulary")


@dataclass(frozen=True)
class SceneReport:
    """What :func:`evaluate` saw: background name and measured RGB, and 0 to 2 objects (largest first)."""

    background: str
    background_rgb: tuple[float, float, float]
    objects: tuple[ObjectReport, ...]
    num_frames: int

    def __post_init__(self) -> None:
        if self.background not in BACKGROUND_COLORS:
            raise ValueError(f"SceneReport.background={self.background!r} is not one of {tuple(BACKGROUND_COLORS)}")
        if len(self.objects) > MAX_OBJECTS:
            raise ValueError(f"SceneReport.objects has {len(self.objects)} objects; at most {MAX_OBJECTS}")


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"frames must be a uint8 numpy array [T, H, W, 3], got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[3] != 3 or min(frames.shape[:3]) < 1:
        raise ValueError(f"frames have shape {list(frames.shape)}, expected [T, H, W, 3] with T, H, W >= 1")
    return frames


def _median_rgb(pixels: np.ndarray) -> np.ndarray:
    """Per-channel median of uint8 ``[P, 3]`` pixels, from a histogram (no sort)."""
    median = np.empty(3, dtype=np.float64)
    for channel in range(3):
        cumulative = np.cumsum(np.bincount(pixels[:, channel], minlength=256))
        median[channel] = np.searchsorted(cumulative, (pixels.shape[0] + 1) // 2)
    return median


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(np.argmin(distances))]


def _unmix(frames: np.ndarray, background_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Label every pixel with its best-fitting object colour and coverage.

    Returns ``label [T, H, W]`` int8 (index into the returned colour names, -1 where no colour
    fits), ``alpha [T, H, W]`` float32 coverage in [0, 1], and the candidate colour names.
    """
    names = [n for n, c in OBJECT_COLORS.items()
             if np.linalg.norm(np.asarray(c, dtype=np.float64) - background_rgb) >= _MIN_CONTRAST]
    num_frames, height, width, _ = frames.shape
    label = np.full((num_frames, height, width), -1, dtype=np.int8)
    alpha = np.zeros((num_frames, height, width), dtype=np.float32)
    if not names:
        return label, alpha, names
    background = background_rgb.astype(np.float32)
    directions = np.asarray([OBJECT_COLORS[n] for n in names], dtype=np.float32) - background
    direction_sq = (directions ** 2).sum(axis=1)
    direction_len = np.sqrt(direction_sq)
    # A pixel nearer the background than this has coverage < _MIN_ALPHA for every colour; skipping
    # it (most of the frame) changes nothing downstream and saves most of the work.
    near_sq = float((_MIN_ALPHA * direction_len.min()) ** 2)
    for start in range(0, num_frames, _CHUNK_FRAMES):
        diff = frames[start:start + _CHUNK_FRAMES].astype(np.float32) - background
        distance_sq = (diff ** 2).sum(axis=-1)
        where = np.nonzero(distance_sq >= near_sq)
        if where[0].size == 0:
            continue
        diff = diff[where]  # [P, 3]
        dots = diff @ directions.T  # [P, K]
        a = np.clip(dots / direction_sq, 0.0, 1.0)
        residual_sq = distance_sq[where][:, None] - 2 * a * dots + a * a * direction_sq
        best = np.argmin(residual_sq, axis=1)
        pick = np.arange(best.size)
        best_residual = np.sqrt(np.maximum(residual_sq[pick, best], 0.0))
        # Off every mixing line (not a blend of one object colour with the background): unlabelled.
        fits = best_residual <= 0.4 * direction_len[best] + 24.0
        chunk_where = (where[0][fits] + start, where[1][fits], where[2][fits])
        label[chunk_where] = best[fits]
        alpha[chunk_where] = a[pick, best][fits]
    return label, alpha, names


def _erode(mask: np.ndarray) -> np.ndarray:
    """``[T, H, W]`` bool: set where ``mask`` and its four in-frame neighbours are all set."""
    core = mask.copy()
    core[:, 1:] &= mask[:, :-1]
    core[:, :-1] &= mask[:, 1:]
    core[:, :, 1:] &= mask[:, :, :-1]
    core[:, :, :-1] &= mask[:, :, 1:]
    return core


def _windows(core: np.ndarray, pad_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Per frame, the bounding box of ``core [T, H, W]`` grown by ``pad_px``: ``[T, H, W]`` bool, and
    ``[T]`` whether the frame has any core at all (where not, its window is empty)."""
    _, height, width = core.shape
    pad = int(np.ceil(pad_px))
    rows_any = core.any(axis=2)
    cols_any = core.any(axis=1)
    has_core = rows_any.any(axis=1)
    top = np.argmax(rows_any, axis=1) - pad
    bottom = height - 1 - np.argmax(rows_any[:, ::-1], axis=1) + pad
    left = np.argmax(cols_any, axis=1) - pad
    right = width - 1 - np.argmax(cols_any[:, ::-1], axis=1) + pad
    rows = np.arange(height)[None, :]
    cols = np.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows <= bottom[:, None]) & has_core[:, None]
    in_cols = (cols >= left[:, None]) & (cols <= right[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :], has_core


def _shape_features(coverage: np.ndarray, pad_px: float) -> tuple[float, float]:
    """Asymmetry and kurtosis ratio of one frame's ``[H, W]`` coverage of one object (module docstring)."""
    solid = coverage >= 0.5
    rows = np.flatnonzero(solid.any(axis=1))
    cols = np.flatnonzero(solid.any(axis=0))
    if rows.size == 0:
        return float("nan"), float("nan")
    pad = int(np.ceil(pad_px))
    r0, c0 = max(rows[0] - pad, 0), max(cols[0] - pad, 0)
    window = coverage[r0:rows[-1] + pad + 1, c0:cols[-1] + pad + 1]
    weight = np.where(window >= _MIN_ALPHA, window, 0.0)
    ys, xs = np.indices(weight.shape, dtype=np.float64)
    mass = weight.sum()
    dx = xs - (weight * xs).sum() / mass
    dy = ys - (weight * ys).sum() / mass
    # Central moments E[dx^p dy^q], p + q in 2..4, in one contraction.
    moments = np.tensordot(np.stack([dx ** p * dy ** (k - p) for k in (2, 3, 4) for p in range(k, -1, -1)]),
                           weight, axes=2) / mass
    m2, m3, m4 = moments[:3], moments[3:7], moments[7:]
    third, kurtosis = [], []
    for c, s in ((1.0, 0.0), (0.0, 1.0), (np.sqrt(0.5), np.sqrt(0.5)), (np.sqrt(0.5), -np.sqrt(0.5))):
        # Moments of z = c dx + s dy by the binomial expansion.
        k2 = c * c * m2[0] + 2 * c * s * m2[1] + s * s * m2[2]
        k3 = c ** 3 * m3[0] + 3 * c * c * s * m3[1] + 3 * c * s * s * m3[2] + s ** 3 * m3[3]
        z4 = (c ** 4 * m4[0] + 4 * c ** 3 * s * m4[1] + 6 * c * c * s * s * m4[2] + 4 * c * s ** 3 * m4[3]
              + s ** 4 * m4[4])
        third.append(abs(k3))
        kurtosis.append(z4 - 3 * k2 * k2)
    diagonal = kurtosis[2] + kurtosis[3]
    ratio = (kurtosis[0] + kurtosis[1]) / diagonal if diagonal != 0 else float("nan")
    # Normalised by the solid area, not by the variance, which blur inflates.
    return float(max(third) / np.count_nonzero(window >= 0.5) ** 1.5), float(ratio)


def _classify_shape(asymmetry: float, kurtosis_ratio: float) -> str:
    if asymmetry >= TRIANGLE_MIN_ASYMMETRY:
        return "triangle"
    if kurtosis_ratio >= SQUARE_MIN_KURTOSIS_RATIO or 0 < kurtosis_ratio <= 1 / SQUARE_MIN_KURTOSIS_RATIO:
        return "square"
    return "ball"


def _classify_motion(centres_px: np.ndarray, visible: np.ndarray, scale: float) -> tuple[str, float]:
    """Motion name and speed from a ``[T, 2]`` centroid track (NaN-free where ``visible``)."""
    frames = np.flatnonzero(visible)
    if frames.size < 2:
        return "still", 0.0
    t = np.arange(frames[0], frames[-1] + 1)
    track = np.stack([np.interp(t, frames, centres_px[frames, axis]) for axis in (0, 1)], axis=1)
    lag = min(_SPEED_LAG_FRAMES, len(t) - 1)
    speed_xy = np.median(np.abs(track[lag:] - track[:-lag]), axis=0) / lag
    speed = float(np.hypot(*speed_xy))
    threshold = STILL_SPEED_PX_PER_FRAME * scale
    fast_axis = int(np.argmax(speed_xy))
    if speed_xy[fast_axis] < threshold:
        return "still", speed
    if speed_xy[1 - fast_axis] >= max(threshold, DIAGONAL_RATIO * speed_xy[fast_axis]):
        return "bouncing", speed
    head = min(_DIRECTION_FRAMES, len(t) - 1)
    step = track[head, fast_axis] - track[0, fast_axis]
    if fast_axis == 0:
        return ("right" if step > 0 else "left"), speed
    return ("down" if step > 0 else "up"), speed


def evaluate(frames: np.ndarray) -> SceneReport:
    """Recover the background, objects, shapes and motions shown in ``frames`` ``[T, H, W, 3]`` uint8.

    Raises:
        TypeError: ``frames`` is not a numpy array.
        ValueError: ``frames`` is not uint8 ``[T, H, W, 3]``.
    """
    frames = _check_frames(frames)
    num_frames, height, width, _ = frames.shape
    scale = size_scale(height, width)
    sample = np.unique(np.linspace(0, num_frames - 1, min(num_frames, _BACKGROUND_SAMPLE_FRAMES)).astype(int))
    background_rgb = _median_rgb(frames[sample].reshape(-1, 3))
    background = _nearest(background_rgb, BACKGROUND_COLORS)

    label, alpha, names = _unmix(frames, background_rgb)
    solid = alpha >= 0.5
    # Cores (solid pixels whose four neighbours are solid too) find objects; lone noise pixels are
    # never cores, so noise neither makes objects nor, through the windows below, moves them.
    cores = [_erode(solid & (label == k)) for k in range(len(names))]
    counts = np.asarray([np.count_nonzero(core) for core in cores], dtype=np.float64)
    min_count = max(MIN_OBJECT_PX_PER_FRAME * scale * scale * num_frames, 0.25 * counts.max(initial=0.0))
    kept = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] >= min_count and counts[k] > 0]
    objects = []
    ys = np.arange(height, dtype=np.float64)[None, :, None]
    xs = np.arange(width, dtype=np.float64)[None, None, :]
    for k in kept[:MAX_OBJECTS]:
        window, has_core = _windows(cores[k], _SHAPE_WINDOW_PAD_PX * scale)
        mine = (label == k) & window
        mask = solid & mine
        area_px = mask.sum(axis=(1, 2)).astype(np.float64)
        typical_px = float(np.percentile(area_px, 90))
        # A partly hidden object's centroid is pulled toward its visible part: track only frames
        # showing most of it, and interpolate across the rest.
        visible = (area_px >= VISIBLE_AREA_FRACTION * typical_px) & has_core
        weight = np.where(mine & (alpha >= 0.2), alpha, 0.0)
        total = weight.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            centres_px = np.stack([(weight * xs).sum(axis=(1, 2)) / total,
                                   (weight * ys).sum(axis=(1, 2)) / total], axis=1)
        visible &= total > 0
        whole = np.flatnonzero(area_px >= 0.75 * typical_px)
        whole = whole[np.unique(np.linspace(0, whole.size - 1, min(whole.size, _SHAPE_SAMPLE_FRAMES)).astype(int))]
        coverage = np.where(mine, alpha, 0.0)
        features = np.asarray([_shape_features(coverage[t], _SHAPE_WINDOW_PAD_PX * scale) for t in whole])
        asymmetry, kurtosis_ratio = (np.nanmedian(features, axis=0) if np.isfinite(features).any()
                                     else (float("nan"), float("nan")))
        shape = _classify_shape(float(asymmetry), float(kurtosis_ratio))
        motion, speed = _classify_motion(centres_px, visible, scale)
        objects.append(ObjectReport(color=names[k], shape=shape, motion=motion, area_px=typical_px,
                                    asymmetry=float(asymmetry), kurtosis_ratio=float(kurtosis_ratio),
                                    speed_px_per_frame=speed,
                                    visible_frames=int(visible.sum())))
    return SceneReport(background=background, background_rgb=tuple(float(v) for v in background_rgb),
                       objects=tuple(objects), num_frames=num_frames)


def score(report: SceneReport, scene: Scene | str) -> dict[str, float | bool]:
    """Compare a report with the scene (or prompt) it should show.

    Scene objects are paired with reported objects (at most one each) to maximise the attributes
    that agree. Returns booleans ``background``, ``color``, ``shape``, ``motion`` (each true when
    every scene object's attribute agrees), ``count`` (as many objects seen as the scene has), and
    ``overall``: the fraction of the ``1 + 3 * objects`` checks (background, then colour, shape and
    motion per scene object) that agree. Extra objects seen affect ``count`` only.

    Raises:
        TypeError: ``scene`` is neither a :class:`Scene` nor a string.
    """
    if isinstance(scene, str):
        scene = parse_prompt(scene)
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene or a prompt string, got {type(scene).__name__}")
    seen: list[ObjectReport | None] = [*report.objects, *([None] * len(scene.objects))]
    best: list[tuple[bool, bool, bool]] = []
    for order in itertools.permutations(range(len(seen)), len(scene.objects)):
        checks = [(got is not None and got.color == want.color, got is not None and got.shape == want.shape,
                   got is not None and got.motion == want.motion)
                  for want, got in zip(scene.objects, (seen[i] for i in order), strict=False)]
        if not best or sum(map(sum, checks)) > sum(map(sum, best)):
            best = checks
    background_ok = report.background == scene.background
    agreed = int(background_ok) + sum(map(sum, best))
    return {
        "background": background_ok,
        "color": all(c[0] for c in best),
        "shape": all(c[1] for c in best),
        "motion": all(c[2] for c in best),
        "count": len(report.objects) == len(scene.objects),
        "overall": agreed / (1 + 3 * len(scene.objects)),
    }


# --- degradations --------------------------------------------------------------------------------

# JPEG's example quantisation tables (ITU-T T.81 Annex K), luminance and chrominance.
_JPEG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64).reshape(8, 8)
_JPEG_CHROMA = np.full((8, 8), 99.0)
_JPEG_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def _dct_matrix() -> np.ndarray:
    k = np.arange(8)[:, None]
    n = np.arange(8)[None, :]
    basis = np.cos((2 * n + 1) * k * np.pi / 16) * np.sqrt(2 / 8)
    basis[0] /= np.sqrt(2)
    return basis


def _gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur over H and W of ``[T, H, W, C]`` float32, edges reflected."""
    radius = max(1, int(np.ceil(3 * sigma_px)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(image, pad, mode="reflect")
        length = image.shape[axis]
        out = np.zeros_like(image)
        for i, weight in enumerate(taps):
            out += weight * (padded[:, i:i + length] if axis == 1 else padded[:, :, i:i + length])
        image = out
    return image


def _jpeg_like(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG's lossy steps on ``[T, H, W, 3]`` float RGB: YCbCr, 4:2:0 chroma, 8 x 8 DCT quantisation."""
    num_frames, height, width, _ = image.shape
    pad_h, pad_w = -height % 16, -width % 16
    image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    h, w = image.shape[1:3]
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    basis = _dct_matrix().astype(np.float32)

    def quantise(plane: np.ndarray, table: np.ndarray) -> np.ndarray:
        step = np.clip(np.floor((table * scale + 50) / 100), 1, 255)
        t, ph, pw = plane.shape
        blocks = (plane - 128).reshape(t, ph // 8, 8, pw // 8, 8).transpose(0, 1, 3, 2, 4)  # [t, a, b, 8, 8]
        coeffs = basis @ blocks @ basis.T
        coeffs = np.round(coeffs / step) * step
        blocks = basis.T @ coeffs @ basis
        return blocks.transpose(0, 1, 3, 2, 4).reshape(t, ph, pw) + 128

    def subsample(plane: np.ndarray) -> np.ndarray:
        return plane.reshape(num_frames, h // 2, 2, w // 2, 2).mean(axis=(2, 4))

    y = quantise(y, _JPEG_LUMA)
    cb = np.repeat(np.repeat(quantise(subsample(cb), _JPEG_CHROMA), 2, axis=1), 2, axis=2)
    cr = np.repeat(np.repeat(quantise(subsample(cr), _JPEG_CHROMA), 2, axis=1), 2, axis=2)
    rgb = np.stack([y + 1.402 * (cr - 128),
                    y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], axis=-1)
    return rgb[:, :height, :width]


def degrade(frames: np.ndarray, *, blur_sigma_px: float = 0.0, noise_std: float = 0.0,
            jpeg_quality: int | None = None, seed: int = 0) -> np.ndarray:
    """Blur, add Gaussian noise, then JPEG-compress (in that order) uint8 ``[T, H, W, 3]`` frames.

    ``noise_std`` is in 8-bit levels; ``jpeg_quality`` in 1..100 (None skips it). Deterministic per seed.

    Raises:
        ValueError: a negative blur or noise, a quality outside 1..100, or frames not uint8 ``[T, H, W, 3]``.
    """
    frames = _check_frames(frames)
    if blur_sigma_px < 0:
        raise ValueError(f"blur_sigma_px={blur_sigma_px!r} must be >= 0")
    if noise_std < 0:
        raise ValueError(f"noise_std={noise_std!r} must be >= 0")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={jpeg_quality!r} must be in 1..100 or None")
    image = frames.astype(np.float32)
    if blur_sigma_px > 0:
        image = _gaussian_blur(image, blur_sigma_px)
    if noise_std > 0:
        image += np.float32(noise_std) * np.random.default_rng(seed).standard_normal(image.shape, dtype=np.float32)
    if jpeg_quality is not None:
        image = _jpeg_like(np.clip(image, 0, 255), jpeg_quality)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
