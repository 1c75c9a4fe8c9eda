"""Prompt timelines for ``memrope generate``: which prompt plays from which latent frame.

Owns: reading a timeline (our YAML list, or LongLive's interactive config + jsonl, both read
unchanged), checking it before any model is loaded (one-line ``ValueError`` naming the problem),
LongLive's index rule, and turning a timeline into the loop's scheduled
:class:`memrope.pipeline.PromptChange`s. Does not own encoding the text (``memrope.runtime.text``) or
what a switch does to the cache (``memrope.pipeline.BlockStream.set_prompt``).

Our timeline is a YAML list; ``frame`` is the latent frame where a prompt starts, the first at 0::

    - {frame: 0, prompt: "a red fox trotting through fresh snow at dawn"}
    - {frame: 40, prompt: "the fox stops and looks straight at the camera"}

LongLive's interactive mode keeps the same facts in two files: ``switch_frame_indices: 40, 80``
(an int or a comma string) in its config, and a jsonl with one ``{"prompts": [...]}`` per line
(one line per video; ``len(prompts) == len(switch_frame_indices) + 1``).

The index rule (LongLive's): a prompt starting at frame ``f`` takes effect at the first block
whose start frame is ``>= f``, i.e. block ``ceil(f / block_frames)``. With blocks of 3 latent
frames, 40 switches at frame 42.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RECACHE_CHOICES = ("none", "recent", "all")
MEMORY_CHOICES = ("keep", "reset")
INDEX_RULE = ("a prompt starting at latent frame F takes effect at the first block whose start frame is >= F "
              "(LongLive's rule): with blocks of 3 latent frames, 40 switches at frame 42")


@dataclass(frozen=True)
class PromptSegment:
    frame: int
    prompt: str


@dataclass(frozen=True)
class PromptTimeline:
    """Prompts in playing order, each from the latent frame ``frame`` on (the first from 0).

    ``recache_default``: what LongLive's config implies for ``--recache`` (``all`` when its
    ``global_sink`` is false, i.e. it recomputes the sink too), else ``None``.
    """

    segments: tuple[PromptSegment, ...]
    source: str
    recache_default: str | None = None

    def __post_init__(self) -> None:
        from memrope.io import shown

        where = self.source
        if not self.segments:
            raise ValueError(f"{where}: the timeline has no prompts")
        for i, seg in enumerate(self.segments):
            if isinstance(seg.frame, bool) or not isinstance(seg.frame, int):
                raise ValueError(f"{where}: entry {i} has frame {shown(seg.frame)}; expected an integer latent frame "
                                 "index")
            if seg.frame < 0:
                raise ValueError(f"{where}: entry {i} has a negative frame index ({seg.frame})")
            if not isinstance(seg.prompt, str):
                raise ValueError(f"{where}: entry {i} (frame {seg.frame}) has prompt {shown(seg.prompt, 60)} "
                                 f"({type(seg.prompt).__name__}); expected a non-empty string")
            if not seg.prompt.strip():
                raise ValueError(f"{where}: entry {i} (frame {seg.frame}) has an empty prompt; expected a "
                                 "non-empty string")
        if self.segments[0].frame != 0:
            raise ValueError(f"{where}: the first prompt must start at frame 0, not {self.segments[0].frame}")
        for i, (a, b) in enumerate(zip(self.segments, self.segments[1:], strict=False), start=1):
            if b.frame == a.frame:
                raise ValueError(f"{where}: frame {b.frame} is duplicated (entries {i - 1} and {i})")
            if b.frame < a.frame:
                raise ValueError(f"{where}: frame indices are not sorted: {a.frame} (entry {i - 1}) comes before "
                                 f"{b.frame} (entry {i})")

    @property
    def prompts(self) -> list[str]:
        return [seg.prompt for seg in self.segments]

    def start_blocks(self, block_frames: int) -> list[int]:
        """The block where each prompt takes effect (LongLive's rule, see the module doc)."""
        return [math.ceil(seg.frame / block_frames) for seg in self.segments]

    def check_length(self, num_frames: int, block_frames: int) -> None:
        """Raise ValueError if a prompt would never play: it takes effect at or past the end of a
        ``num_frames``-frame video, or at the same block as the next one."""
        starts = self.start_blocks(block_frames)
        for i, (seg, block) in enumerate(zip(self.segments, starts, strict=True)):
            if block * block_frames >= num_frames:
                raise ValueError(f"{self.source}: frame {seg.frame} (entry {i}) is past the end: it would take effect "
                                 f"at frame {block * block_frames}, and the video has {num_frames} latent frames")
        for i in range(1, len(starts)):
            if starts[i] == starts[i - 1]:
                raise ValueError(f"{self.source}: frames {self.segments[i - 1].frame} and {self.segments[i].frame} "
                                 f"both take effect at frame {starts[i] * block_frames} (blocks of {block_frames}), "
                                 f"so the prompt of entry {i - 1} would never play")

    def prompt_changes(self, embeds: Sequence[Any], block_frames: int, *, recache: str = "none",
                       memory: str = "keep", transition_blocks: int = 0) -> list:
        """The loop's scheduled changes: ``embeds[i]`` is prompt i's embedding (the first is the
        stream's initial prompt and is not a change)."""
        from memrope.pipeline import PromptChange

        if len(embeds) != len(self.segments):
            raise ValueError(f"{len(embeds)} embeddings for {len(self.segments)} prompts")
        starts = self.start_blocks(block_frames)
        return [PromptChange(block, e, recache=recache, memory=memory, transition_blocks=transition_blocks)
                for block, e in zip(starts[1:], embeds[1:], strict=True)]


def read_timeline_yaml(path: str | Path) -> PromptTimeline:
    """Our timeline format: a YAML list of ``{frame: int, prompt: str}``."""
    from memrope.io import read_yaml, shown

    path = Path(path)
    raw = read_yaml(path, "prompt timeline")
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a YAML list of {{frame: N, prompt: TEXT}} entries, "
                         f"got {type(raw).__name__}")
    segments = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) != {"frame", "prompt"}:
            keys = shown(sorted(map(str, entry))) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{path}: entry {i} must be {{frame: N, prompt: TEXT}}, got {keys}")
        segments.append(PromptSegment(entry["frame"], entry["prompt"]))
    return PromptTimeline(tuple(segments), str(path))


