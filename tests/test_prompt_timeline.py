"""Prompt timelines in ``memrope generate``: our YAML and LongLive's interactive config + jsonl
(read unchanged) give the same switches under LongLive's index rule; bad timelines fail with a
one-line message naming the problem, exit 2, before any model is loaded, writing nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memrope.runtime.cli import main
from memrope.runtime.prompts import (
    PromptSegment,
    PromptTimeline,
    interactive_keys,
    parse_switch_indices,
    read_longlive_prompts,
    read_timeline_yaml,
)
from memrope.runtime.t2v import ensure_demo_model

CONFIGS = Path(__file__).parent / "data" / "configs"
PROMPTS = ["a red fox trotting through fresh snow", "the fox stops and looks at the camera",
           "the fox runs into the forest"]


def _write_timeline(path: Path, entries) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


def test_longlive_interactive_config_is_read_unchanged(tmp_path):
    keys = interactive_keys(CONFIGS / "longlive_interactive_inference.yaml")
    assert parse_switch_indices(keys["switch_frame_indices"], "cfg") == [40, 80, 120, 160, 200]
    assert keys["data_path"].endswith("interactive_example.jsonl") and keys["global_sink"] is True
    jsonl = tmp_path / "interactive.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompts": [f"video {v} prompt {i}" for i in range(6)]})
                               for v in range(2)) + "\n")
    timeline = read_longlive_prompts(jsonl, [40, 80, 120, 160, 200], line=1, global_sink=True)
    assert [s.frame for s in timeline.segments] == [0, 40, 80, 120, 160, 200]
    assert timeline.prompts[0] == "video 1 prompt 0" and timeline.recache_default == "recent"
    # LongLive's rule: the first block whose start frame is >= the index (40 -> frame 42).
    assert [3 * b for b in timeline.start_blocks(3)] == [0, 42, 81, 120, 162, 201]
    timeline.check_length(240, 3)
    with pytest.raises(ValueError, match="past the end"):
        timeline.check_length(201, 3)


def test_timeline_yaml_and_its_errors(tmp_path):
    ok = read_timeline_yaml(_write_timeline(tmp_path / "t.yaml", [{"frame": 0, "prompt": PROMPTS[0]},
                                                                  {"frame": 40, "prompt": PROMPTS[1]}]))
    assert ok.segments == (PromptSegment(0, PROMPTS[0]), PromptSegment(40, PROMPTS[1]))
    for entries, match in (([], "has no prompts"),
                           ([{"frame": 0, "text": "x"}], "must be {frame: N, prompt: TEXT}"),
                           ([{"frame": 3, "prompt": "x"}], "must start at frame 0"),
                           ([{"frame": 0, "prompt": "x"}, {"frame": 2.5, "prompt": "y"}], "integer latent frame")):
        with pytest.raises(ValueError, match=match):
            read_timeline_yaml(_write_timeline(tmp_path / "bad.yaml", entries))
    with pytest.raises(ValueError, match="both take effect at frame 42"):
        PromptTimeline((PromptSegment(0, "a"), PromptSegment(40, "b"), PromptSegment(41, "c")), "t").check_length(90, 3)


@pytest.fixture()
def files(golden_dir, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")  # exists, so only loading it would fail
    return {"out": tmp_path / "out" / "latents.safetensors", "config": golden_dir / "memrope_ema.yaml",
            "garbage": garbage, "tmp": tmp_path}


BAD_TIMELINES = [
    ([(0, PROMPTS[0]), (-3, PROMPTS[1])], "negative frame index (-3)"),
    ([(0, PROMPTS[0]), (30, PROMPTS[1])], "frame 30 (entry 1) is past the end"),
    ([(0, PROMPTS[0]), (29, PROMPTS[1])], "would take effect at frame 30"),
    ([(0, PROMPTS[0]), (12, PROMPTS[1]), (6, PROMPTS[2])], "not sorted: 12 (entry 1) comes before 6"),
    ([(0, PROMPTS[0]), (6, PROMPTS[1]), (6, PROMPTS[2])], "frame 6 is duplicated"),
    ([(0, PROMPTS[0]), (6, "  ")], "entry 1 (frame 6) has an empty prompt; expected a non-empty string"),
    ([(0, PROMPTS[0]), (6, 123)], "entry 1 (frame 6) has prompt 123 (int); expected a non-empty string"),
    ([(0, PROMPTS[0]), (6, ["a", "b"])], "entry 1 (frame 6) has prompt ['a', 'b'] (list); expected a non-empty "
                                         "string"),
]


@pytest.mark.parametrize("entries,match", BAD_TIMELINES)
def test_cli_rejects_bad_timelines_before_loading(files, capsys, entries, match):
    timeline = _write_timeline(files["tmp"] / "timeline.yaml", [{"frame": f, "prompt": p} for f, p in entries])
    # An unreadable checkpoint: had anything been loaded first, that would be the error instead.
    _fails(files, capsys, match, ["--prompts", str(timeline)])


def _fails(files, capsys, match, extra):
    args = ["generate", "--checkpoint", str(files["garbage"]), "--preset", "tiny", "--config", str(files["config"]),
            "--model-dir", str(files["tmp"]), "--no-decode", "--latents-out", str(files["out"]), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert not files["out"].exists()
    assert not files["out"].parent.exists() or not any(files["out"].parent.iterdir())


def test_cli_rejects_bad_longlive_prompts(files, capsys, golden_dir):
    jsonl = files["tmp"] / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompts": PROMPTS}) + "\n")
    config = files["tmp"] / "interactive.yaml"
    config.write_text(files["config"].read_text() + f"switch_frame_indices: 6, 12, 18\ndata_path: {jsonl}\n")
    _fails(files, capsys, "has 3 prompts for 3 switch_frame_indices", ["--config", str(config)])
    _fails(files, capsys, "its switch_frame_indices come from --config", ["--prompts", str(jsonl)])
    _fails(files, capsys, "--prompts-line 4 is not one of them", ["--config", str(config), "--prompts", str(jsonl),
                                                                  "--prompts-line", "4"])
    _fails(files, capsys, "either --prompts (a timeline) or --prompt", ["--prompts", str(jsonl), "--prompt", "x"])


def test_cli_names_unreadable_prompt_and_config_files(files, capsys):
    timeline, jsonl, config = files["tmp"] / "timeline.yaml", files["tmp"] / "prompts.jsonl", files["tmp"] / "c.yaml"
    timeline.write_bytes('- {frame: 0, prompt: "a fox \u2013 in snow"}\n'.encode("cp1252"))
    _fails(files, capsys, f"prompt timeline {timeline} is not UTF-8 text (byte 0x96 at offset 28); expected a "
                          "UTF-8 text file", ["--prompts", str(timeline)])
    timeline.write_text(f"- {{frame: 0, prompt: {PROMPTS[0]}}}\n- frame: 6\n  prompt: the fox: stops\n")
    _fails(files, capsys, f"prompt timeline {timeline} is not valid YAML: line 3, column 18: mapping values are "
                          "not allowed here", ["--prompts", str(timeline)])
    jsonl.write_bytes(json.dumps({"prompts": PROMPTS}).replace("fox", "fox \u2013").encode("cp1252"))
    config.write_text(files["config"].read_text() + "switch_frame_indices: 6, 12\n")
    _fails(files, capsys, f"prompt file {jsonl} is not UTF-8 text", ["--config", str(config), "--prompts", str(jsonl)])
    config.write_bytes(files["config"].read_bytes() + "# caf\u00e9\n".encode("cp1252"))
    _fails(files, capsys, f"run config {config} is not UTF-8 text", ["--config", str(config)])


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return ensure_demo_model(tmp_path_factory.mktemp("demo") / "demo")


def _generate(demo_dir, golden_dir, out, *extra):
    args = ["generate", "--model-dir", str(demo_dir), "--config", str(golden_dir / "memrope_ema.yaml"),
            "--num-frames", "12", "--text-cache", str(out.parent / "text"), "--no-decode",
            "--latents-out", str(out), *extra]
    assert main(args) == 0
    return load_file(str(out))["latents"]


def test_timeline_and_longlive_files_give_the_same_video(demo_dir, golden_dir, tmp_path):
    """A timeline switching at frames 6 and 9 equals LongLive's indices 4 and 7 (blocks of 3: the
    first block starting at or after them), and blocks before the first switch equal the
    one-prompt run."""
    timeline = _write_timeline(tmp_path / "t.yaml", [{"frame": f, "prompt": p} for f, p in zip((0, 6, 9), PROMPTS, strict=True)])
    ours = _generate(demo_dir, golden_dir, tmp_path / "ours.safetensors", "--prompts", str(timeline))
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompts": ["unused"] * 3}) + "\n" + json.dumps({"prompts": PROMPTS}) + "\n")
    config = tmp_path / "interactive.yaml"
    config.write_text((golden_dir / "memrope_ema.yaml").read_text()
                      + f"switch_frame_indices: 4, 7\ndata_path: {jsonl}\n")
    args = ["generate", "--model-dir", str(demo_dir), "--config", str(config), "--num-frames", "12",
            "--text-cache", str(tmp_path / "text"), "--no-decode", "--latents-out", str(tmp_path / "ll.safetensors"),
            "--prompts-line", "1"]
    assert main(args) == 0
    longlive = load_file(str(tmp_path / "ll.safetensors"))["latents"]
    assert torch.equal(ours, longlive)
    single = _generate(demo_dir, golden_dir, tmp_path / "one.safetensors", "--prompt", PROMPTS[0])
    assert torch.equal(ours[:, :6], single[:, :6])
    assert (ours[:, 6:] - single[:, 6:]).abs().amax() > 1e-3
    no_recache = _generate(demo_dir, golden_dir, tmp_path / "none.safetensors", "--prompts", str(timeline),
                           "--recache", "none")
    assert torch.equal(no_recache[:, :6], ours[:, :6]) and not torch.equal(no_recache, ours)


def test_timeline_video_with_the_demo_model(tmp_path, monkeypatch):
    """`memrope generate --preset tiny --prompts ...` decodes an MP4 through the switches."""
    import av

    monkeypatch.setenv("MEMROPE_CACHE", str(tmp_path / "cache"))
    timeline = _write_timeline(tmp_path / "t.yaml", [{"frame": 0, "prompt": PROMPTS[0]},
                                                     {"frame": 5, "prompt": PROMPTS[1]}])
    out = tmp_path / "fox.mp4"
    assert main(["generate", "--preset", "tiny", "--prompts", str(timeline), "--num-frames", "9", "--out", str(out),
                 "--no-progress", "--recache", "all", "--memory-on-switch", "reset", "--transition-blocks", "1"]) == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 1 + 4 * (9 - 1)


def test_onnxruntime_generate_with_a_timeline_matches_eager(artifacts, demo_dir, golden_dir, tmp_path):
    timeline = _write_timeline(tmp_path / "t.yaml", [{"frame": f, "prompt": p} for f, p in zip((0, 7, 13), PROMPTS, strict=True)])
    common = ["--config", str(golden_dir / "memrope_ema.yaml"), "--model-dir", str(demo_dir), "--prompts",
              str(timeline), "--num-frames", "18", "--recache", "all", "--text-cache", str(tmp_path / "text"),
              "--no-decode"]
    eager, ort = tmp_path / "eager.safetensors", tmp_path / "ort.safetensors"
    assert main(["generate", "--checkpoint", str(golden_dir / "tiny_selfforcing.pt"), "--model-config",
                 str(golden_dir / "config.json"), *common, "--latents-out", str(eager)]) == 0
    assert main(["generate", "--engine", str(artifacts["memrope_ema"]), "--backend", "onnxruntime", *common,
                 "--latents-out", str(ort)]) == 0
    torch.testing.assert_close(load_file(str(ort))["latents"], load_file(str(eager))["latents"], atol=1e-4, rtol=0)


def test_alias_bombs_and_deep_nesting_are_one_short_line(files, capsys):
    """A 357-byte timeline aliasing 9**9 prompts grew past 6 GB building the error; a jsonl nested
    100,000 deep ended in a RecursionError (exit 1)."""
    timeline = files["tmp"] / "laughs.yaml"
    lines = ["- {frame: 0, prompt: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]}"]
    lines += [f"- {{frame: {i}, prompt: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]}}" for i in range(1, 7)]
    timeline.write_text("\n".join(lines) + "\n")
    _fails(files, capsys, f"prompt timeline {timeline} uses 54 YAML aliases (*name); at most 32 are accepted",
           ["--prompts", str(timeline)])
    jsonl = files["tmp"] / "deep.jsonl"
    jsonl.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    config = files["tmp"] / "interactive.yaml"
    config.write_text(files["config"].read_text() + "switch_frame_indices: 6, 12\n")
    _fails(files, capsys, f"{jsonl} line 1 is nested too deeply", ["--config", str(config), "--prompts", str(jsonl)])
    huge = files["tmp"] / "huge.jsonl"
    with open(huge, "wb") as handle:
        handle.truncate(17 << 20)
    _fails(files, capsys, f"prompt file {huge} is larger than 16 MiB", ["--config", str(config), "--prompts", str(huge)])


def test_values_in_timeline_errors_are_capped(tmp_path):
    path = _write_timeline(tmp_path / "t.yaml", [{"frame": 0, "prompt": "a"}, {"frame": 3, "prompt": list(range(50_000))}])
    with pytest.raises(ValueError) as err:
        read_timeline_yaml(path)
    assert "entry 1 (frame 3) has prompt [0, 1, 2" in str(err.value) and len(str(err.value)) < 300
    with pytest.raises(ValueError) as err:
        parse_switch_indices(["x" * 10_000], "cfg")
    assert len(str(err.value)) < 200


def _interactive_config(tmp_path: Path, switch: str, frames: int) -> Path:
    """LongLive's interactive config, its data_path a jsonl next to it, switching at ``switch``."""
    text = (CONFIGS / "longlive_interactive_inference.yaml").read_text()
    text = text.replace("longlive_models/prompts/interactive_example.jsonl", "prompts.jsonl")
    text = text.replace("switch_frame_indices: 40, 80, 120, 160, 200", f"switch_frame_indices: {switch}")
    text = text.replace("num_output_frames: 240", f"num_output_frames: {frames}")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompts": PROMPTS[:2]}) + "\n")
    config = tmp_path / "interactive.yaml"
    config.write_text(text)
    return config


