"""Config adapters read the authors' files unchanged; validation names field, value and rule."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from memrope.config import (
    CacheConfig,
    RunConfig,
    WanConfig,
    config_hash,
    load_run_config,
    model_preset,
    run_config_from_yaml_dict,
)
from memrope.sampler import build_schedule

CONFIGS = Path(__file__).parent / "data" / "configs"
GOLDEN = Path(__file__).parent / "data" / "golden"


def test_golden_yaml_files(golden_dir):
    ema = load_run_config(golden_dir / "memrope_ema.yaml")
    assert ema.cache == CacheConfig(policy="ema", window_frames=12, sink_frames=3, block_frames=3)
    assert ema.cache.recent_frames == 4
    assert (ema.latent_height, ema.latent_width, ema.num_output_frames) == (4, 6, 30)
    assert load_run_config(golden_dir / "memrope_eviction.yaml").cache.policy == "eviction"
    glob = load_run_config(golden_dir / "global_noevict.yaml")
    assert glob.cache.policy == "global" and glob.cache.window_frames is None


def test_memrope_longlive_and_self_forcing_files():
    memrope = load_run_config(CONFIGS / "memrope_60s.yaml")
    assert memrope.num_output_frames == 240 and memrope.cache.policy == "ema"
    assert (memrope.latent_height, memrope.latent_width) == (60, 104)
    longlive = load_run_config(CONFIGS / "longlive_inference.yaml")
    assert longlive.cache.policy == "eviction" and longlive.cache.block_frames == 6
    assert longlive.cache.recent_frames == 3
    assert longlive.lora is not None and longlive.lora.scaling == 1.0 and not longlive.use_ema
    assert longlive.lora_ckpt.endswith("lora.pt")
    # Self-Forcing's file has no num_output_frames: its inference generates the 21 frames of
    # image_or_video_shape [1, 21, 16, 60, 104], not our default of 120.
    sf_raw = (CONFIGS / "self_forcing_dmd.yaml").read_text()
    assert "num_output_frames" not in sf_raw
    sf = load_run_config(CONFIGS / "self_forcing_dmd.yaml")
    assert sf.cache.policy == "global" and sf.num_output_frames == 21
    assert (sf.latent_channels, sf.latent_height, sf.latent_width) == (16, 60, 104)


def test_another_models_config_is_refused_by_name():
    """LongLive 2.0 (Wan2.2-TI2V-5B: blocks of 8, sink 8, 48 channels, options nested under
    model_kwargs/inference/data) is not read as block 1, sink 0, 16 channels: it is refused."""
    with pytest.raises(ValueError, match=r"model_name 'Wan2.2-TI2V-5B' is not supported.*Wan2.1-T2V-1.3B"):
        load_run_config(CONFIGS / "longlive2_inference.yaml")


def test_nested_options_are_read_not_defaulted():
    raw = {"model_name": "Wan2.1-T2V-1.3B", "num_output_frames": 48,
           "model_kwargs": {"local_attn_size": 12, "compression_method": "ema", "num_frame_per_block": 3},
           "inference": {"sink_size": 3}, "data": {"image_or_video_shape": [1, 48, 16, 8, 12]}}
    run = run_config_from_yaml_dict(raw)
    assert (run.cache.block_frames, run.cache.sink_frames) == (3, 3)
    assert (run.latent_channels, run.latent_height, run.latent_width) == (16, 8, 12)
    with pytest.raises(ValueError, match=r"num_frame_per_block is given twice.*model_kwargs.num_frame_per_block=6"):
        run_config_from_yaml_dict({**raw, "num_frame_per_block": 3,
                                   "model_kwargs": {**raw["model_kwargs"], "num_frame_per_block": 6}})
    with pytest.raises(ValueError, match="image_or_video_shape must be 5 positive integers"):
        run_config_from_yaml_dict({**raw, "data": {"image_or_video_shape": [1, 21, 16]}})


def test_warped_schedule_matches_the_reference():
    sched = build_schedule(load_run_config(GOLDEN / "memrope_ema.yaml").sampler)
    meta = json.loads((GOLDEN / "golden_meta.json").read_text())
    assert list(sched.step_timesteps) == meta["warped_denoising_steps"]
    assert [float.hex(s) for s in sched.step_sigmas] == [
        float.hex(float.fromhex(d["sigma_hex"])) for d in meta["warped_steps_detail"]]
    assert sched.context_timestep == 0.0


def test_wan_config_json_with_and_without_text_dim(tmp_path):
    raw = {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30, "freq_dim": 256,
           "in_dim": 16, "out_dim": 16, "text_len": 512, "eps": 1e-6, "model_type": "t2v",
           "_class_name": "WanModel", "_diffusers_version": "0.30.0"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = WanConfig.from_json(tmp_path / "config.json")
    assert cfg == model_preset("wan-1.3b") and cfg.text_dim == 4096 and cfg.head_dim == 128
    assert WanConfig.from_json(GOLDEN / "config.json").text_dim == 32


@pytest.mark.parametrize("kwargs, match", [
    ({"local_attn_size": 6, "sink_size": 3, "compression_method": "ema"}, "impossible cache layout"),
    ({"local_attn_size": 13, "sink_size": 3}, "multiple of num_frame_per_block"),
    ({"local_attn_size": 0}, "local_attn_size"),
    ({"local_attn_size": 12, "compression_method": "zip"}, "compression_method"),
    ({"local_attn_size": 12, "ema_alpha_long": 1.5}, "ema_alpha_long"),
    ({"local_attn_size": 12, "sink_size": -1}, "sink_size"),
])
def test_impossible_layouts_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_config_from_yaml_dict({"num_frame_per_block": 3, "model_kwargs": kwargs})


@pytest.mark.parametrize("raw, match", [
    ({"num_frame_per_block": 3, "num_output_frames": 31}, "multiple of num_frame_per_block"),
    ({"denoising_step_list": [1000, 0]}, "denoising_step_list"),
    ({"num_output_frames": 2000, "num_frame_per_block": 1}, "<= 1024"),
    ({"engine": {"memory_dtype": "float64"}, "model_kwargs": {"local_attn_size": 12}}, "memory_dtype"),
    ([1, 2], "mapping"),
])
def test_bad_run_configs(raw, match):
    with pytest.raises(ValueError, match=match):
        run_config_from_yaml_dict(raw)


def test_bad_model_configs(tmp_path):
    with pytest.raises(ValueError, match="divisible by num_heads"):
        WanConfig(dim=100, num_heads=3)
    with pytest.raises(ValueError, match="missing required keys"):
        WanConfig.from_dict({"dim": 64})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        WanConfig.from_json(bad)
    with pytest.raises(FileNotFoundError, match="model config not found"):
        WanConfig.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")


def test_engine_options_and_hash():
    run = run_config_from_yaml_dict({"num_frame_per_block": 3, "engine": {"memory_dtype": "float32"},
                                     "model_kwargs": {"local_attn_size": 12, "sink_size": 3,
                                                      "compression_method": "ema", "ema_adaptive": True}})
    assert run.cache.policy == "ema_adaptive" and run.cache.memory_dtype == "float32"
    # Equal configs built separately hash alike; each field that shapes the graph moves the hash.
    again = run_config_from_yaml_dict({"num_frame_per_block": 3, "engine": {"memory_dtype": "float32"},
                                       "model_kwargs": {"local_attn_size": 12, "sink_size": 3,
                                                        "compression_method": "ema", "ema_adaptive": True}})
    assert again is not run and config_hash(again) == config_hash(run)
    assert len(config_hash(run)) == 64 and int(config_hash(run), 16) >= 0
    variants = [replace(run, cache=replace(run.cache, alpha_long=0.02)),
                replace(run, cache=replace(run.cache, memory_dtype="cache")),
                replace(run, sampler=replace(run.sampler, shift=5.0)),
                replace(run, latent_height=62), RunConfig()]
    hashes = {config_hash(v) for v in variants} | {config_hash(run)}
    assert len(hashes) == len(variants) + 1


@pytest.mark.parametrize("engine, unknown", [({"memory_dtpye": "float32"}, "memory_dtpye"),
                                             ({"memory_dtype": "float32", "bogus": 1}, "bogus")])
def test_unknown_engine_keys_are_refused_by_name(engine, unknown):
    raw = {"num_frame_per_block": 3, "model_kwargs": {"local_attn_size": 12}, "engine": engine}
    with pytest.raises(ValueError) as err:
        run_config_from_yaml_dict(raw, source="cfg.yaml")
    assert str(err.value) == f"cfg.yaml: unknown key(s) under engine: {unknown}; accepted: memory_dtype"
    # The authors' keys outside engine: (training options, prompts, ...) are still read unchanged.
    run_config_from_yaml_dict({**raw, "engine": {"memory_dtype": "float32"}, "lr": 2e-6, "prompt_path": "p.txt"})


def test_unreadable_config_files_are_named_in_one_line(tmp_path):
    run_yaml, model_json = tmp_path / "run.yaml", tmp_path / "config.json"
    run_yaml.write_bytes("num_output_frames: 30\nprompt: \u201ccaf\u00e9\u201d\n".encode("cp1252"))
    with pytest.raises(ValueError) as err:
        load_run_config(run_yaml)
    assert str(err.value) == (f"run config {run_yaml} is not UTF-8 text (byte 0x93 at offset 30); expected a "
                              "UTF-8 text file")
    run_yaml.write_text("num_output_frames: 30\ndenoising_step_list: [1000, 750\n")
    with pytest.raises(ValueError) as err:
        load_run_config(run_yaml)
    assert str(err.value) == (f"run config {run_yaml} is not valid YAML: line 3, column 1: expected ',' or ']', "
                              "but got '<stream end>' (while parsing a flow sequence from line 2, column 22)")
    model_json.write_bytes(b'{"dim": 64, "_note": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"model config .*config\.json is not UTF-8 text \(byte 0xe9"):
        WanConfig.from_json(model_json)
    model_json.write_text("[64, 128]")
    with pytest.raises(ValueError, match=r"config\.json holds a JSON list; expected a JSON object"):
        WanConfig.from_json(model_json)


def _laughs(levels: int, width: int = 9, base: int = 9) -> str:
    """A billion-laughs YAML body: ``l{levels}`` stands for base * width ** levels strings, in a few hundred bytes."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * base)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_yaml_aliases_that_expand_a_config_are_refused_in_one_short_line(golden_dir, tmp_path):
    """A 1.5 KB config whose ``seed:`` aliases 9**7 strings grew to a 35 MB error message (9**9: past 6 GB)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(golden_dir.joinpath("memrope_ema.yaml").read_text().replace("seed: 0\n", "")
                    + _laughs(7) + "seed: *l7\n")
    assert bomb.stat().st_size < 2000
    with pytest.raises(ValueError) as err:
        load_run_config(bomb)
    message = str(err.value)
    assert message == f"run config {bomb} uses 64 YAML aliases (*name); at most 32 are accepted"
    # Few aliases, many values: 1000 strings aliased 10 x 10 x 10 times.
    bomb.write_text(_laughs(3, width=10, base=1000) + "seed: *l3\n")
    with pytest.raises(ValueError) as err:
        load_run_config(bomb)
    assert str(err.value) == (f"run config {bomb}: YAML aliases expand it to more than 100,000 values (or into "
                              "itself); write the values out")


def test_a_few_anchors_still_load_and_values_in_errors_are_capped(golden_dir, tmp_path):
    shared = tmp_path / "anchors.yaml"
    shared.write_text(golden_dir.joinpath("memrope_ema.yaml").read_text().replace(
        "denoising_step_list:\n- 1000\n- 750\n- 500\n- 250\n", "steps: &steps [1000, 750, 500, 250]\n"
        "denoising_step_list: *steps\n"))
    assert load_run_config(shared) == load_run_config(golden_dir / "memrope_ema.yaml")
    long_value = tmp_path / "long.yaml"
    long_value.write_text(f"num_samples: {'x' * 100_000}\n")
    with pytest.raises(ValueError) as err:
        load_run_config(long_value)
    assert "num_samples must be a positive integer, got 'xxxx" in str(err.value) and len(str(err.value)) < 300


@pytest.mark.parametrize("body, says", [
    ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "is nested too deeply"),
    ("seed: " + "7" * 5000 + "\n", "is not valid YAML: "),
    ("seed: &s [*s]\n", "YAML aliases expand it to more than "),
])
def test_deep_huge_and_recursive_yaml_is_one_line(tmp_path, body, says):
    path = tmp_path / "odd.yaml"
    path.write_text(body)
    with pytest.raises(ValueError) as err:
        load_run_config(path)
    assert f"run config {path}" in str(err.value) and says in str(err.value), str(err.value)
    assert len(str(err.value)) < 300


def test_config_files_are_size_bounded_before_they_are_read(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(ValueError, match=rf"^run config {big} is larger than 1 MiB, the most read for a run config$"):
        load_run_config(big)
    with pytest.raises(ValueError, match="run config /dev/zero is larger than 1 MiB"):
        load_run_config("/dev/zero")
