"""Prompt changes mid-stream (``BlockStream.set_prompt``): a same-prompt switch changes nothing,
earlier blocks are untouched, the re-cached keys/values equal an independent recomputation
(block by block through the golden-tested step), ONNX Runtime matches eager call by call across
switches, the memory keep/reset and the blend behave as documented, bad options are refused,
and the recache graph builds with the real TensorRT-RTX builder (bf16, fp16)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import golden_run

from memrope.backend import Backend
from memrope.cache import CacheControls, CacheLayout
from memrope.contract import cross_key, cross_value, memory_key, past_key, recached_key, recached_value
from memrope.engine.eager_backend import EagerBackend
from memrope.engine.onnxruntime_backend import OnnxRuntimeBackend
from memrope.model import MemRoPEStep
from memrope.pipeline import MemRoPEPipeline, PromptChange
from memrope.sampler import StreamingSeededNoise

LATENT = (16, 4, 6)


def _noise():
    return StreamingSeededNoise(0, 1, LATENT, 3)


@pytest.fixture(scope="module")
def prompts(golden_inputs, tiny_config):
    g = torch.Generator().manual_seed(11)
    return golden_inputs["prompt_embeds"], torch.randn(1, tiny_config.text_len, tiny_config.text_dim, generator=g)


class Recorder(Backend):
    """Wraps a real backend: snapshots the cross keys/values of each block's first call and the
    cache around every re-cache call."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name, self.model, self.layout = inner.name, inner.model, inner.layout
        self.dtype, self.device, self.can_recache = inner.dtype, inner.device, inner.can_recache
        self.step_calls: list[dict[str, torch.Tensor]] = []
        self.recaches: list[dict] = []

    def encode_text(self, prompt_embeds):
        return self.inner.encode_text(prompt_embeds)

    def step(self, feeds):
        self.step_calls.append({name: feeds[name].clone() for name in (cross_key(0), cross_value(1))})
        return self.inner.step(feeds)

    def recache(self, feeds, outputs):
        before = {name: t.clone() for name, t in feeds.items()}
        self.inner.recache(feeds, outputs)
        self.recaches.append({"feeds": before, "outputs": {name: t.clone() for name, t in outputs.items()}})


def _generate(backend, run, embeds, blocks, changes=(), on_call=None):
    pipeline = MemRoPEPipeline(backend, run)
    return pipeline.generate(embeds, _noise(), 3 * blocks, on_call=on_call, prompt_changes=changes)


def test_same_prompt_without_recache_changes_nothing(golden_dit, prompts):
    run = golden_run("memrope_ema")
    first, _ = prompts
    one = _generate(EagerBackend(golden_dit, run), run, first, 10)
    switched = _generate(EagerBackend(golden_dit, run), run, first, 10,
                         [PromptChange(2, first), PromptChange(6, first, memory="keep")])
    assert torch.equal(one, switched)


@pytest.mark.parametrize("mode", ["none", "recent", "all"])
def test_switch_leaves_earlier_blocks_identical(golden_dit, prompts, mode):
    run = golden_run("memrope_ema")
    first, second = prompts
    one = _generate(EagerBackend(golden_dit, run), run, first, 8)
    switched = _generate(EagerBackend(golden_dit, run), run, first, 8, [PromptChange(5, second, recache=mode)])
    assert torch.equal(one[:, :15], switched[:, :15])
    assert (one[:, 15:] - switched[:, 15:]).abs().amax() > 1e-2


