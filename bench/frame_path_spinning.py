"""Experiment: ONNX Runtime's intra-op spinning and the frame path's overlap on a 2-core CPU.

For the bench presets (random weights), exports the DiT and VAE graphs once, then measures with
ONNX Runtime on the CPU: the VAE decode per block alone, and ``stream_video`` end to end without
and with overlap, for three settings of ``session.intra_op.allow_spinning``: both sessions
spinning (ONNX Runtime's default), only the DiT's (the engine's default since the VAE session
turned it off), neither. The DiT session's option is not exposed by ``OnnxRuntimeBackend``, so
this script sets it by wrapping ``InferenceSession``: an experiment, not a product setting.
Results: ``bench/results/frame_path_spinning.json``.

Usage: flock /tmp/memrope-heavy.lock python bench/frame_path_spinning.py [--presets demo,mid] [--blocks 12]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import onnxruntime
import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = {"both spin": (True, True), "DiT spins, VAE not (engine default)": (True, False), "neither spins": (False, False)}


def _patch_dit_spinning(enabled: bool) -> None:
    original = onnxruntime.InferenceSession.__init__

    def init(self, path, sess_options=None, *args, **kwargs):
        if sess_options is not None and not enabled and "vae_decode" not in str(path):
            sess_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        original(self, path, sess_options, *args, **kwargs)

    onnxruntime.InferenceSession.__init__ = init


def measure(artifact_dir: Path, dit_spins: bool, vae_spins: bool, blocks: int) -> dict:
    from engine.onnxruntime_backend import OnnxRuntimeBackend
    from engine.vae_onnxruntime_backend import OnnxRuntimeVAEBackend
    from memrope.artifact import load_artifact
    from memrope.pipeline import MemRoPEPipeline
    from memrope.sampler import StreamingSeededNoise
    from runtime.bench import _ArrivalWriter
    from runtime.t2v import stream_video
    from runtime.vae import VAEStream

    _patch_dit_spinning(dit_spins)
    artifact = load_artifact(artifact_dir)
    run = replace(artifact.run, num_output_frames=3 * blocks)
    latent = (run.latent_channels, run.latent_height, run.latent_width)
    embeds = torch.randn(1, artifact.model.text_len, artifact.model.text_dim, generator=torch.Generator().manual_seed(1))
    out = {}
    with OnnxRuntimeBackend(artifact, provider="cpu") as dit:
        pipeline = MemRoPEPipeline(dit, run)
        for overlap in (False, True):
            vae = OnnxRuntimeVAEBackend(artifact, provider="cpu", spinning=vae_spins)
            with VAEStream(vae, 3, overlap=overlap) as stream:
                stream_video(pipeline, embeds, StreamingSeededNoise(0, 1, latent, 3), 3, stream, _ArrivalWriter(),
                             progress=False)
                writer, start = _ArrivalWriter(), time.perf_counter()
                stream_video(pipeline, embeds, StreamingSeededNoise(0, 1, latent, 3), blocks, stream, writer,
                             progress=False)
            arrivals = [start, *writer.arrivals]
            steady = [(b - a) * 1e3 for a, b in zip(arrivals[1:], arrivals[2:])]
            out["overlap_block_ms" if overlap else "serial_block_ms"] = statistics.median(steady)
        noise = StreamingSeededNoise(0, 1, latent, 3)
        start = time.perf_counter()
        count = 0
        for _ in pipeline.blocks(embeds, noise, blocks):
            count += 1
        out["dit_alone_block_ms"] = (time.perf_counter() - start) * 1e3 / count
    vae = OnnxRuntimeVAEBackend(artifact, provider="cpu", spinning=vae_spins)
    with VAEStream(vae, 3) as stream:
        g = torch.Generator().manual_seed(2)
        for _ in range(blocks + 3):
            stream.decode(torch.randn(1, 3, *latent, generator=g))
        out["vae_alone_block_ms"] = statistics.median(stream.decode_ms[3:])
    out["overlap_vs_max"] = out["overlap_block_ms"] / max(out["dit_alone_block_ms"], out["vae_alone_block_ms"])
    return out


def export(preset_name: str, workdir: Path) -> Path:
    from export.onnx_export import export_artifact
    from memrope.config import model_preset
    from memrope.model import build_dit, random_state_dict
    from memrope.vae import WanStreamingDecoder
    from runtime.bench import BENCH_PRESETS, bench_run_config, bench_vae

    preset = BENCH_PRESETS[preset_name]
    model = model_preset(preset.model)
    run = bench_run_config(model, preset.height, preset.width, 4)
    path = workdir / preset_name
    export_artifact(build_dit(model, random_state_dict(model)), run, path, height=preset.height, width=preset.width,
                    validate=False, vae=WanStreamingDecoder.from_diffusers(bench_vae(preset)))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="demo,mid")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "frame_path_spinning.json")
    args = parser.parse_args()
    if args.child:
        path, dit_spins, vae_spins, blocks = args.child
        print(json.dumps(measure(Path(path), dit_spins == "1", vae_spins == "1", int(blocks))))
        return 0
    import subprocess

    results = []
    with tempfile.TemporaryDirectory(prefix="memrope-spin-") as tmp:
        for preset in args.presets.split(","):
            path = export(preset, Path(tmp))
            for mode, (dit_spins, vae_spins) in MODES.items():
                # One process per setting: the monkeypatch and the thread pools stay its own.
                line = subprocess.run([sys.executable, __file__, "--child", str(path), str(int(dit_spins)),
                                       str(int(vae_spins)), str(args.blocks)], check=True, capture_output=True,
                                      text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()[-1]
                row = {"preset": preset, "mode": mode, **json.loads(line)}
                print(json.dumps(row), flush=True)
                results.append(row)
    from memrope.io import atomic_write

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}, "blocks": args.blocks}
    atomic_write(args.out, json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
