"""The demo world and its evaluator: prompts parse as documented (unknown words ignored, defaults
fill gaps, colour conflicts settled), renders are deterministic and their motion lawful (constant
velocity, reflection at the walls, always inside the frame), and the evaluator reads the world's
own clips back, clean and degraded, while scoring wrong clips low."""

from __future__ import annotations

import collections
import time

import numpy as np
import pytest

from memrope.runtime.demo.evaluate import ObjectReport, SceneReport, degrade, evaluate, score
from memrope.runtime.demo.world import (
    BACKGROUND_COLORS,
    DEFAULT_SCENE,
    EVAL_PROMPTS,
    MOTIONS,
    OBJECT_COLORS,
    REFERENCE_HEIGHT,
    REFERENCE_WIDTH,
    SHAPE_SIZES_PX,
    SHAPES,
    SPEEDS_PX_PER_FRAME,
    Scene,
    SceneObject,
    describe,
    object_half_extents_px,
    parse_prompt,
    phrase,
    random_prompt,
    random_scene,
    render,
    trajectories,
)

CLIP_FRAMES = 24  # 1.5 s at 16 fps: long enough for the evaluator's 6-frame direction and 4-frame lag
ATTRIBUTES = ("background", "color", "shape", "motion")


def _scene(background="black", *objects) -> Scene:
    return Scene(background=background, objects=tuple(SceneObject(*o) for o in objects))


# --- prompts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, expected", [
    ("a red ball bouncing on a blue background", _scene("blue", ("red", "ball", "bouncing"))),
    ("A yellow square moves slowly to the left over a gray background.",
     _scene("gray", ("yellow", "square", "left", "slow"))),
    ("A GREEN Circle rising quickly against a grey backdrop!", _scene("gray", ("green", "ball", "up", "fast"))),
    ("the blue box is resting on white", _scene("white", ("blue", "square", "still"))),
    ("On a green background, a white triangle falls gently.", _scene("green", ("white", "triangle", "down", "slow"))),
    ("a shiny red ball happily bouncing around the cosmos on a lovely blue background",
     _scene("blue", ("red", "ball", "bouncing"))),
    ("a red square", _scene("black", ("red", "square", "bouncing"))),
    ("something moving to the right", _scene("black", ("white", "ball", "right"))),
    ("on a blue background", _scene("blue", ("white", "ball", "bouncing"))),
    ("a ball, red, moving left", _scene("black", ("red", "ball", "left"))),
    ("a still red box that is moving left", _scene("black", ("red", "square", "left"))),
    ("a red ball moving left and a slowly moving blue square on gray",
     _scene("gray", ("red", "ball", "left"), ("blue", "square", "bouncing", "slow"))),
    ("a red ball, a blue square and a green triangle", _scene("black", ("red", "ball"), ("blue", "square"))),
])
def test_parse_prompt_reads_ordinary_sentences(prompt, expected):
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize("prompt", ["", "   ", "hello world", "a dog running through a park at dusk", "42!"])
def test_a_prompt_naming_nothing_known_is_the_default_scene(prompt):
    assert parse_prompt(prompt) == DEFAULT_SCENE
    assert describe(DEFAULT_SCENE) == "a white ball bouncing on a black background"


def test_colour_conflicts_resolve_as_documented():
    # An explicit object colour wins; the background falls back to black.
    assert parse_prompt("a white ball on a white background") == _scene("black", ("white", "ball"))
    assert parse_prompt("a blue square on blue") == _scene("black", ("blue", "square"))
    # An unnamed object colour takes the first of white, red, yellow, green, blue still free.
    assert parse_prompt("a ball on a white background") == _scene("white", ("red", "ball"))
    assert parse_prompt("a white ball and a square on a white background") == \
        _scene("black", ("white", "ball"), ("red", "square"))
    # Two objects of one colour: the second takes the next free colour.
    assert parse_prompt("a red ball and a red square") == _scene("black", ("red", "ball"), ("white", "square"))
    # Background-only colours name nothing on an object; object-only colours nothing behind it.
    assert parse_prompt("a gray ball on a yellow background") == DEFAULT_SCENE


def test_parse_prompt_rejects_non_strings():
    with pytest.raises(TypeError, match="prompt must be a str"):
        parse_prompt(None)


def test_describe_and_random_phrasings_read_back_as_their_scene():
    rng = np.random.default_rng(0)
    phrasings = set()
    for _ in range(600):
        scene = random_scene(rng, two_objects_probability=0.3)
        assert parse_prompt(describe(scene)) == scene
        text = phrase(scene, rng)
        phrasings.add(text)
        assert parse_prompt(text) == scene, (text, describe(scene))
    assert len(phrasings) > 550
    assert isinstance(random_prompt(rng), str)


