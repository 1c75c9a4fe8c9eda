"""Every backend behind the same loop: eager, compiled (torch.compile) and ONNX Runtime agree
call by call, every output, over 24 blocks that cross the fill -> first eviction -> steady
transitions; each reproduces the golden traces, and the loop's buffers keep their addresses.
GPU variants are gated."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import TRACES, golden_run, golden_trace

from memrope.backend import Backend
from memrope.engine.compiled_backend import CompiledBackend
from memrope.engine.eager_backend import EagerBackend
from memrope.engine.onnxruntime_backend import OnnxRuntimeBackend
from memrope.pipeline import MemRoPEPipeline
from memrope.sampler import StreamingSeededNoise, TensorNoise

BLOCKS = 24


@pytest.fixture(scope="module")
def compiled_backends(golden_dit):
    return {name: CompiledBackend(golden_dit, golden_run(name)) for name in TRACES}


def _run(backend, run, embeds, noise, blocks):
    calls, latents = [], []
    with backend:
        for block in MemRoPEPipeline(backend, run).blocks(embeds, noise, blocks, on_call=calls.append):
            latents.append(block.x0.clone())
    return calls, torch.cat(latents, dim=1)


@pytest.mark.parametrize("name", sorted(TRACES))
def test_compiled_reproduces_golden(name, compiled_backends, golden_inputs):
    run = golden_run(name)
    noise = TensorNoise(golden_inputs["noise"], golden_inputs["intermediate_noise"], 3)
    _, latents = _run(compiled_backends[name], run, golden_inputs["prompt_embeds"], noise, run.num_blocks)
    torch.testing.assert_close(latents, golden_trace(name)["output_latents"], atol=1e-4, rtol=0)


def _named_outputs(outputs) -> dict[str, torch.Tensor]:
    """Every output of one call by a readable name (``memory_values.1``): nothing left out."""
    named = {"flow": outputs.flow, "x0": outputs.x0}
    for field in ("block_keys", "block_values", "memory_keys", "memory_values"):
        named.update({f"{field}.{i}": t for i, t in enumerate(getattr(outputs, field))})
    return named


@pytest.mark.parametrize("name", ["memrope_ema", "memrope_eviction"])
def test_backends_agree_call_by_call_across_transitions(name, golden_dit, compiled_backends, artifacts,
                                                        golden_inputs):
    """Compiled and ONNX Runtime against eager, every output of every call of 24 blocks: the
    rollout crosses fill -> first eviction -> steady (and, for ema, memory init -> update)."""
    run = replace(golden_run(name), num_output_frames=3 * BLOCKS)
    backends = [EagerBackend(golden_dit, run), compiled_backends[name], OnnxRuntimeBackend(artifacts[name])]
    results = {}
    for backend in backends:
        noise = StreamingSeededNoise(0, 1, (16, 4, 6), 3)
        results[backend.name] = _run(backend, run, golden_inputs["prompt_embeds"], noise, BLOCKS)
    eager_calls, eager_latents = results["eager"]
    assert [(c.block, c.call) for c in eager_calls] == [(b, i) for b in range(BLOCKS) for i in range(5)]
    phases = {(c.plan.roll, c.plan.memory_step if c.call == 0 else "none") for c in eager_calls}
    assert {(False, "none"), (True, "none")} <= phases
    layers = golden_dit.config.num_layers
    memory_layers = layers if name == "memrope_ema" else 0
    if memory_layers:
        assert {(True, "init"), (True, "update")} <= phases
    for other in ("compiled", "onnxruntime"):
        calls, latents = results[other]
        assert len(calls) == len(eager_calls), f"{other}: {len(calls)} calls recorded, eager {len(eager_calls)}"
        for a, b in zip(eager_calls, calls, strict=True):
            assert (a.block, a.call) == (b.block, b.call)
            want, got = _named_outputs(a.outputs), _named_outputs(b.outputs)
            assert len(want) == 2 + 2 * layers + 2 * memory_layers and got.keys() == want.keys(), sorted(got)
            for key, expected in want.items():
                torch.testing.assert_close(got[key], expected, atol=1e-5, rtol=0,
                                           msg=lambda m, key=key, other=other, a=a: f"{other} block {a.block} call {a.call} {key}: {m}")
        torch.testing.assert_close(latents, eager_latents, atol=1e-5, rtol=0)


class _AddressRecorder(Backend):
    """Wraps a real backend and records the address of every input at every call."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name, self.model, self.layout = "recorder", inner.model, inner.layout
        self.dtype, self.device = inner.dtype, inner.device
        self.addresses: list[dict[str, int]] = []

    def encode_text(self, prompt_embeds):
        return self.inner.encode_text(prompt_embeds)

    def step(self, feeds):
        self.addresses.append({k: v.data_ptr() for k, v in feeds.items()})
        return self.inner.step(feeds)


