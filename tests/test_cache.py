"""Cache invariants: layout arithmetic, the block plan, FIFO order, sink stability, the EMA
closed form, bounded RoPE positions, constant size and addresses over long runs."""

from __future__ import annotations

import resource

import pytest
import torch

from memrope.cache import (
    MEMORY_INIT,
    MEMORY_NONE,
    MEMORY_UPDATE,
    CacheControls,
    CacheLayout,
    CachePolicy,
    KVCache,
    memory_update,
)
from memrope.config import CacheConfig, RunConfig, model_preset
from memrope.engine.eager_backend import EagerBackend
from memrope.model import build_dit, random_state_dict
from memrope.pipeline import MemRoPEPipeline
from memrope.sampler import StreamingSeededNoise

S = 2  # tokens per frame in the synthetic caches below


def _layout(policy="ema", window=12, sink=3, frames=None):
    cfg = CacheConfig(policy=policy, window_frames=None if policy == "global" else window, sink_frames=sink)
    return CacheLayout.build(cfg, S, frames)


def test_layout_is_derived_from_the_window():
    lay = _layout(window=15)
    assert (lay.sink_frames, lay.memory_frames, lay.config.recent_frames, lay.block_frames) == (3, 2, 7, 3)
    assert lay.context_frames == 12 and lay.cache_tokens == 15 * S
    assert _layout(policy="eviction").config.recent_frames == 6


def test_plan_matches_the_authors_block_table():
    policy = CachePolicy(_layout())
    plans = [policy.next_block() for _ in range(8)]
    assert [p.valid_frames for p in plans] == [0, 3, 6, 9, 9, 9, 9, 9]
    assert [p.query_start for p in plans] == [0, 3, 6, 9, 9, 9, 9, 9]
    assert [p.roll for p in plans] == [False] * 4 + [True] * 4
    assert [p.memory_step for p in plans] == [MEMORY_NONE] * 4 + [MEMORY_INIT] + [MEMORY_UPDATE] * 3
    assert [p.memory_ready for p in plans] == [False] * 4 + [True] * 4


def _tagged_run(layout, blocks):
    """Drive KVCache + CachePolicy with frames tagged by their index (no model)."""
    cache = KVCache(layout, num_layers=1, batch=1, heads=1, head_dim=1, dtype=torch.float64)
    policy = CachePolicy(layout)
    states = []
    for b in range(blocks):
        plan = policy.next_block()
        if plan.roll:
            cache.roll()
        tags = torch.arange(3 * b, 3 * b + 3, dtype=torch.float64).repeat_interleave(S).view(1, -1, 1, 1)
        cache.write_block(plan.write_frame, [tags], [tags])
        frames = cache.keys[0, 0, ::S, 0, 0].tolist()
        states.append((plan, frames))
    return states


def test_fifo_order_and_sink_stability_eviction():
    states = _tagged_run(_layout(policy="eviction"), 12)
    for b, (_plan, frames) in enumerate(states):
        if b >= 4:
            assert frames == [0, 1, 2] + list(range(3 * b - 6, 3 * b + 3))


def test_fifo_order_and_first_eviction_ema():
    states = _tagged_run(_layout(), 12)
    assert states[3][1] == list(range(12))
    for b, (_plan, frames) in enumerate(states[4:], start=4):
        # Memory slots keep stale frames 3, 4 (never remembered, spec 7.1); the tail is FIFO.
        assert frames == [0, 1, 2, 3, 4] + list(range(3 * b - 4, 3 * b + 3))


def test_roll_parks_the_evicted_frames_in_the_block_slots():
    layout = _layout()
    cache = KVCache(layout, 1, 1, 1, 1, torch.float64)
    cache.keys[0, 0, :, 0, 0] = torch.arange(12, dtype=torch.float64).repeat_interleave(S)
    cache.roll()
    assert cache.keys[0, 0, ::S, 0, 0].tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 5, 6, 7]


def test_ema_closed_form():
    cfg = CacheConfig()
    b, e, h, d = 1, 3 * S, 2, 4
    g = torch.Generator().manual_seed(0)
    mem_k = torch.zeros(b, 2, 1, h, d, dtype=torch.float64)
    mem_v = torch.zeros_like(mem_k)
    means = []
    for n in range(25):
        ek = torch.randn(b, e, h, d, generator=g, dtype=torch.float64)
        ev = torch.randn(b, e, h, d, generator=g, dtype=torch.float64)
        means.append(ek.mean(dim=1))
        mem_k, mem_v = memory_update(mem_k, mem_v, ek, ev, torch.tensor([n == 0]), torch.tensor([n > 0]), cfg, S)
    for slot, alpha in ((0, cfg.alpha_long), (1, cfg.alpha_short)):
        n = len(means) - 1
        expected = (1 - alpha) ** n * means[0] + sum(alpha * (1 - alpha) ** (n - j) * means[j]
                                                     for j in range(1, n + 1))
        torch.testing.assert_close(mem_k[:, slot, 0], expected, atol=1e-12, rtol=0)


def test_memory_flags_select_init_update_or_keep():
    cfg = CacheConfig()
    mem = torch.randn(1, 2, 1, 2, 4)
    ev = torch.randn(1, 3 * S, 2, 4)
    kept, _ = memory_update(mem, mem, ev, ev, torch.tensor([False]), torch.tensor([False]), cfg, S)
    assert torch.equal(kept, mem)
    init, _ = memory_update(mem, mem, ev, ev, torch.tensor([True]), torch.tensor([False]), cfg, S)
    torch.testing.assert_close(init[:, 0], ev.mean(dim=1, keepdim=True))
    torch.testing.assert_close(init[:, 1], ev.mean(dim=1, keepdim=True))