def parse_switch_indices(value: Any, source: str) -> list[int]:
    """LongLive's ``switch_frame_indices``: an int, a comma string ``"40, 80"`` or a list."""
    from memrope.io import shown

    if isinstance(value, bool) or not isinstance(value, (int, str, list)):
        raise ValueError(f"{source}: switch_frame_indices must be an integer, a comma string or a list, got "
                         f"{shown(value)}")
    items = value if isinstance(value, list) else str(value).split(",")
    indices = []
    for item in items:
        text = str(item).strip() if isinstance(item, (int, str)) else ""
        if isinstance(item, bool) or not text:
            raise ValueError(f"{source}: switch_frame_indices {shown(value)} has an empty or non-integer entry")
        try:
            indices.append(int(text))
        except ValueError:
            raise ValueError(f"{source}: switch_frame_indices entry {shown(text)} is not an integer") from None
    return indices


def read_longlive_prompts(jsonl: str | Path, switch_frame_indices: Sequence[int], line: int = 0,
                          global_sink: bool | None = None) -> PromptTimeline:
    """LongLive's interactive prompts: line ``line`` (0-based) of ``jsonl`` is ``{"prompts": [...]}``,
    prompt 0 from frame 0 and prompt ``i + 1`` from ``switch_frame_indices[i]``."""
    from memrope.io import parse_json, read_text

    jsonl = Path(jsonl)
    lines = [text for text in read_text(jsonl, "prompt file").splitlines() if text.strip()]
    if isinstance(line, bool) or not isinstance(line, int) or not 0 <= line < len(lines):
        raise ValueError(f"{jsonl} has {len(lines)} prompt lines; --prompts-line {line} is not one of them")
    where = f"{jsonl} line {line + 1}"
    record = parse_json(lines[line], where)
    prompts = record.get("prompts") if isinstance(record, dict) else None
    if not isinstance(prompts, list):
        raise ValueError(f'{where}: expected {{"prompts": [...]}} (LongLive\'s interactive format)')
    if len(prompts) != len(switch_frame_indices) + 1:
        raise ValueError(f"{where} has {len(prompts)} prompts for {len(switch_frame_indices)} switch_frame_indices; "
                         f"expected one more prompt than indices")
    frames = [0, *switch_frame_indices]
    recache = None if global_sink is None else ("recent" if global_sink else "all")
    return PromptTimeline(tuple(PromptSegment(f, p) for f, p in zip(frames, prompts, strict=False)), where, recache)


def interactive_keys(config: str | Path) -> dict[str, Any]:
    """The interactive-mode keys of a LongLive config (absent keys are left out)."""
    from memrope.io import read_yaml

    try:
        raw = read_yaml(config, "run config")
    except FileNotFoundError:
        return {}  # the CLI names every missing input at once, later
    if not isinstance(raw, dict):
        return {}
    return {k: raw[k] for k in ("switch_frame_indices", "data_path", "global_sink") if k in raw}


def _resolve_data_path(data_path: object, config: Path) -> Path:
    """LongLive resolves ``data_path`` against the folder it runs in; fall back to the config's."""
    from memrope.io import shown

    if not isinstance(data_path, str) or not 0 < len(data_path) <= 4096 or "\0" in data_path:
        raise ValueError(f"{config}: data_path must be the path of LongLive's prompt jsonl, got {shown(data_path)}")
    candidates = [Path(data_path), config.parent / data_path]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{config}: data_path {data_path} not found (looked in the current folder and next "
                            f"to the config); pass the jsonl with --prompts")


