"""Tests for memrope.checkpoint: formats, key normalisation, exact checks, LoRA merge, safety."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memrope.checkpoint import (
    LORA_TARGET_MODULES,
    WAN_INDEX_FILE,
    WAN_WEIGHTS_FILE,
    check_dit_checkpoint,
    expected_dit_shapes,
    load_dit_state_dict,
    save_dit_state_dict_safetensors,
)
from memrope.config import LoraConfig, WanConfig, model_preset

GOLDEN = Path(__file__).parent / "data" / "golden"
GOLDEN_CKPT = GOLDEN / "tiny_selfforcing.pt"


class NotATensor:
    """A custom class whose pickled instances the loader must refuse."""


@pytest.fixture(scope="module")
def cfg() -> WanConfig:
    return WanConfig.from_json(GOLDEN / "config.json")


@pytest.fixture(scope="module")
def golden_raw() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN_CKPT, map_location="cpu", weights_only=True)["generator_ema"]


def random_state(cfg: WanConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) for k, shape in expected_dit_shapes(cfg).items()}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


# -- expected shapes ---------------------------------------------------------------------------


def test_expected_shapes_match_golden_file(cfg, golden_raw):
    shapes = expected_dit_shapes(cfg)
    assert len(shapes) == 69 == 15 + 27 * cfg.num_layers
    assert list(shapes) == [k.removeprefix("model.") for k in golden_raw]
    for key, tensor in golden_raw.items():
        assert shapes[key.removeprefix("model.")] == tuple(tensor.shape)


def test_expected_shapes_full_model():
    shapes = expected_dit_shapes(model_preset("wan-1.3b"))
    assert len(shapes) == 15 + 27 * 30
    assert shapes["patch_embedding.weight"] == (1536, 16, 1, 2, 2)
    assert shapes["text_embedding.0.weight"] == (1536, 4096)
    assert shapes["time_embedding.0.weight"] == (1536, 256)
    assert shapes["time_projection.1.weight"] == (9216, 1536)
    assert shapes["time_projection.1.bias"] == (9216,)
    assert shapes["blocks.29.modulation"] == (1, 6, 1536)
    assert shapes["blocks.29.ffn.0.weight"] == (8960, 1536)
    assert shapes["blocks.29.ffn.2.weight"] == (1536, 8960)
    assert shapes["blocks.0.cross_attn.norm_k.weight"] == (1536,)
    assert shapes["head.modulation"] == (1, 2, 1536)
    assert shapes["head.head.weight"] == (64, 1536)
    assert "blocks.30.modulation" not in shapes


def test_expected_shapes_follow_config():
    cfg = WanConfig(dim=48, ffn_dim=96, num_heads=4, num_layers=1, freq_dim=32, in_dim=8,
                    out_dim=4, text_dim=24, text_len=8, patch_size=(1, 1, 2))
    shapes = expected_dit_shapes(cfg)
    assert shapes["patch_embedding.weight"] == (48, 8, 1, 1, 2)
    assert shapes["head.head.weight"] == (8, 48)
    assert shapes["time_embedding.0.weight"] == (48, 32)
    assert shapes["text_embedding.0.weight"] == (48, 24)


# -- Self-Forcing / LongLive .pt ---------------------------------------------------------------


def test_golden_checkpoint_loads(cfg, golden_raw):
    state = load_dit_state_dict(GOLDEN_CKPT, cfg)
    assert_same(state, {k.removeprefix("model."): v for k, v in golden_raw.items()})
    assert all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
               for t in state.values())


def test_golden_checkpoint_casts_dtype(cfg, golden_raw):
    state = load_dit_state_dict(GOLDEN_CKPT, cfg, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    key = "blocks.1.ffn.2.weight"
    assert torch.equal(state[key], golden_raw[f"model.{key}"].to(torch.bfloat16))


def fsdp_name(key: str) -> str:
    """Self-Forcing EMA keys from nested FSDP units, e.g. model._fsdp_wrapped_module.blocks..."""
    if key.startswith("blocks."):
        blocks, index, rest = key.split(".", 2)
        return f"model._fsdp_wrapped_module.{blocks}.{index}._fsdp_wrapped_module.{rest}"
    return f"_fsdp_wrapped_module.model.{key}"


def test_generator_with_fsdp_segments_loads(cfg, tmp_path, caplog):
    base = random_state(cfg)
    path = tmp_path / "longlive_base.pt"
    torch.save({"generator": {fsdp_name(k): v for k, v in base.items()}, "step": 7}, path)

    with caplog.at_level(logging.WARNING, logger="memrope.checkpoint"):
        assert_same(load_dit_state_dict(path, cfg, use_ema=False), base)
    assert not caplog.records

    with caplog.at_level(logging.WARNING, logger="memrope.checkpoint"):
        assert_same(load_dit_state_dict(path, cfg, use_ema=True), base)
    assert any("generator_ema" in r.getMessage() for r in caplog.records)


def test_use_ema_selects_ema_over_generator(cfg, tmp_path):
    ema, live = random_state(cfg, seed=1), random_state(cfg, seed=2)
    path = tmp_path / "both.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in live.items()},
                "generator_ema": {f"model.{k}": v for k, v in ema.items()}}, path)
    assert_same(load_dit_state_dict(path, cfg, use_ema=True), ema)
    assert_same(load_dit_state_dict(path, cfg, use_ema=False), live)


def test_model_key_and_bare_dict_load(cfg, tmp_path):
    base = random_state(cfg)
    torch.save({"model": base}, tmp_path / "model.pt")
    torch.save(base, tmp_path / "bare.pth")
    assert_same(load_dit_state_dict(tmp_path / "model.pt", cfg, use_ema=False), base)
    assert_same(load_dit_state_dict(tmp_path / "bare.pth", cfg), base)


def test_legacy_torch_format_loads(cfg, tmp_path):
    base = random_state(cfg)
    path = tmp_path / "legacy.pt"
    torch.save({"generator_ema": base}, path, _use_new_zipfile_serialization=False)
    assert_same(load_dit_state_dict(path, cfg), base)


def test_file_without_state_dict_key_raises(cfg, tmp_path):
    path = tmp_path / "critic_only.pt"
    torch.save({"critic": random_state(cfg), "step": 3}, path)
    with pytest.raises(ValueError, match="generator_ema.*critic"):
        load_dit_state_dict(path, cfg)


def test_ema_only_file_without_use_ema_raises(cfg):
    with pytest.raises(ValueError, match=r"pass use_ema=True, or --use-ema to memrope generate/export\)$"):
        load_dit_state_dict(GOLDEN_CKPT, cfg, use_ema=False)


# -- Wan2.1 safetensors layouts ----------------------------------------------------------------


def test_wan_directory_single_file(cfg, tmp_path):
    base = random_state(cfg)
    save_file(base, str(tmp_path / WAN_WEIGHTS_FILE))
    assert_same(load_dit_state_dict(tmp_path, cfg), base)


def test_wan_directory_sharded(cfg, tmp_path):
    base = random_state(cfg)
    keys = list(base)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:30],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[30:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: base[k] for k in shard_keys}, str(tmp_path / name))
        weight_map.update(dict.fromkeys(shard_keys, name))
    total = sum(t.numel() * t.element_size() for t in base.values())
    (tmp_path / WAN_INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    assert_same(load_dit_state_dict(tmp_path, cfg), base)


def test_sharded_index_inconsistent_with_shard_raises(cfg, tmp_path):
    base = random_state(cfg)
    save_file(base, str(tmp_path / "shard.safetensors"))
    weight_map = dict.fromkeys(list(base)[1:], "shard.safetensors")
    (tmp_path / WAN_INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="patch_embedding.weight"):
        load_dit_state_dict(tmp_path, cfg)


def test_sharded_index_missing_shard_raises(cfg, tmp_path):
    (tmp_path / WAN_INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_dit_state_dict(tmp_path, cfg)


def test_empty_directory_raises(cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=WAN_WEIGHTS_FILE):
        load_dit_state_dict(tmp_path, cfg)


def test_bare_safetensors_file(cfg, tmp_path):
    base = random_state(cfg)
    path = save_dit_state_dict_safetensors(base, tmp_path / "dit.safetensors")
    assert_same(load_dit_state_dict(path, cfg), base)


# -- saving ------------------------------------------------------------------------------------


def test_save_is_atomic_and_handles_shared_storage(tmp_path):
    fused = torch.randn(6, 4)
    state = {"q": fused[:2], "k": fused[2:4], "tied": fused, "also_tied": fused}
    path = save_dit_state_dict_safetensors(state, tmp_path / "sub" / "out.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.safetensors"]
    loaded = load_file(str(path))
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor)


def test_save_leaves_no_temp_file_on_failure(tmp_path):
    with pytest.raises(ValueError):
        save_dit_state_dict_safetensors({"a": "not a tensor"}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- LoRA --------------------------------------------------------------------------------------

LORA_MODULES = ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.1.ffn.0")


def lora_weights(cfg: WanConfig, rank: int, seed: int = 3) -> dict[str, tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_dit_shapes(cfg)
    out = {}
    for module in LORA_MODULES:
        out_features, in_features = shapes[f"{module}.weight"]
        out[module] = (torch.randn(rank, in_features, generator=gen),
                       torch.randn(out_features, rank, generator=gen))
    return out


def peft_dict(weights, prefix: str = "base_model.model.", adapter: str = "") -> dict:
    entries = {}
    for module, (lora_a, lora_b) in weights.items():
        entries[f"{prefix}{module}.lora_A{adapter}.weight"] = lora_a
        entries[f"{prefix}{module}.lora_B{adapter}.weight"] = lora_b
    return entries


@pytest.fixture
def lora_base(cfg, tmp_path):
    base = random_state(cfg)
    path = tmp_path / "base.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in base.items()}}, path)
    return base, path


@pytest.mark.parametrize("prefix, adapter, wrap", [
    ("base_model.model.", "", True),
    ("base_model.model.", ".default", False),
    ("", "", True),
    ("model.", ".default", True),
])
def test_lora_merge(cfg, tmp_path, lora_base, caplog, prefix, adapter, wrap):
    base, base_path = lora_base
    weights = lora_weights(cfg, rank=4)
    entries = peft_dict(weights, prefix=prefix, adapter=adapter)
    lora_path = tmp_path / "lora.pt"
    torch.save({"generator_lora": entries} if wrap else entries, lora_path)

    with caplog.at_level(logging.INFO, logger="memrope.checkpoint"):
        state = load_dit_state_dict(base_path, cfg, use_ema=False, lora_path=lora_path,
                                    lora=LoraConfig(rank=4, alpha=8.0))
    assert any("3 modules" in r.getMessage() for r in caplog.records)
    assert list(state) == list(base)
    for key, tensor in base.items():
        module = key.removesuffix(".weight")
        if module in weights:
            lora_a, lora_b = weights[module]
            torch.testing.assert_close(state[key], tensor + 2.0 * (lora_b @ lora_a))
        else:
            assert torch.equal(state[key], tensor), key


def test_lora_default_config_scaling(cfg, tmp_path, lora_base):
    base, base_path = lora_base
    default = LoraConfig()
    assert math.isclose(default.scaling, 1.0)
    weights = lora_weights(cfg, rank=default.rank)
    lora_path = tmp_path / "lora.pt"
    torch.save(peft_dict(weights), lora_path)
    state = load_dit_state_dict(base_path, cfg, use_ema=False, lora_path=lora_path)
    lora_a, lora_b = weights["blocks.1.ffn.0"]
    torch.testing.assert_close(state["blocks.1.ffn.0.weight"],
                               base["blocks.1.ffn.0.weight"] + lora_b @ lora_a)


def _lora_error(cfg, tmp_path, base_path, entries, rank=4):
    lora_path = tmp_path / "bad_lora.pt"
    torch.save({"generator_lora": entries}, lora_path)
    return load_dit_state_dict(base_path, cfg, use_ema=False, lora_path=lora_path,
                               lora=LoraConfig(rank=rank, alpha=8.0))


def _set(key, shape):
    def mutate(entries):
        entries[f"base_model.model.{key}"] = torch.zeros(shape)
    return mutate


def _drop(key):
    def mutate(entries):
        del entries[f"base_model.model.{key}"]
    return mutate


def _both(*mutations):
    def mutate(entries):
        for m in mutations:
            m(entries)
    return mutate


@pytest.mark.parametrize("mutate, rank, match", [
    pytest.param(_both(_set("head.head.lora_A.weight", (4, 64)), _set("head.head.lora_B.weight", (64, 4))), 4,
                 r"head\.head\.lora_", id="non-target module"),
    pytest.param(_set("blocks.5.ffn.0.lora_A.weight", (4, 64)), 4, r"blocks\.5\.ffn\.0", id="block out of range"),
    pytest.param(_set("blocks.0.self_attn.q.lora_magnitude_vector", (64,)), 4, "lora_magnitude_vector",
                 id="unknown key"),
    pytest.param(_drop("blocks.1.cross_attn.o.lora_B.weight"), 4, r"blocks\.1\.cross_attn\.o\.lora_A\.weight.*lora_B",
                 id="missing partner"),
    pytest.param(lambda entries: None, 8, r"lora_A\.weight.*\[4, 64\].*expected \[8, 64\]", id="wrong rank"),
    pytest.param(_set("blocks.1.ffn.0.lora_A.weight", (4, 128)), 4, r"blocks\.1\.ffn\.0\.lora_A\.weight",
                 id="wrong in features"),
    pytest.param(_set("blocks.0.self_attn.q.lora_B.weight", (128, 4)), 4, r"blocks\.0\.self_attn\.q\.lora_B\.weight",
                 id="wrong out features"),
])
def test_bad_lora_files_raise(cfg, tmp_path, lora_base, mutate, rank, match):
    _, base_path = lora_base
    entries = peft_dict(lora_weights(cfg, rank=4))
    mutate(entries)
    with pytest.raises(ValueError, match=match):
        _lora_error(cfg, tmp_path, base_path, entries, rank=rank)


def test_lora_targets_are_block_linears(cfg):
    shapes = expected_dit_shapes(cfg)
    for module in LORA_TARGET_MODULES:
        assert len(shapes[f"blocks.0.{module}.weight"]) == 2


# -- errors ------------------------------------------------------------------------------------


def test_missing_file_names_path(cfg, tmp_path):
    path = tmp_path / "nowhere" / "self_forcing_dmd.pt"
    with pytest.raises(FileNotFoundError, match="self_forcing_dmd.pt"):
        load_dit_state_dict(path, cfg)


def test_missing_lora_file_names_path(cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="lora_missing.pt"):
        load_dit_state_dict(GOLDEN_CKPT, cfg, lora_path=tmp_path / "lora_missing.pt")


@pytest.mark.parametrize("name", ["truncated.pt", "truncated.safetensors"])
def test_truncated_file_raises(cfg, tmp_path, name):
    valid = tmp_path / f"valid{Path(name).suffix}"
    if valid.suffix == ".pt":
        valid.write_bytes(GOLDEN_CKPT.read_bytes())
    else:
        save_file(random_state(cfg), str(valid))
    data = valid.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable or truncated"):
        load_dit_state_dict(tmp_path / name, cfg)


def test_truncated_legacy_pt_raises(cfg, tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"generator_ema": random_state(cfg)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load_dit_state_dict(path, cfg)


def test_unsupported_suffix_raises(cfg, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported"):
        load_dit_state_dict(path, cfg)


def test_missing_key_raises(cfg, tmp_path):
    base = random_state(cfg)
    del base["blocks.1.norm3.bias"]
    save_file(base, str(tmp_path / "dit.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.norm3\.bias \[64\]"):
        load_dit_state_dict(tmp_path / "dit.safetensors", cfg)


def test_extra_key_raises(cfg, tmp_path):
    base = random_state(cfg)
    base["blocks.0.self_attn.freqs"] = torch.zeros(3)
    save_file(base, str(tmp_path / "dit.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.0\.self_attn\.freqs"):
        load_dit_state_dict(tmp_path / "dit.safetensors", cfg)


def test_wrong_shape_raises(cfg, tmp_path):
    base = random_state(cfg)
    base["head.head.weight"] = torch.zeros(32, 64)
    save_file(base, str(tmp_path / "dit.safetensors"))
    expected = r"head\.head\.weight: expected \[64, 64\], got \[32, 64\]"
    with pytest.raises(ValueError, match=expected):
        load_dit_state_dict(tmp_path / "dit.safetensors", cfg)


def test_config_mismatch_raises(cfg):
    wrong = replace(cfg, num_layers=3)
    expected = r"does not match the model config: dim=64.*num_layers=3"
    with pytest.raises(ValueError, match=expected) as info:
        load_dit_state_dict(GOLDEN_CKPT, wrong)
    assert "blocks.2.modulation" in str(info.value)
    assert "2 transformer blocks" in str(info.value)


def test_error_lists_at_most_ten_keys(cfg):
    wide = replace(cfg, dim=128, ffn_dim=256)
    with pytest.raises(ValueError, match=r"and \d+ more"):
        load_dit_state_dict(GOLDEN_CKPT, wide)


def test_non_floating_tensor_raises(cfg, tmp_path):
    base = random_state(cfg)
    base["head.modulation"] = torch.zeros(1, 2, 64, dtype=torch.int32)
    torch.save({"generator_ema": base}, tmp_path / "int.pt")
    with pytest.raises(ValueError, match=r"head\.modulation \(torch\.int32\)"):
        load_dit_state_dict(tmp_path / "int.pt", cfg)


def test_non_floating_dtype_argument_raises(cfg):
    with pytest.raises(ValueError, match="dtype"):
        load_dit_state_dict(GOLDEN_CKPT, cfg, dtype=torch.int64)


def test_pickled_objects_are_refused(cfg, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"generator_ema": random_state(cfg), "extra": NotATensor()}, path)
    with pytest.raises(ValueError, match="non-tensor pickled objects.*NotATensor"):
        load_dit_state_dict(path, cfg)


def test_pickled_objects_in_lora_are_refused(cfg, tmp_path):
    path = tmp_path / "evil_lora.pt"
    torch.save({"generator_lora": {}, "extra": NotATensor()}, path)
    with pytest.raises(ValueError, match="non-tensor pickled objects"):
        load_dit_state_dict(GOLDEN_CKPT, cfg, lora_path=path)


# -- the structure check (headers only) -----------------------------------------------------------


def test_structure_check_refuses_what_loading_refuses_without_reading_values(cfg, tmp_path, lora_base):
    """check_dit_checkpoint raises load_dit_state_dict's own error for a wrong key, shape, config or
    LoRA, in each layout; it reads no values: NaN weights pass it (loading refuses them)."""
    good = random_state(cfg)
    save_file(good, str(tmp_path / "good.safetensors"))
    save_dit_state_dict_safetensors(good, tmp_path / "wan" / WAN_WEIGHTS_FILE)
    for path in (tmp_path / "good.safetensors", tmp_path / "wan", GOLDEN_CKPT):
        assert check_dit_checkpoint(path, cfg) is None
    shaped = {**good, "head.head.weight": torch.zeros(32, 64)}
    save_file(shaped, str(tmp_path / "shape.safetensors"))
    missing = {k: v for k, v in good.items() if k != "blocks.1.norm3.bias"}
    torch.save({"generator": missing}, tmp_path / "missing.pt")
    cases = [(tmp_path / "shape.safetensors", cfg, {}), (tmp_path / "missing.pt", cfg, {"use_ema": False}),
             (GOLDEN_CKPT, replace(cfg, num_layers=3), {})]
    for path, config, options in cases:
        with pytest.raises(ValueError) as loading:
            load_dit_state_dict(path, config, **options)
        with pytest.raises(ValueError) as checking:
            check_dit_checkpoint(path, config, **options)
        assert str(checking.value) == str(loading.value)
    _, base_path = lora_base
    lora_path = tmp_path / "lora.pt"
    torch.save({"generator_lora": peft_dict(lora_weights(cfg, rank=4))}, lora_path)
    assert check_dit_checkpoint(base_path, cfg, use_ema=False, lora_path=lora_path, lora=LoraConfig(rank=4)) is None
    with pytest.raises(ValueError, match=r"lora_A\.weight.*\[4, 64\].*expected \[8, 64\]"):
        check_dit_checkpoint(base_path, cfg, use_ema=False, lora_path=lora_path, lora=LoraConfig(rank=8))
    poisoned = {**good, "head.head.weight": torch.full((64, 64), float("nan"))}
    save_file(poisoned, str(tmp_path / "nan.safetensors"))
    assert check_dit_checkpoint(tmp_path / "nan.safetensors", cfg) is None
    with pytest.raises(ValueError, match="NaN"):
        load_dit_state_dict(tmp_path / "nan.safetensors", cfg)
