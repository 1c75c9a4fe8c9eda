"""A block's clean latents must be finite and within the documented bound
(``memrope.pipeline.MAX_ABS_LATENT``): a spike in the noise that sends them past it stops the run
at that block, on every backend (the check runs in the loop on whatever the backend returned), in
``memrope generate`` and in a ``memrope serve`` session; and log lines printed while the progress
bar is shown are not glued to it."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import golden_run
from safetensors.torch import load_file, save_file

from memrope.engine.eager_backend import EagerBackend
from memrope.pipeline import MAX_ABS_LATENT, MemRoPEPipeline
from memrope.runtime.cli import main
from memrope.sampler import TensorNoise

BLOCK_FRAMES = 3  # the golden configs'
SPIKES = (1e6, 1e20, 1e30)  # 1e6 gives a peak |x0| of ~4e3, 1e20 ~4e17; 1e30 overflows eager to NaN
BLOCKS = (0, 4)  # the first block (no cache yet) and one in the middle of the 10


def _spiked_noise(golden_dir, tmp_path, spike: float, block: int):
    """The golden inputs with one noise value set to ``spike``, in the middle frame of ``block``."""
    tensors = load_file(str(golden_dir / "inputs.safetensors"))
    noise = tensors["noise"].clone()
    noise[0, block * BLOCK_FRAMES + 1, 0, 0, 0] = spike
    tensors["noise"] = noise
    path = tmp_path / "spiked.safetensors"
    save_file(tensors, str(path))
    return path


def _generate_args(backend: str, golden_dir, artifacts, noise, out) -> list[str]:
    if backend == "eager":
        model = ["--checkpoint", str(golden_dir / "tiny_selfforcing.pt"),
                 "--model-config", str(golden_dir / "config.json")]
    else:
        model = ["--engine", str(artifacts["memrope_ema"])]
    return ["generate", *model, "--backend", backend, "--config", str(golden_dir / "memrope_ema.yaml"),
            "--text-embeds", str(golden_dir / "inputs.safetensors"), "--noise", str(noise),
            "--no-decode", "--no-progress", "--latents-out", str(out)]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("spike", SPIKES)
@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_a_noise_spike_stops_the_run_at_its_block(backend, spike, block, golden_dir, artifacts, tmp_path, capsys):
    noise = _spiked_noise(golden_dir, tmp_path, spike, block)
    out = tmp_path / "out" / "latents.safetensors"
    assert main(_generate_args(backend, golden_dir, artifacts, noise, out)) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("memrope generate: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert f"block {block} (latent frames {block * BLOCK_FRAMES}..{block * BLOCK_FRAMES + 2})" in line, line
    assert f"{MAX_ABS_LATENT:g}" in line, line  # the bound is named
    if "NaN or Inf" not in line:  # a finite excursion: its peak is named too
        assert "out of range: max |x0| " in line, line
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_the_golden_run_stays_well_inside_the_bound(golden_dit, golden_inputs):
    """The bound is generous: the golden model's clean latents peak at ~5, 200x below it."""
    run = golden_run("memrope_ema")
    noise = TensorNoise(golden_inputs["noise"], golden_inputs["intermediate_noise"], run.cache.block_frames)
    pipeline = MemRoPEPipeline(EagerBackend(golden_dit, run), run)
    for block in pipeline.blocks(golden_inputs["prompt_embeds"], noise, run.num_blocks):
        block.check_finite()
        assert float(block.finite) == 0.0
        assert block.x0.abs().max() < MAX_ABS_LATENT / 100


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_flag_is_computed_for_low_precision_models(dtype, tiny_config, golden_inputs):
    """A bf16 or fp16 model's x0 is checked in float32 (the scratch is float32 whatever the dtype)."""
    from memrope.model import build_dit, random_state_dict

    run = golden_run("memrope_ema")
    dit = build_dit(tiny_config, random_state_dict(tiny_config, seed=1), dtype=dtype)
    noise = TensorNoise(golden_inputs["noise"], golden_inputs["intermediate_noise"], run.cache.block_frames)
    block = next(iter(MemRoPEPipeline(EagerBackend(dit, run), run).blocks(
        golden_inputs["prompt_embeds"].to(dtype), noise, 1)))
    block.check_finite()
    assert block.x0.dtype == dtype and float(block.finite) == 0.0