def test_random_scenes_cover_the_vocabulary_and_never_conflict():
    rng = np.random.default_rng(1)
    seen = collections.defaultdict(set)
    for _ in range(400):
        scene = random_scene(rng, two_objects_probability=0.5)
        seen["background"].add(scene.background)
        for obj in scene.objects:
            seen["color"].add(obj.color)
            seen["shape"].add(obj.shape)
            seen["motion"].add(obj.motion)
            seen["speed"].add(obj.speed)
        seen["count"].add(len(scene.objects))
    assert seen == {"background": set(BACKGROUND_COLORS), "color": set(OBJECT_COLORS), "shape": set(SHAPES),
                    "motion": set(MOTIONS), "speed": set(SPEEDS_PX_PER_FRAME), "count": {1, 2}}
    assert all(len(random_scene(rng).objects) == 1 for _ in range(50))
    with pytest.raises(ValueError, match="two_objects_probability=1.5"):
        random_scene(rng, two_objects_probability=1.5)


def test_eval_prompts_cover_the_vocabulary():
    assert len(EVAL_PROMPTS) == 50 and len(set(EVAL_PROMPTS)) == 50
    scenes = [parse_prompt(p) for p in EVAL_PROMPTS]
    assert all(len(s.objects) == 1 for s in scenes)
    objects = [s.objects[0] for s in scenes]
    assert collections.Counter(s.background for s in scenes) == dict.fromkeys(BACKGROUND_COLORS, 10)
    assert collections.Counter(o.color for o in objects) == dict.fromkeys(OBJECT_COLORS, 10)
    assert sorted(collections.Counter(o.shape for o in objects).values()) == [16, 17, 17]
    assert set(collections.Counter(o.motion for o in objects).values()) <= {8, 9}
    assert len({o.motion for o in objects}) == len(MOTIONS)
    speeds = collections.Counter(o.speed for o in objects if o.motion != "still")
    assert speeds["normal"] > speeds["slow"] >= 8 and speeds["fast"] >= 8


@pytest.mark.parametrize("build, message", [
    (lambda: SceneObject(color="black"), r"SceneObject.color='black' is not one of"),
    (lambda: SceneObject(shape="star"), r"SceneObject.shape='star'"),
    (lambda: SceneObject(motion="spinning"), r"SceneObject.motion='spinning'"),
    (lambda: SceneObject(speed="warp"), r"SceneObject.speed='warp'"),
    (lambda: SceneObject(motion="still", speed="fast"), r"still object's speed must be 'normal'"),
    (lambda: Scene(background="purple"), r"Scene.background='purple'"),
    (lambda: Scene(objects=()), r"has 0 objects; a scene has 1 to 2"),
    (lambda: Scene(objects=(SceneObject(),) * 3), r"has 3 objects"),
    (lambda: Scene(objects=[SceneObject()]), r"must be a tuple of SceneObject"),
    (lambda: Scene(objects=(SceneObject("red"), SceneObject("red", "square"))), r"must be distinct"),
    (lambda: Scene(background="white", objects=(SceneObject("white"),)), r"Scene.background='white' equals"),
])
def test_invalid_scenes_are_refused_naming_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# --- rendering -----------------------------------------------------------------------------------

def test_render_is_deterministic_per_prompt_and_seed():
    prompt = "a yellow triangle bouncing quickly on a blue background"
    frames = render(parse_prompt(prompt), 20, seed=3)
    assert frames.shape == (20, 64, 96, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, render(prompt, 20, seed=3))
    assert not np.array_equal(frames, render(prompt, 20, seed=4))
    # The first frames of a longer render are the shorter render (chunking changes nothing).
    assert np.array_equal(render(prompt, 300, seed=3)[:20], frames)
    corner = frames[:, 0, 0]
    assert np.all(corner == BACKGROUND_COLORS["blue"])


@pytest.mark.parametrize("height, width", [(32, 48), (128, 192), (64, 64), (96, 64)])
def test_render_other_sizes_scale_the_objects(height, width):
    frames = render("a red square standing still", 2, height=height, width=width)
    assert frames.shape == (2, height, width, 3)
    area_px = np.count_nonzero(np.all(frames[0] == OBJECT_COLORS["red"], axis=-1))
    scale = min(height / 64, width / 96)
    assert abs(area_px - (14 * scale) ** 2) <= 4 * 14 * scale


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_frames=0), "num_frames=0 must be an int >= 1"),
    (dict(num_frames=2.0), "num_frames=2.0"),
    (dict(height=72), "height=72 must be a multiple of 16 and >= 32"),
    (dict(width=16), "width=16 must be a multiple of 16 and >= 32"),
])
def test_render_refuses_bad_sizes(kwargs, message):
    args = dict(num_frames=4) | kwargs
    with pytest.raises(ValueError, match=message):
        render(DEFAULT_SCENE, args.pop("num_frames"), **args)


