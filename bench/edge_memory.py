"""The edge memory table: which precision of Wan2.1-1.3B fits an 8, 12, 16 or 24 GB card, at
832x480 and at 480x272, beside its cache, the VAE and the text encoder.

Computed, not run (no GPU here), from:

* the **contract** of each size (``memrope.contract``): every buffer the step graph reads and
  writes (the KV cache, the two memory frames, the prompt's cross-attention keys and values, the
  block's outputs) and the streaming VAE decoder's feature caches, at their exported dtype;
* the **plan sizes** TensorRT-RTX built ahead of time (``bench/results/tensorrt_rtx_build*.json``:
  bf16, fp8 and int4-wo at 832x480). A plan is its weights plus a small remainder; the weights of
  every mode come from the DiT's own parameters (which Linear layers each mode quantizes, and how
  it stores them), and the remainder from the measured bf16 plan. The fp8 and int4-wo plans check
  that reckoning;
* the **text encoder**, umT5-XXL's encoder (Wan2.1's), from its published sizes, in bf16.

What it cannot know here is the engine's activation memory (TensorRT's device memory for one call)
and the CUDA context: both are estimates, named as such in the table, until ``bench/gpu_check.py``
measures them on a card.

    python bench/edge_memory.py --out bench/results/edge_memory.json --report docs/edge_memory.md
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
from pathlib import Path

import torch

from memrope.cache import CacheLayout
from memrope.config import RunConfig, frame_tokens, model_preset
from memrope.contract import step_contract, vae_decode_contract
from memrope.export.quantize import INT4_BLOCK_SIZE, QUANTIZED_LAYERS
from memrope.model import WanCausalDiT
from memrope.vae import VAEDecoderConfig, WanStreamingDecoder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GIB = 1 << 30
MB = 1e6  # the build reports' MB
SIZES = {"832x480": (60, 104), "480x272": (34, 60)}  # latent (height, width): pixels / 8
CARDS_GB = (8, 12, 16, 24)
# Bytes per weight of a quantized Linear, scales included: fp8 and int8 one byte (a scale per
# tensor or output channel: negligible); int4 half a byte and a bf16 scale per 128-weight block.
QUANTIZED_BYTES = {"bf16": 2.0, "fp8": 1.0, "int8-wo": 1.0, "int4-wo": 0.5 + 2.0 / INT4_BLOCK_SIZE}
# umT5-XXL's encoder (Wan2.1's text encoder): 24 layers, width 4096, gated FFN 10240, 64 heads of
# 64, a 256,384-token vocabulary, relative position buckets per layer.
UMT5_XXL = {"layers": 24, "d_model": 4096, "d_ff": 10240, "heads": 64, "vocab": 256384, "buckets": 32}
# Estimates, until measured on a card: the CUDA context with TensorRT's runtime loaded.
CUDA_CONTEXT_GIB = 0.5


def umt5_xxl_encoder_params(c: dict = UMT5_XXL) -> int:
    d, inner = c["d_model"], c["heads"] * 64
    per_layer = 4 * d * inner + 3 * d * c["d_ff"] + 2 * d + c["buckets"] * c["heads"]
    return c["vocab"] * d + c["layers"] * per_layer + d


def dit_weights() -> dict:
    """Parameters of the 1.3B DiT by graph (step, or text: the prompt's cross-attention K/V
    projections) and by whether the quantized modes quantize them."""
    with torch.device("meta"):
        dit = WanCausalDiT(model_preset("wan-1.3b"))
    counts = {"step": {"quantized": 0, "kept": 0}, "text": {"quantized": 0, "kept": 0}}
    for name, p in dit.named_parameters():
        module = name.rsplit(".", 1)[0]
        text = name.startswith("text_embedding.") or fnmatch.fnmatch(module, "blocks.*.cross_attn.[kv]") \
            or fnmatch.fnmatch(module, "blocks.*.cross_attn.norm_k")
        quantized = name.endswith(".weight") and any(fnmatch.fnmatch(module, pat) for pat in QUANTIZED_LAYERS)
        counts["text" if text else "step"]["quantized" if quantized else "kept"] += p.numel()
    return counts


def weight_bytes(counts: dict, mode: str) -> float:
    return counts["quantized"] * QUANTIZED_BYTES[mode] + counts["kept"] * 2.0


def _plans() -> dict:
    plans = {}
    for mode, name in (("bf16", "tensorrt_rtx_build.json"), ("fp8", "tensorrt_rtx_build_fp8.json"),
                       ("int4-wo", "tensorrt_rtx_build_int4-wo.json")):
        for result in json.loads((RESULTS / name).read_text())["results"]:
            if result["preset"] == "wan-1.3b":
                plans[mode] = {graph: g["plan_mb"] * MB for graph, g in result["graphs"].items()}
    return plans


def activation_bytes(layout: CacheLayout, dim: int, ffn_dim: int) -> int:
    """An estimate of one step call's largest live activations in bf16, with fused attention (no
    score matrix): the FFN's hidden state in and out of its activation, and the rotated keys,
    values and queries of the whole window."""
    return 2 * (2 * layout.block_tokens * ffn_dim + 3 * (layout.context_tokens + layout.block_tokens) * dim)


def measure() -> dict:
    model = model_preset("wan-1.3b")
    counts = dit_weights()
    plans = _plans()
    # A plan = its weights + a remainder (engine code, per-target kernels), from the bf16 plans.
    remainder = {g: plans["bf16"][g] - weight_bytes(counts[g], "bf16") for g in ("step", "text")}
    dit = {}
    for mode in QUANTIZED_BYTES:
        dit[mode] = {f"{g}_plan_gib": (weight_bytes(counts[g], mode) + remainder[g]) / GIB for g in ("step", "text")}
        if mode in plans:
            dit[mode]["measured_step_plan_gib"] = plans[mode]["step"] / GIB
            dit[mode]["measured_text_plan_gib"] = plans[mode]["text"] / GIB
    with torch.device("meta"):
        vae_params = sum(p.numel() for p in WanStreamingDecoder(VAEDecoderConfig()).parameters())
    sizes = {}
    for size, (lh, lw) in SIZES.items():
        run = RunConfig(latent_height=lh, latent_width=lw)
        layout = CacheLayout.for_run(model, run)
        step = step_contract(model, run, layout, "bfloat16", 1)
        vae = vae_decode_contract(VAEDecoderConfig(), run, "bfloat16", 1)
        sizes[size] = {
            "frame_tokens": frame_tokens(model, lh, lw), "cache_tokens": layout.cache_tokens,
            "step_buffers_gib": sum(t.nbytes for t in (*step.inputs, *step.outputs)) / GIB,
            "vae_gib": (vae_params * 2 + sum(t.nbytes for t in vae.inputs if t.name.startswith("feat"))
                        + sum(t.nbytes for t in vae.outputs)) / GIB,
            "activations_gib_estimate": activation_bytes(layout, model.dim, model.ffn_dim) / GIB,
        }
    text_encoder_gib = umt5_xxl_encoder_params() * 2 / GIB
    table = {}
    for size, s in sizes.items():
        for mode, d in dit.items():
            base = d["step_plan_gib"] + d["text_plan_gib"] + s["step_buffers_gib"] + s["vae_gib"] \
                + s["activations_gib_estimate"] + CUDA_CONTEXT_GIB
            table[f"{size} {mode}"] = {
                "text_encoder_freed_gib": base, "with_recache_plan_gib": base + d["step_plan_gib"],
                "text_encoder_resident_gib": base + text_encoder_gib,
                "fits": {str(card): {"freed": base <= card, "recache": base + d["step_plan_gib"] <= card,
                                     "resident": base + text_encoder_gib <= card} for card in CARDS_GB}}
    return {"meta": {"date": datetime.date.today().isoformat(), "model": "wan-1.3b",
                     "note": "computed from the contracts and the measured plan sizes; activations and the "
                             "CUDA context are estimates"},
            "dit_parameters": counts, "dit": dit, "sizes": sizes, "vae_decoder_params": vae_params,
            "text_encoder": {"name": "umT5-XXL encoder", "params": umt5_xxl_encoder_params(),
                             "bf16_gib": text_encoder_gib},
            "cuda_context_gib_estimate": CUDA_CONTEXT_GIB, "table": table}


def report(doc: dict) -> str:
    def g(x: float) -> str:
        return f"{x:.2f}"
    dit, sizes = doc["dit"], doc["sizes"]
    lines = [f"# Edge memory: Wan2.1-1.3B on 8 to 24 GB cards ({doc['meta']['date']})", "",
             "Generated by `python bench/edge_memory.py` (computed, not run on a card: see its docstring). "
             "GiB throughout; a card's nominal size is taken as usable.", "",
             "## The parts", "", "Plans: computed from the weights (bf16's remainder added); the measured bf16 plan "
             "sets the remainder, the measured fp8 and int4-wo plans check the reckoning.", "",
             "| DiT precision | step plan | text plan | measured step plan |", "| --- | --- | --- | --- |"]
    for mode, d in dit.items():
        measured = d.get("measured_step_plan_gib")
        lines.append(f"| {mode} | {d['step_plan_gib']:.3f} | {d['text_plan_gib']:.3f} | "
                     f"{'not built here' if measured is None else f'{measured:.3f}'} |")
    lines += ["", "| size | frame tokens | cache tokens | step buffers (KV cache, memory, text K/V, outputs) | "
              "VAE decoder (weights + feature caches) | activations (estimate) |", "| --- | --- | --- | --- | --- | --- |"]
    for size, s in sizes.items():
        lines.append(f"| {size} | {s['frame_tokens']} | {s['cache_tokens']} | {g(s['step_buffers_gib'])} | "
                     f"{g(s['vae_gib'])} | {g(s['activations_gib_estimate'])} |")
    te = doc["text_encoder"]
    lines += ["", f"Text encoder: {te['name']}, {te['params'] / 1e9:.2f} B parameters, {g(te['bf16_gib'])} GiB in "
              f"bf16. CUDA context (estimate): {g(doc['cuda_context_gib_estimate'])} GiB.", "",
              "## What fits", "",
              "Total = DiT plans + step buffers + VAE + activations + CUDA context; *freed*: the text "
              "encoder runs once per prompt and is freed (or runs on the CPU); *recache*: prompt changes "
              "re-cache (`--prompt-recache`), whose plan holds the step's weights again; *resident*: the "
              "text encoder stays on the card.", "",
              "| size, DiT | freed | recache | resident | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in CARDS_GB) + " |"]
    for key, row in doc["table"].items():
        cells = []
        for card in CARDS_GB:
            fit = row["fits"][str(card)]
            cells.append("resident" if fit["resident"] else "recache" if fit["recache"] else
                         "freed" if fit["freed"] else "no")
        lines.append(f"| {key} | {g(row['text_encoder_freed_gib'])} | {g(row['with_recache_plan_gib'])} | "
                     f"{g(row['text_encoder_resident_gib'])} | " + " | ".join(cells) + " |")
    lines += ["", "A cell names the most a card holds: `resident` (everything, the text encoder too), "
              "`recache` (text encoder freed, re-cache plan loaded), `freed` (text encoder freed, no "
              "re-cache plan), `no` (the DiT does not fit beside its cache and the VAE)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "edge_memory.json")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "edge_memory.md")
    args = parser.parse_args()
    doc = measure()
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.report.write_text(report(doc))
    print(report(doc))
    return 0 if all(math.isfinite(r["text_encoder_freed_gib"]) for r in doc["table"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