def _expected_recache(dit, run, before, clean, cross, filled, rolled, memory_ready, mode):
    """The window re-encoded as the loop would have encoded it block by block: one
    ``MemRoPEStep`` call per group of slots in one block (a 1-frame layout for a partial block),
    each attending to the valid slots before it plus itself, at slot positions. Slot contents and
    groups come from the spec's slot table, not from the code under test."""
    keys, values, mem_k, mem_v = (t.clone() for t in before)
    lay = CacheLayout.for_run(dit.config, run)
    S, F = lay.frame_tokens, lay.block_frames

    def valid(slot):
        if lay.has_memory and rolled and lay.sink_frames <= slot < lay.sink_frames + 2:
            return memory_ready
        return slot < filled

    slots = (list(range(lay.sink_frames)) if mode == "all" else []) + list(range(lay.tail_start_frame, filled))
    groups = []
    for slot in slots:
        if groups and groups[-1][-1] + 1 == slot and groups[-1][0] // F == slot // F:
            groups[-1].append(slot)
        else:
            groups.append([slot])
    L = dit.config.num_layers
    for group in groups:
        a, b = group[0], group[-1] + 1
        layout = CacheLayout.build(replace(run.cache, block_frames=b - a), S, run.num_output_frames)
        step = MemRoPEStep(dit, layout, run.latent_height, run.latent_width)
        controls = CacheControls.allocate(layout)
        controls.key_valid.copy_(torch.tensor([t < a and valid(t) for t in range(layout.context_frames)]))
        controls.query_positions.copy_(torch.arange(a, b))
        controls.memory_ready.fill_(memory_ready)
        out = step(clean[:, a:b], torch.full((1, b - a), run.sampler.context_timestep), torch.zeros(1),
                   list(keys), list(values), cross[0], cross[1], controls,
                   list(mem_k) if lay.has_memory else None, list(mem_v) if lay.has_memory else None)
        for i in range(L):
            keys[i, :, a * S:b * S] = out.block_keys[i]
            values[i, :, a * S:b * S] = out.block_values[i]
    return keys, values, groups


CASES = [  # policy, switch before block, re-cache, memory on switch
    ("memrope_ema", 2, "recent", "keep"),     # filling: one partial tail slot valid
    ("memrope_ema", 2, "all", "keep"),
    ("memrope_ema", 4, "recent", "keep"),     # window full, memory slots hold frames
    ("memrope_ema", 6, "recent", "keep"),     # steady state, memory ready
    ("memrope_ema", 6, "all", "reset"),       # steady state, memory reset: its slots unattended
    ("memrope_eviction", 6, "all", "keep"),
    ("global_noevict", 3, "recent", "keep"),
]


@pytest.mark.parametrize("policy,at,mode,memory", CASES)
def test_recached_kv_equal_independent_recomputation(golden_dit, prompts, policy, at, mode, memory):
    run = golden_run(policy)
    first, second = prompts
    recorder = Recorder(EagerBackend(golden_dit, run))
    stream = MemRoPEPipeline(recorder, run).stream(first, _noise())
    clean = torch.cat([stream.next_block().x0.clone() for _ in range(at)], dim=1)
    cache = stream.cache
    before = [cache.keys.clone(), cache.values.clone()]
    before += [cache.memory_keys.clone(), cache.memory_values.clone()] if cache.memory_keys is not None else \
        [torch.zeros(0), torch.zeros(0)]
    lay = stream.layout
    filled = min(3 * at, lay.cache_frames)
    rolled = 3 * at > lay.cache_frames
    if rolled:  # spec 4.4: sink frames 0..2, then the tail holds the newest tail_frames frames in order
        slots = torch.cat([clean[:, :lay.sink_frames], clean[:, :lay.memory_frames] * 0,
                           clean[:, 3 * at - lay.tail_frames:]], dim=1)
    else:
        slots = torch.cat([clean, clean.new_zeros(1, lay.cache_frames - 3 * at, *LATENT)], dim=1)
    if memory == "reset":
        before[2].zero_()
        before[3].zero_()
    memory_ready = rolled and memory == "keep"

    stream.set_prompt(second, recache=mode, memory=memory)
    stream.next_block()
    cross_k, cross_v = golden_dit.encode_text(second)
    keys, values, groups = _expected_recache(golden_dit, run, before, slots, (cross_k, cross_v), filled, rolled,
                                             memory_ready, mode)
    assert groups, "the case re-caches something"
    (call,) = recorder.recaches
    S, start = lay.frame_tokens, lay.tail_start_frame * lay.frame_tokens
    for i in range(golden_dit.config.num_layers):
        got_k = call["feeds"][past_key(i)] if i < golden_dit.config.num_layers - 1 else None
        if got_k is not None:  # the sink the tail saw (fresh for 'all'), unchanged otherwise
            torch.testing.assert_close(got_k[:, :lay.sink_frames * S], keys[i, :, :lay.sink_frames * S],
                                       atol=1e-5, rtol=0)
            if mode != "all":
                assert torch.equal(got_k[:, :start], before[0][i, :, :start])
        torch.testing.assert_close(call["outputs"][recached_key(i)], keys[i, :, start:], atol=1e-5, rtol=0)
        torch.testing.assert_close(call["outputs"][recached_value(i)], values[i, :, start:], atol=1e-5, rtol=0)
    if lay.has_memory:
        assert torch.equal(call["feeds"][memory_key(0)], before[2][0])
        assert bool(call["feeds"]["memory_ready"]) == memory_ready
    stream.close()