def test_loop_buffers_keep_their_addresses(golden_dit, golden_inputs):
    run = replace(golden_run("memrope_ema"), num_output_frames=3 * 8)
    recorder = _AddressRecorder(EagerBackend(golden_dit, run))
    _run(recorder, run, golden_inputs["prompt_embeds"], StreamingSeededNoise(0, 1, (16, 4, 6), 3), 8)
    first = recorder.addresses[0]
    assert all(a == first for a in recorder.addresses)
    assert len(first) == 3 + 4 * golden_dit.config.num_layers + 6 + 2 * golden_dit.config.num_layers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_compiled_cuda_graphs_match_eager_in_bf16(tiny_config):
    from memrope.model import build_dit, random_state_dict

    run = replace(golden_run("memrope_ema"), num_output_frames=3 * 8)
    state = random_state_dict(tiny_config)
    ref = {}
    for label, dtype, cls in (("fp32", torch.float32, EagerBackend), ("eager", torch.bfloat16, EagerBackend),
                              ("compiled", torch.bfloat16, CompiledBackend)):
        dit = build_dit(tiny_config, state, dtype=dtype, device="cuda")
        g = torch.Generator().manual_seed(3)
        embeds = torch.randn(1, tiny_config.text_len, tiny_config.text_dim, generator=g)
        # Same bf16-drawn noise for every run; the loop casts it to each model's dtype.
        noise = StreamingSeededNoise(0, 1, (16, 4, 6), 3, torch.bfloat16)
        _, ref[label] = _run(cls(dit, run), run, embeds, noise, 8)
    err_eager = (ref["eager"].float() - ref["fp32"]).abs().max()
    err_compiled = (ref["compiled"].float() - ref["fp32"]).abs().max()
    assert err_compiled <= 2 * err_eager + 1e-6


def _ort_cuda_missing() -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run here, or None when it can."""
    import onnxruntime

    missing = []
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        missing.append("this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU")
    return "; ".join(missing) or None


@pytest.mark.gpu
@pytest.mark.skipif(_ort_cuda_missing() is not None, reason=f"ONNX Runtime CUDA EP: {_ort_cuda_missing()}")
def test_onnxruntime_cuda_io_binding_matches_eager(golden_dit, artifacts, golden_inputs):
    """The CUDA execution provider bound to the loop's device buffers, with and without CUDA graphs."""
    run = replace(golden_run("memrope_ema"), num_output_frames=3 * 8)
    results = {}
    for label, backend in (("eager", EagerBackend(golden_dit, run)),
                           ("cuda", OnnxRuntimeBackend(artifacts["memrope_ema"], provider="cuda", cuda_graph=False)),
                           ("cuda-graph", OnnxRuntimeBackend(artifacts["memrope_ema"], provider="cuda"))):
        noise = StreamingSeededNoise(0, 1, (16, 4, 6), 3)
        _, results[label] = _run(backend, run, golden_inputs["prompt_embeds"], noise, 8)
    torch.testing.assert_close(results["cuda"].cpu(), results["eager"], atol=1e-4, rtol=0)
    torch.testing.assert_close(results["cuda-graph"].cpu(), results["cuda"].cpu(), atol=0, rtol=0)


def test_a_closed_stream_leaves_no_buffer_alive_in_the_backend(golden_dit, artifacts, golden_inputs):
    """Backends bind a stream's buffers once; when the stream is closed and dropped, its cache is
    freed (a server's finished sessions must give their memory back)."""
    import gc
    import weakref

    run = golden_run("memrope_ema")
    for backend in (EagerBackend(golden_dit, run), OnnxRuntimeBackend(artifacts["memrope_ema"])):
        pipeline = MemRoPEPipeline(backend, run)
        stream = pipeline.stream(golden_inputs["prompt_embeds"], StreamingSeededNoise(0, 1, (16, 4, 6), 3))
        stream.next_block()
        cache = weakref.ref(stream.cache.keys)
        stream.close()
        del stream
        gc.collect()
        assert cache() is None, f"{backend.name} keeps a closed stream's cache alive"