def test_render_refuses_other_scene_types():
    with pytest.raises(TypeError, match="scene must be a Scene or a prompt string"):
        render(3, 4)


def test_render_1000_frames_is_fast():
    render(DEFAULT_SCENE, 8)
    start = time.perf_counter()
    render(parse_prompt("a red ball and a blue triangle on a gray background"), 1000)
    assert time.perf_counter() - start < 2.0


def _rendered_centres_px(frames: np.ndarray, color: str) -> np.ndarray:
    """Coverage-weighted centres ``[T, 2]`` (x, y) of one object from its rendered pixels."""
    background = frames[0, 0, 0].astype(np.float64)  # the corner is never covered at these starts
    direction = np.asarray(OBJECT_COLORS[color], dtype=np.float64) - background
    coverage = (frames.astype(np.float64) - background) @ direction / (direction @ direction)
    ys, xs = np.indices(frames.shape[1:3], dtype=np.float64) + 0.5
    mass = coverage.sum(axis=(1, 2))
    return np.stack([(coverage * xs).sum(axis=(1, 2)) / mass, (coverage * ys).sum(axis=(1, 2)) / mass], axis=1)


@pytest.mark.parametrize("motion, speed", [(m, s) for m in MOTIONS for s in SPEEDS_PX_PER_FRAME
                                           if m != "still" or s == "normal"])
def test_motion_is_lawful(motion, speed):
    scene = _scene("black", ("white", "square", motion, speed))
    num_frames, height, width = 160, 64, 96
    for seed in range(3):
        track = trajectories(scene, num_frames, height=height, width=width, seed=seed)[0]
        half_w, half_h = object_half_extents_px("square", 1.0)
        # Always wholly inside the frame, and reaching the walls when moving along that axis.
        assert np.all(track[:, 0] >= half_w - 1e-9) and np.all(track[:, 0] <= width - half_w + 1e-9)
        assert np.all(track[:, 1] >= half_h - 1e-9) and np.all(track[:, 1] <= height - half_h + 1e-9)
        velocity = np.diff(track, axis=0)
        speed_px = SPEEDS_PX_PER_FRAME[speed]
        expected_axis_px = {"left": (speed_px, 0), "right": (speed_px, 0), "up": (0, speed_px),
                            "down": (0, speed_px), "bouncing": (speed_px / np.sqrt(2),) * 2,
                            "still": (0, 0)}[motion]
        for axis in (0, 1):
            step = np.abs(velocity[:, axis])
            low, high = (half_w, width - half_w) if axis == 0 else (half_h, height - half_h)
            at_wall = (np.abs(track[:-1, axis] - low) < expected_axis_px[axis]) | \
                (np.abs(track[:-1, axis] - high) < expected_axis_px[axis]) | \
                (np.abs(track[1:, axis] - low) < expected_axis_px[axis]) | \
                (np.abs(track[1:, axis] - high) < expected_axis_px[axis])
            # Constant speed away from the walls; a reflection only at a wall, where it folds back.
            np.testing.assert_allclose(step[~at_wall], expected_axis_px[axis], atol=1e-9)
            assert np.all(step <= expected_axis_px[axis] + 1e-9)
            signs = np.sign(velocity[~at_wall, axis])
            flips = np.flatnonzero(signs[1:] * signs[:-1] < 0)
            assert len(flips) <= num_frames * expected_axis_px[axis] / (high - low - 1) + 1
            if expected_axis_px[axis] > 0 and motion != "bouncing":
                assert track[:, axis].min() - low < expected_axis_px[axis] + 1e-9 or \
                    high - track[:, axis].max() < expected_axis_px[axis] + 1e-9
        if motion in ("left", "right", "up", "down"):
            axis = 0 if motion in ("left", "right") else 1
            first_sign = np.sign(velocity[0, axis])
            assert first_sign == (1 if motion in ("right", "down") else -1)
            # Starts in the half of its travel that leaves the longer run ahead: >= 8.3 frames to a wall here.
            assert np.all(np.sign(velocity[:8, axis]) == first_sign)