def add_timeline_args(parser: argparse.ArgumentParser) -> None:
    """The ``generate`` options for prompt changes."""
    group = parser.add_argument_group("prompt changes", f"The index rule: {INDEX_RULE}.")
    group.add_argument("--prompts", type=Path, metavar="FILE",
                       help="prompt timeline: a YAML list of {frame: F, prompt: TEXT} (F = latent frame where the "
                            "prompt starts, the first at 0), or LongLive's interactive .jsonl ({\"prompts\": [...]} "
                            "per line) with switch_frame_indices from --config. Without --prompts, a --config "
                            "holding switch_frame_indices and data_path (LongLive's interactive config) is used")
    group.add_argument("--prompts-line", type=int, default=0, metavar="N", help="which line (video) of a jsonl, from 0")
    group.add_argument("--recache", choices=RECACHE_CHOICES,
                       help="at a switch, re-encode the window's frames under the new prompt: none; recent (the "
                            "recent frames and the last block); all (the sink too). The EMA memory is never "
                            "re-encoded. Default: recent (all for a LongLive config with global_sink: false)")
    group.add_argument("--memory-on-switch", choices=MEMORY_CHOICES, default="keep",
                       help="keep the EMA memory at a switch, or reset it (re-initialised at the next eviction)")
    group.add_argument("--transition-blocks", type=int, default=0, metavar="N",
                       help="blend the old and new prompt linearly over N blocks (0: switch at once)")


def timeline_from_args(args: argparse.Namespace) -> PromptTimeline | None:
    """The timeline the options ask for, checked for everything but the video length (see
    :meth:`PromptTimeline.check_length`), or ``None`` for a one-prompt run. Reads files only."""
    if isinstance(args.transition_blocks, bool) or args.transition_blocks < 0:
        raise ValueError(f"--transition-blocks must be >= 0, got {args.transition_blocks}")
    keys = interactive_keys(args.config) if args.config is not None else {}
    indices = None
    if "switch_frame_indices" in keys:
        indices = parse_switch_indices(keys["switch_frame_indices"], str(args.config))
    global_sink = keys.get("global_sink")
    global_sink = None if global_sink is None else bool(global_sink)
    single = args.prompt is not None or args.text_embeds is not None
    if args.prompts is not None:
        if single:
            raise ValueError("pass either --prompts (a timeline) or --prompt/--text-embeds, not both")
        if args.prompts.suffix.lower() == ".jsonl":
            if indices is None:
                raise ValueError(f"{args.prompts} is LongLive's interactive jsonl: its switch_frame_indices come "
                                 "from --config (LongLive's interactive config); none given")
            return read_longlive_prompts(args.prompts, indices, args.prompts_line, global_sink)
        return read_timeline_yaml(args.prompts)
    if indices is not None and "data_path" in keys:
        if single:
            logger.warning("%s has switch_frame_indices but one prompt was given: playing it alone", args.config)
            return None
        jsonl = _resolve_data_path(keys["data_path"], Path(args.config))
        return read_longlive_prompts(jsonl, indices, args.prompts_line, global_sink)
    return None


def recache_mode(args: argparse.Namespace, timeline: PromptTimeline) -> str:
    return args.recache or timeline.recache_default or "recent"


# Calibration prompts of a quantized export (``memrope export --quantize``) for a real model: varied
# subjects, motion, light and camera, as the models' users write them. Not the evaluation prompts.
CALIBRATION_PROMPTS = (
    "A golden retriever runs across a green park on a sunny afternoon, the camera following at ground level.",
    "A city street at night in the rain, neon signs reflected on the wet road as cars pass slowly.",
    "Waves roll onto a rocky shore at sunset, spray catching the orange light, a wide static shot.",
    "A woman in a red coat walks through a snowy forest, snow falling gently, a slow tracking shot.",
    "A close-up of a hummingbird hovering at a purple flower, its wings a blur, soft morning light.",
    "A sailboat crosses a calm blue bay under white clouds, seen from a drone high above.",
    "A chef slices vegetables on a wooden board in a busy kitchen, steam rising behind him.",
    "A timelapse of clouds moving over mountain peaks, shadows sweeping across the valleys.",
)
CALIBRATION_SEED = 9000  # the demo world's calibration prompts are drawn with seeds 9000, 9001, ...


def calibration_prompts(*, demo: bool, count: int = 8) -> list[str]:
    """The default calibration prompts: :data:`CALIBRATION_PROMPTS`, or for the embedded demo model
    ``count`` prompts of its world (:func:`memrope.runtime.demo.world.random_prompt`, seeded; none of
    them is one of its 50 evaluation prompts)."""
    if not demo:
        return list(CALIBRATION_PROMPTS[:count])
    import numpy as np

    from memrope.runtime.demo.world import random_prompt

    return [random_prompt(np.random.default_rng(CALIBRATION_SEED + i)) for i in range(count)]


def read_calibration_prompts(source: str | Path | Sequence[str] | None) -> list[str] | None:
    """``--calibration-prompts``: a list as given, or a file of one prompt per line (blank lines and
    lines starting with ``#`` skipped); ``None`` stays ``None`` (the defaults)."""
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"--calibration-prompts {path}: no such file (expected one prompt per line)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"--calibration-prompts {path}: not UTF-8 text (expected one prompt per line)") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        prompts = [str(p) for p in source]
    if not prompts:
        raise ValueError(f"--calibration-prompts {source}: no prompts (expected one prompt per line)")
    return prompts