def test_a_longlive_config_without_a_text_encoder_names_its_data_path(golden_dir, tmp_path, capsys):
    """The prompts came from the config's data_path, not from --prompts: the error says so."""
    config = _interactive_config(tmp_path, "3", 9)
    assert main(["generate", "--checkpoint", str(golden_dir / "tiny_selfforcing.pt"), "--model-config",
                 str(golden_dir / "config.json"), "--config", str(config), "--use-ema", "--no-decode", "--latents-out",
                 str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{config}'s data_path needs a text encoder" in err and "--prompts" not in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out.safetensors").exists()


def test_the_cache_policy_is_said_before_the_models_load(tmp_path, caplog, monkeypatch):
    """A LongLive config runs LongLive's own policy (eviction): the run says so before it starts."""
    monkeypatch.setenv("MEMROPE_CACHE", str(tmp_path / "cache"))
    config = _interactive_config(tmp_path, "3", 9)
    with caplog.at_level(logging.INFO, logger="memrope"):
        assert main(["generate", "--preset", "tiny", "--config", str(config), "--no-decode", "--no-progress",
                     "--latents-out", str(tmp_path / "out.safetensors")]) == 0
    messages = [r.getMessage() for r in caplog.records]
    policy = next(i for i, m in enumerate(messages) if "cache policy eviction" in m)
    loads = [i for i, m in enumerate(messages) if "loading umT5" in m or "encoding" in m]
    assert loads and policy < min(loads), messages