def test_the_bound_is_a_pipeline_setting(golden_dit, golden_inputs):
    run = golden_run("memrope_ema")
    noise = TensorNoise(golden_inputs["noise"], golden_inputs["intermediate_noise"], run.cache.block_frames)
    backend = EagerBackend(golden_dit, run)
    pipeline = MemRoPEPipeline(backend, run, max_abs_latent=1.0)
    block = next(iter(pipeline.blocks(golden_inputs["prompt_embeds"], noise, 1)))
    peak = float(block.x0.abs().max())
    assert float(block.finite) == peak > 1.0  # the flag carries the peak: the message needs no second read
    with pytest.raises(Exception, match=rf"block 0 .* out of range: max \|x0\| {peak:.3g} > 1 "):
        block.check_finite()
    for bad in (0.0, -1.0, float("nan"), "1e3", True):
        with pytest.raises(ValueError, match="max_abs_latent"):
            MemRoPEPipeline(backend, run, max_abs_latent=bad)


def test_a_serve_session_whose_block_leaves_the_bound_ends_with_the_reason(golden_dit, golden_inputs):
    """The worker's check of a block (after its decode) fails the session, naming the block and
    the bound, and frees its stream."""
    from memrope.runtime.serve.metrics import ServeStats
    from memrope.runtime.serve.worker import ModelWorker

    run = golden_run("memrope_ema")
    noise_frames = golden_inputs["noise"].clone()
    noise_frames[0, 1, 0, 0, 0] = 1e6
    noise = TensorNoise(noise_frames, golden_inputs["intermediate_noise"], run.cache.block_frames)
    stream = MemRoPEPipeline(EagerBackend(golden_dit, run), run).stream(golden_inputs["prompt_embeds"], noise)
    chunks, failures = [], []
    session = SimpleNamespace(id="s0", stream=stream, decode=lambda x0: x0.float().cpu(), cache_bytes=0,
                              push=chunks.append, prompt_version=0)
    stats = ServeStats()
    worker = ModelWorker(None, stats, on_failure=lambda s, message: failures.append((s, message)))
    worker._run_block(session)
    assert chunks == [] and stats.sessions_failed == 1
    assert session.stream is None and stream.closed
    [(failed, message)] = failures
    assert failed is session
    assert message.startswith("NonFiniteError: block 0 (latent frames 0..2) produced latents out of range"), message
    assert f"> {MAX_ABS_LATENT:g}" in message, message


def test_log_lines_are_not_glued_to_the_progress_bar(golden_dir, tmp_path):
    """A warning logged mid-run (a NaN block kept with --allow-nonfinite) while the bar is shown
    starts its own line: logging goes through tqdm while the bar is up."""
    noise = _spiked_noise(golden_dir, tmp_path, 1e30, 1)  # block 1 and every later one turn NaN
    out = tmp_path / "latents.safetensors"
    args = _generate_args("eager", golden_dir, None, noise, out)
    args.remove("--no-progress")
    proc = subprocess.run([sys.executable, "-m", "memrope", *args, "--allow-nonfinite"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.split("\n") if "; kept (--allow-nonfinite)" in line]
    assert len(lines) == 9, proc.stderr  # blocks 1..9
    assert "generating" in proc.stderr  # the bar was shown
    for line in lines:
        # What a terminal shows of the line: the text after its last carriage return.
        assert line.split("\r")[-1].startswith("WARNING memrope.runtime.t2v: block "), repr(line)