def test_adaptive_memory_is_per_position():
    cfg = CacheConfig(policy="ema_adaptive")
    layout = CacheLayout.build(cfg, S)
    assert layout.memory_tokens == S
    ev = torch.randn(1, 3 * S, 2, 4)
    mem = torch.zeros(1, 2, S, 2, 4)
    init, _ = memory_update(mem, mem, ev, ev, torch.tensor([True]), torch.tensor([False]), cfg, S)
    torch.testing.assert_close(init[:, 0], ev.view(1, 3, S, 2, 4).mean(dim=1))
    upd, _ = memory_update(init, init, ev * 2, ev * 2, torch.tensor([False]), torch.tensor([True]), cfg, S)
    # Long memory: scalar alpha; short memory: alpha between 0.1 and 5 times alpha_short.
    torch.testing.assert_close(upd[:, 0], init[:, 0] + cfg.alpha_long * (2 * init[:, 0] - init[:, 0]))
    step = (upd[:, 1] - init[:, 1]) / (2 * init[:, 1] - init[:, 1])
    assert float(step.min()) >= 0.1 * cfg.alpha_short - 1e-6 and float(step.max()) <= 5 * cfg.alpha_short + 1e-6


@pytest.mark.parametrize("policy", ["ema", "ema_adaptive", "eviction", "global"])
def test_positions_stay_inside_the_window(policy):
    layout = _layout(policy=policy, frames=60)
    policy_ = CachePolicy(layout)
    controls = CacheControls.allocate(layout)
    for _ in range(layout.cache_frames // 3 + (40 if layout.rolls else 0)):
        plan = policy_.next_block()
        controls.set(layout, plan, first_call=True)
        assert int(controls.query_positions.max()) < layout.cache_frames
        assert int(controls.key_positions.max()) < layout.context_frames
        assert int(controls.key_valid.sum()) == plan.valid_frames


def test_global_cache_refuses_a_block_past_its_end():
    policy = CachePolicy(_layout(policy="global", frames=6))
    policy.next_block(), policy.next_block()
    with pytest.raises(ValueError, match="does not fit"):
        policy.next_block()


@pytest.mark.slow  # 300 blocks: the long-horizon step of CI
@pytest.mark.parametrize("policy", ["ema", "ema_adaptive", "eviction"])
def test_300_blocks_constant_size_addresses_and_finite(policy):
    """A long run on the tiny model: the cache never reallocates or grows, the sink never changes
    after block 0, values stay finite, and host memory stays flat."""
    cfg = model_preset("tiny")
    run = RunConfig(cache=CacheConfig(policy=policy), num_output_frames=900, latent_height=4, latent_width=6)
    pipeline = MemRoPEPipeline(EagerBackend(build_dit(cfg, random_state_dict(cfg)), run), run)
    noise = StreamingSeededNoise(0, 1, (16, 4, 6), 3)
    embeds = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    sink_tokens = run.cache.sink_frames * pipeline.layout.frame_tokens
    rss_at = {}
    for block in pipeline.blocks(embeds, noise, 300):
        b, x0, cache = block.index, block.x0, block.cache
        if b == 0:
            ptrs = (cache.keys.data_ptr(), cache.values.data_ptr())
            nbytes = cache.nbytes()
            sink = cache.keys[:, :, :sink_tokens].clone()
        if b >= 1:
            assert torch.equal(cache.keys[:, :, :sink_tokens], sink)
        assert (cache.keys.data_ptr(), cache.values.data_ptr()) == ptrs and cache.nbytes() == nbytes
        assert torch.isfinite(x0).all()
        if b in (50, 299):
            rss_at[b] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            assert torch.isfinite(cache.keys).all() and torch.isfinite(cache.values).all()
            if cache.memory_keys is not None:
                assert torch.isfinite(cache.memory_keys).all() and torch.isfinite(cache.memory_values).all()
    # ru_maxrss is in KiB on Linux; 250 more blocks may not raise the peak by more than 32 MiB.
    assert rss_at[299] - rss_at[50] < 32 * 1024


def test_memory_dtype_follows_the_cache_unless_float32_is_asked():
    cfg = model_preset("tiny")
    dit = build_dit(cfg, random_state_dict(cfg), dtype=torch.bfloat16)
    embeds = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    memories = {}
    for memory_dtype in ("cache", "float32"):
        run = RunConfig(cache=CacheConfig(memory_dtype=memory_dtype), num_output_frames=24,
                        latent_height=4, latent_width=6)
        pipeline = MemRoPEPipeline(EagerBackend(dit, run), run)
        for block in pipeline.blocks(embeds, StreamingSeededNoise(0, 1, (16, 4, 6), 3, torch.bfloat16), 8):
            cache = block.cache
        memories[memory_dtype] = cache.memory_keys.clone()
    assert memories["cache"].dtype == torch.bfloat16 and memories["float32"].dtype == torch.float32
    # Same inputs, different accumulator rounding: close but not identical.
    diff = (memories["cache"].float() - memories["float32"]).abs().max()
    assert 0 < float(diff) < 0.1