def test_onnxruntime_matches_eager_per_call_across_switches(golden_dit, artifacts, prompts):
    run = replace(golden_run("memrope_ema"), num_output_frames=3 * 9)
    first, second = prompts
    changes = [PromptChange(2, second, recache="all"), PromptChange(5, first, recache="recent", memory="reset"),
               PromptChange(7, second, recache="recent", transition_blocks=1)]
    records = {}
    for backend in (EagerBackend(golden_dit, run), OnnxRuntimeBackend(artifacts["memrope_ema"])):
        recorder, calls = Recorder(backend), []
        latents = _generate(recorder, run, first, 9, changes, on_call=calls.append)
        records[backend.name] = (calls, recorder.recaches, latents)
    eager_calls, eager_recaches, eager_latents = records["eager"]
    ort_calls, ort_recaches, ort_latents = records["onnxruntime"]
    assert len(eager_calls) == len(ort_calls) == 9 * 5 and len(eager_recaches) == len(ort_recaches) == 3
    for a, b in zip(eager_calls, ort_calls, strict=True):
        pairs = [(a.outputs.flow, b.outputs.flow), (a.outputs.x0, b.outputs.x0)]
        pairs += list(zip(a.outputs.block_keys + a.outputs.block_values + a.outputs.memory_keys,
                          b.outputs.block_keys + b.outputs.block_values + b.outputs.memory_keys, strict=True))
        for x, y in pairs:
            torch.testing.assert_close(y, x, atol=1e-5, rtol=0, msg=lambda m, a=a: f"block {a.block} call {a.call}: {m}")
    for a, b in zip(eager_recaches, ort_recaches, strict=True):
        for name, tensor in a["outputs"].items():
            torch.testing.assert_close(b["outputs"][name], tensor, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(ort_latents, eager_latents, atol=1e-5, rtol=0)


def test_onnxruntime_writes_the_recache_into_the_cache(artifacts, prompts):
    """The recache graph's outputs are bound to views of the stream's cache: no buffer of the
    backend's own, and the cache and every feed keep their addresses across switches."""
    run = replace(golden_run("memrope_ema"), num_output_frames=3 * 8)
    first, second = prompts
    backend = OnnxRuntimeBackend(artifacts["memrope_ema"])
    stream = MemRoPEPipeline(backend, run).stream(first, _noise())
    addresses = [t.data_ptr() for t in (stream.cache.keys, stream.cache.values, *stream.feeds.values(),
                                        *stream._recache_feeds.values())]
    for block in range(8):
        if block in (3, 6):
            stream.set_prompt(second if block == 3 else first, recache="all")
        stream.next_block()
        assert addresses == [t.data_ptr() for t in (stream.cache.keys, stream.cache.values, *stream.feeds.values(),
                                                    *stream._recache_feeds.values())]
    assert backend._recache.outputs is None
    (_, _, copies, _), = [entry[1] for entry in backend._recache.bindings._by_id.values()]
    assert copies == []  # batch 1: every output bound in place, nothing copied
    key0 = stream._recache_outputs[recached_key(0)]
    assert key0.untyped_storage().data_ptr() == stream.cache.keys.untyped_storage().data_ptr()
    stream.close()


def test_memory_keep_and_reset(golden_dit, prompts):
    """keep: the memory is untouched by the switch, then updated by the next eviction (long and
    short differ); reset: zeroed and unattended, then initialised afresh (long = short)."""
    run = golden_run("memrope_ema")
    first, second = prompts
    for memory in ("keep", "reset"):
        stream = MemRoPEPipeline(EagerBackend(golden_dit, run), run).stream(first, _noise())
        for _ in range(6):
            stream.next_block()
        kept = stream.cache.memory_keys.clone()
        stream.set_prompt(second, memory=memory)
        result = stream.next_block()
        assert result.plan.memory_step == ("update" if memory == "keep" else "init")
        mem = stream.cache.memory_keys
        long_equals_short = torch.equal(mem[:, :, 0], mem[:, :, 1])
        assert long_equals_short == (memory == "reset")
        assert not torch.equal(mem, kept)
        stream.close()


def test_transition_blends_cross_keys_linearly(golden_dit, prompts):
    run = golden_run("memrope_ema")
    first, second = prompts
    recorder = Recorder(EagerBackend(golden_dit, run))
    _generate(recorder, run, first, 8, [PromptChange(3, second, transition_blocks=2)])
    old_k, old_v = golden_dit.encode_text(first)
    new_k, new_v = golden_dit.encode_text(second)
    for block in range(8):
        weight = min(max(block - 3 + 1, 0), 3) / 3
        call = recorder.step_calls[5 * block]
        assert torch.equal(call[cross_key(0)], torch.lerp(old_k[0], new_k[0], weight)), block
        assert torch.equal(call[cross_value(1)], torch.lerp(old_v[1], new_v[1], weight)), block


def test_changes_for_one_boundary_merge_into_one(golden_dit, prompts):
    """A burst of changes before one block (a client sending several): one pending prompt, the
    last's prompt and transition, starting from what the last block attended to, a memory reset
    if any asked, the largest re-cache; the same calls as the single merged change."""
    run = golden_run("memrope_ema")
    first, second = prompts
    third = 0.5 * (first + second)
    recorders = []
    for burst in ([(second, {"memory": "reset", "recache": "recent"}), (first, {}),
                   (third, {"transition_blocks": 2})],
                  [(third, {"memory": "reset", "recache": "recent", "transition_blocks": 2})]):
        recorder = Recorder(EagerBackend(golden_dit, run))
        stream = MemRoPEPipeline(recorder, run).stream(first, _noise())
        for _ in range(6):
            stream.next_block()
        for embeds, options in burst:
            stream.set_prompt(embeds, **options)
        assert len(stream._pending) == 1
        for _ in range(3):
            stream.next_block()
        stream.close()
        recorders.append(recorder)
    burst, merged = recorders
    assert len(burst.recaches) == len(merged.recaches) == 1
    for a, b in zip(burst.step_calls, merged.step_calls, strict=True):
        assert all(torch.equal(a[name], b[name]) for name in a)
    old_k, _ = golden_dit.encode_text(first)
    new_k, _ = golden_dit.encode_text(third)
    # Block 6 is the transition's first: 1/3 of the way from the prompt block 5 saw.
    assert torch.equal(burst.step_calls[5 * 6][cross_key(0)], torch.lerp(old_k[0], new_k[0], 1 / 3))


def test_set_prompt_refuses_bad_options(golden_dit, prompts):
    run = golden_run("memrope_ema")
    first, second = prompts
    stream = MemRoPEPipeline(EagerBackend(golden_dit, run), run).stream(first, _noise())
    stream.next_block()
    for kwargs, match in (({"recache": "window"}, "recache must be one of"),
                          ({"memory": "forget"}, "memory must be one of"),
                          ({"transition_blocks": -1}, "transition_blocks"),
                          ({"at_block": 0}, "at_block must be an integer >= the next block")):
        with pytest.raises(ValueError, match=match):
            stream.set_prompt(second, **kwargs)
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        stream.set_prompt(second[0])
    assert not stream._pending
    bounded = MemRoPEPipeline(EagerBackend(golden_dit, run), run).stream(first, _noise(), max_blocks=4)
    with pytest.raises(ValueError, match="past the end: this stream was opened for 4 blocks"):
        bounded.set_prompt(second, at_block=4)

    backend = Recorder(EagerBackend(golden_dit, run))
    backend.can_recache = False
    other = MemRoPEPipeline(backend, run).stream(first, _noise())
    with pytest.raises(ValueError, match="cannot re-cache"):
        other.set_prompt(second, recache="recent")
    odd_sink = replace(run, cache=replace(run.cache, sink_frames=2))
    odd = MemRoPEPipeline(EagerBackend(golden_dit, odd_sink), odd_sink).stream(first, _noise())
    with pytest.raises(ValueError, match="multiple of the block size"):
        odd.set_prompt(second, recache="all")