def test_rendered_pixels_follow_the_trajectory():
    scene = _scene("green", ("yellow", "ball", "bouncing", "fast"))
    frames = render(scene, 120, seed=5)
    track = trajectories(scene, 120, seed=5)[0]
    np.testing.assert_allclose(_rendered_centres_px(frames, "yellow"), track, atol=0.15)
    # The whole object shows in every frame, including frames at a wall.
    area_px = np.all(frames == OBJECT_COLORS["yellow"], axis=-1).sum(axis=(1, 2))
    assert area_px.min() >= 0.9 * area_px.max()


# --- evaluator -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_clips() -> list[tuple[Scene, int, np.ndarray]]:
    return [(parse_prompt(p), seed, render(parse_prompt(p), CLIP_FRAMES, seed=seed))
            for p in EVAL_PROMPTS for seed in (0, 1)]


@pytest.fixture(scope="module")
def eval_reports(eval_clips) -> list[SceneReport]:
    return [evaluate(frames) for _, _, frames in eval_clips]


def _accuracy(scored: list[dict]) -> dict[str, float]:
    return {key: float(np.mean([s[key] for s in scored])) for key in (*ATTRIBUTES, "overall")}


def test_evaluator_reads_the_worlds_clips(eval_clips, eval_reports):
    scored = [score(report, scene) for (scene, _, _), report in zip(eval_clips, eval_reports, strict=True)]
    accuracy = _accuracy(scored)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_evaluator_survives_blur_noise_and_jpeg(eval_clips):
    scored = []
    for n, (scene, seed, frames) in enumerate(eval_clips):
        # Every other clip also goes through JPEG at quality 50 (4:2:0 chroma).
        degraded = degrade(frames, blur_sigma_px=1.0, noise_std=8.0, jpeg_quality=50 if n % 2 else None,
                           seed=seed)
        scored.append(score(evaluate(degraded), scene))
    accuracy = _accuracy(scored)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_evaluator_measures_speed_and_two_objects():
    for speed, speed_px in SPEEDS_PX_PER_FRAME.items():
        report = evaluate(render(_scene("gray", ("red", "triangle", "right", speed)), CLIP_FRAMES))
        assert report.objects[0].speed_px_per_frame == pytest.approx(speed_px, rel=0.1)
    scene = _scene("blue", ("yellow", "square", "down"), ("white", "ball", "still"))
    report = evaluate(degrade(render(scene, CLIP_FRAMES, seed=2), blur_sigma_px=1.0, noise_std=8.0))
    assert score(report, scene) == {"background": True, "color": True, "shape": True, "motion": True,
                                    "count": True, "overall": 1.0}
    assert score(report, describe(scene))["overall"] == 1.0


def test_wrong_clips_score_low(eval_clips, eval_reports):
    swapped_colors = dict(zip(OBJECT_COLORS, list(OBJECT_COLORS)[1:] + list(OBJECT_COLORS)[:1], strict=True))
    wrong_color, mirrored_motion, mismatched = [], [], []
    for n, (scene, seed, frames) in enumerate(eval_clips[::2]):
        obj = scene.objects[0]
        recoloured = Scene(background="black" if scene.background == swapped_colors[obj.color] else scene.background,
                           objects=(SceneObject(swapped_colors[obj.color], obj.shape, obj.motion, obj.speed),))
        wrong_color.append(score(evaluate(render(recoloured, CLIP_FRAMES, seed=seed)), scene)["color"])
        if obj.motion in ("left", "right", "up", "down"):
            # Mirrored across the axis of motion, the clip moves the other way from the first frame.
            mirrored = np.flip(frames, axis=2 if obj.motion in ("left", "right") else 1).copy()
            mirrored_motion.append(score(evaluate(mirrored), scene)["motion"])
        other = eval_clips[(2 * n + 14) % len(eval_clips)][0]
        mismatched.append(score(eval_reports[2 * n], other)["overall"])
    assert not any(wrong_color)
    assert len(mirrored_motion) >= 16 and not any(mirrored_motion)
    assert np.mean(mismatched) <= 0.5
    frozen = np.repeat(eval_clips[0][2][:1], CLIP_FRAMES, axis=0)
    assert evaluate(frozen).objects[0].motion == "still"
    blank = np.zeros((CLIP_FRAMES, 64, 96, 3), dtype=np.uint8)
    report = evaluate(blank)
    assert report.objects == () and report.background == "black"
    assert score(report, DEFAULT_SCENE) == {"background": True, "color": False, "shape": False, "motion": False,
                                            "count": False, "overall": 0.25}


def test_score_pairs_objects_and_counts():
    scene = _scene("black", ("red", "ball", "left"), ("blue", "square", "up"))
    seen_red = ObjectReport("red", "ball", "left", 200.0, 0.0, 1.0, 1.5, 24)
    seen_blue = ObjectReport("blue", "triangle", "up", 160.0, 0.5, 1.0, 1.5, 24)
    both = SceneReport("black", (0.0, 0.0, 0.0), (seen_blue, seen_red), 24)
    assert score(both, scene) == {"background": True, "color": True, "shape": False, "motion": True,
                                  "count": True, "overall": 6 / 7}
    one = SceneReport("gray", (128.0, 128.0, 128.0), (seen_red,), 24)
    assert score(one, scene) == {"background": False, "color": False, "shape": False, "motion": False,
                                 "count": False, "overall": 3 / 7}
    with pytest.raises(TypeError, match="scene must be a Scene or a prompt string"):
        score(one, 5)


@pytest.mark.parametrize("frames, error, message", [
    ([[0]], TypeError, "frames must be a uint8 numpy array"),
    (np.zeros((2, 8, 8, 3), dtype=np.float32), ValueError, "frames must be uint8, got float32"),
    (np.zeros((8, 8, 3), dtype=np.uint8), ValueError, r"shape \[8, 8, 3\], expected \[T, H, W, 3\]"),
    (np.zeros((0, 8, 8, 3), dtype=np.uint8), ValueError, "expected"),
])
def test_evaluate_refuses_bad_frames(frames, error, message):
    with pytest.raises(error, match=message):
        evaluate(frames)


def test_degrade_is_deterministic_and_checks_its_arguments():
    frames = render("a red ball on a blue background", 4, seed=1)
    once = degrade(frames, blur_sigma_px=1.0, noise_std=8.0, jpeg_quality=50, seed=2)
    assert once.dtype == np.uint8 and once.shape == frames.shape
    assert np.array_equal(once, degrade(frames, blur_sigma_px=1.0, noise_std=8.0, jpeg_quality=50, seed=2))
    assert not np.array_equal(once, degrade(frames, blur_sigma_px=1.0, noise_std=8.0, jpeg_quality=50, seed=3))
    assert np.array_equal(degrade(frames), frames)
    noisy = degrade(frames, noise_std=8.0).astype(np.float64) - frames
    assert 6.5 < noisy[frames[..., 0] > 16].std() < 9.0  # clipping at 0 trims the rest
    # Flat areas survive JPEG at quality 90 almost unchanged; edges move (4:2:0 chroma).
    jpeg = degrade(frames, jpeg_quality=90).astype(np.int64)
    assert np.abs(jpeg[:, :8, :8] - frames[:, :8, :8]).max() <= 2
    odd = np.zeros((1, 20, 28, 3), dtype=np.uint8)
    assert degrade(odd, blur_sigma_px=1.0, jpeg_quality=50).shape == odd.shape
    for kwargs, message in [(dict(blur_sigma_px=-1.0), "blur_sigma_px=-1.0 must be >= 0"),
                            (dict(noise_std=-2.0), "noise_std=-2.0 must be >= 0"),
                            (dict(jpeg_quality=0), "jpeg_quality=0 must be in 1..100")]:
        with pytest.raises(ValueError, match=message):
            degrade(frames, **kwargs)


@pytest.mark.parametrize("motion, start", [("right", "left edge"), ("left", "right edge"), ("down", "top edge"),
                                           ("up", "bottom edge"), ("bouncing", "centre"), ("still", "centre")])
def test_the_canonical_start_depends_on_the_motion_alone(motion, start):
    # seed=None: the start the demo model is trained on, the same for every colour, shape and background.
    scenes = [Scene(background=b, objects=(SceneObject(color=c, shape=s, motion=motion),))
              for b, c, s in (("black", "red", "ball"), ("white", "blue", "triangle"))]
    starts = [trajectories(scene, 2, seed=None)[0, 0] for scene in scenes]
    half = SHAPE_SIZES_PX["ball"] / 2
    x, y = starts[0]
    expected = {"left edge": (half, REFERENCE_HEIGHT / 2), "right edge": (REFERENCE_WIDTH - half, REFERENCE_HEIGHT / 2),
                "top edge": (REFERENCE_WIDTH / 2, half), "bottom edge": (REFERENCE_WIDTH / 2, REFERENCE_HEIGHT - half),
                "centre": (REFERENCE_WIDTH / 2, REFERENCE_HEIGHT / 2)}[start]
    assert (x, y) == pytest.approx(expected)
    assert starts[1][0] == pytest.approx(REFERENCE_WIDTH / 2) or start != "centre"
    assert np.array_equal(render(scenes[0], 9, seed=None), render(scenes[0], 9, seed=None))
    assert not np.array_equal(render(scenes[0], 9, seed=None), render(scenes[0], 9, seed=3))
