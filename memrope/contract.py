"""The IO contract: one description of the exported graphs' named inputs and outputs.

Owns: tensor names, shapes and dtypes of the ``step`` call (one DiT call with explicit cache
I/O), the ``text`` call (per-prompt cross-attention keys/values), the ``recache`` call (a
prompt switch re-encoding the cache's tail) and the optional ``vae_decode`` call (one streaming
VAE decode step with explicit feature-cache I/O), the cache layout they assume, and the hash
that binds an exported artifact to its configuration. The generation
loop's buffers, every backend, the export wrappers and the tests read names from here; nothing
else spells ``past_key_values.{i}.key``.

Legend: B batch, F frames per block, C latent channels, H/W latent height/width, Hd heads,
D head_dim, T text_len, M memory tokens per slot, Q tail frames (``CacheLayout.tail_frames``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from memrope.cache import CacheControls, CacheLayout
from memrope.config import RunConfig, WanConfig, config_hash
from memrope.model import StepOutputs
from memrope.vae import (
    STEP_LATENT_FRAMES,
    VAEDecoderConfig,
    check_engine_geometry,
    feature_cache_layout,
)

CONTRACT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

CONTROL_NAMES = ("key_positions", "key_valid", "query_positions", "memory_ready", "memory_init",
                 "memory_update")


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def memory_key(i: int) -> str:
    return f"memory.{i}.key"


def memory_value(i: int) -> str:
    return f"memory.{i}.value"


def cross_key(i: int) -> str:
    return f"cross_key_values.{i}.key"


def cross_value(i: int) -> str:
    return f"cross_key_values.{i}.value"


def present_key(i: int) -> str:
    return f"present.{i}.key"


def present_value(i: int) -> str:
    return f"present.{i}.value"


def present_memory_key(i: int) -> str:
    return f"present_memory.{i}.key"


def present_memory_value(i: int) -> str:
    return f"present_memory.{i}.value"


def recached_key(i: int) -> str:
    return f"recached.{i}.key"


def recached_value(i: int) -> str:
    return f"recached.{i}.value"


def feat_cache(i: int) -> str:
    """The VAE decoder's causal-conv feature cache ``i`` (``memrope.vae.feature_cache_layout`` order)."""
    return f"feat_cache.{i}"


def present_feat_cache(i: int) -> str:
    return f"present_feat_cache.{i}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.torch_dtype).element_size()

    def zeros(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.torch_dtype, device=device)


@dataclass(frozen=True)
class GraphContract:
    """Inputs and outputs of one graph, in the positional order of the exported function."""

    graph: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class ArtifactContract:
    """Everything a runtime needs to drive an exported artifact, and to refuse a stale one."""

    model: WanConfig
    run: RunConfig
    dtype: str
    batch: int
    height: int
    width: int
    layout: dict
    graphs: dict[str, GraphContract]
    vae: VAEDecoderConfig | None = None   # set when the artifact has a ``vae_decode`` graph
    # set when the DiT graphs carry Q/DQ: mode, ModelOpt version, calibration hash (export.quantize)
    quantization: dict | None = None

    @property
    def step(self) -> GraphContract:
        return self.graphs["step"]

    @property
    def text(self) -> GraphContract:
        return self.graphs["text"]

    @property
    def recache(self) -> GraphContract:
        return self.graphs["recache"]

    @property
    def config_hash(self) -> str:
        return artifact_hash(self.model, self.run, self.dtype, self.batch, self.height, self.width, vae=self.vae,
                             quantization=self.quantization)

    def to_json(self) -> dict[str, Any]:
        def graph(g: GraphContract) -> dict:
            return {"inputs": [asdict(t) for t in g.inputs], "outputs": [asdict(t) for t in g.outputs]}

        return {
            "contract_version": CONTRACT_VERSION,
            "config_hash": self.config_hash,
            "dtype": self.dtype,
            "batch": self.batch,
            "height": self.height,
            "width": self.width,
            "cache_layout": self.layout,
            "graphs": {name: graph(g) for name, g in self.graphs.items()},
            **({} if self.quantization is None else {"quantization": self.quantization}),
        }

    def write(self, path: Path, files: dict[str, dict] | None = None) -> None:
        """Write ``contract.json``; ``files`` pins the files its graphs load (size and SHA-256, see
        :func:`memrope.artifact.pin_files`)."""
        doc = self.to_json()
        if files is not None:
            doc["files"] = files
        path.write_text(json.dumps(doc, indent=1) + "\n")


def artifact_hash(model: WanConfig, run: RunConfig, dtype: str, batch: int, height: int, width: int,
                  vae: VAEDecoderConfig | None = None, quantization: dict | None = None) -> str:
    """Hash of what the graphs were specialised on. ``num_output_frames`` and ``seed`` only
    matter for the ``global`` policy (its cache is sized by the video length). An artifact
    with a VAE decoder also hashes its config, and a quantized one its quantization record (mode,
    ModelOpt version, calibration hash); without them, the hash is unchanged."""
    cache_frames = run.num_output_frames if run.cache.policy == "global" else None
    parts = [model, run.cache, run.sampler, run.latent_channels, run.latent_height,
             run.latent_width, cache_frames, dtype, batch, height, width, CONTRACT_VERSION]
    if vae is not None:
        parts += ["vae_decode", vae, STEP_LATENT_FRAMES]
    if quantization is not None:
        parts += ["quantization", quantization]
    return config_hash(*parts)


def step_contract(model: WanConfig, run: RunConfig, layout: CacheLayout, dtype: str, batch: int) -> GraphContract:
    """Inputs and outputs of one DiT call (the ``step`` graph), in positional order."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    hd, d, L = model.num_heads, model.head_dim, model.num_layers
    f, c = layout.block_frames, run.latent_channels
    lh, lw = run.latent_height, run.latent_width
    mem_dtype = "float32" if run.cache.memory_dtype == "float32" else dtype
    cache_shape = (batch, layout.cache_tokens, hd, d)
    mem_shape = (batch, 2, layout.memory_tokens, hd, d)
    text_shape = (batch, model.text_len, hd, d)
    block_shape = (batch, layout.block_tokens, hd, d)

    inputs = [TensorSpec("latents", (batch, f, c, lh, lw), dtype),
              TensorSpec("timestep", (batch, f), "float32"),
              TensorSpec("sigma", (1,), "float32")]
    inputs += [TensorSpec(past_key(i), cache_shape, dtype) for i in range(L)]
    inputs += [TensorSpec(past_value(i), cache_shape, dtype) for i in range(L)]
    inputs += [TensorSpec(cross_key(i), text_shape, dtype) for i in range(L)]
    inputs += [TensorSpec(cross_value(i), text_shape, dtype) for i in range(L)]
    inputs += [TensorSpec("key_positions", (layout.context_frames,), "int64"),
               TensorSpec("key_valid", (layout.context_frames,), "bool"),
               TensorSpec("query_positions", (f,), "int64"),
               TensorSpec("memory_ready", (1,), "bool"),
               TensorSpec("memory_init", (1,), "bool"),
               TensorSpec("memory_update", (1,), "bool")]
    outputs = [TensorSpec("flow", (batch, f, c, lh, lw), dtype),
               TensorSpec("x0", (batch, f, c, lh, lw), dtype)]
    outputs += [TensorSpec(present_key(i), block_shape, dtype) for i in range(L)]
    outputs += [TensorSpec(present_value(i), block_shape, dtype) for i in range(L)]
    if layout.has_memory:
        inputs += [TensorSpec(memory_key(i), mem_shape, mem_dtype) for i in range(L)]
        inputs += [TensorSpec(memory_value(i), mem_shape, mem_dtype) for i in range(L)]
        outputs += [TensorSpec(present_memory_key(i), mem_shape, mem_dtype) for i in range(L)]
        outputs += [TensorSpec(present_memory_value(i), mem_shape, mem_dtype) for i in range(L)]
    return GraphContract("step", tuple(inputs), tuple(outputs))


def text_contract(model: WanConfig, dtype: str, batch: int) -> GraphContract:
    """``prompt_embeds`` (padded to ``text_len``) -> per-layer cross-attention keys, then values."""
    L = model.num_layers
    shape = (batch, model.text_len, model.num_heads, model.head_dim)
    return GraphContract(
        "text",
        (TensorSpec("prompt_embeds", (batch, model.text_len, model.text_dim), dtype),),
        tuple([TensorSpec(cross_key(i), shape, dtype) for i in range(L)]
              + [TensorSpec(cross_value(i), shape, dtype) for i in range(L)]),
    )


def recache_contract(model: WanConfig, run: RunConfig, layout: CacheLayout, dtype: str, batch: int) -> GraphContract:
    """Inputs and outputs of a prompt switch's re-cache (the ``recache`` graph), in positional
    order: the tail's clean latents and the cache in, the tail's keys/values out (see
    :meth:`memrope.model.MemRoPEStep.recache`). The last layer's cache, memory and cross
    keys/values are not inputs: only its keys/values are computed, nothing attends there."""
    step = step_contract(model, run, layout, dtype, batch)
    hd, d, L = model.num_heads, model.head_dim, model.num_layers
    q = layout.tail_frames
    read = {f(i) for i in range(L - 1) for f in (past_key, past_value, cross_key, cross_value, memory_key, memory_value)}
    cache_inputs = [t for t in step.inputs if t.name in read and not t.name.startswith("memory.")]
    memory_inputs = [t for t in step.inputs if t.name in read and t.name.startswith("memory.")]
    inputs = [TensorSpec("latents", (batch, q, run.latent_channels, run.latent_height, run.latent_width), dtype),
              TensorSpec("timestep", (batch, q), "float32"),
              *cache_inputs,
              TensorSpec("slot_valid", (layout.cache_frames,), "bool")]
    if layout.has_memory:
        inputs += [TensorSpec("memory_ready", (1,), "bool"), *memory_inputs]
    shape = (batch, q * layout.frame_tokens, hd, d)
    outputs = [TensorSpec(recached_key(i), shape, dtype) for i in range(L)]
    outputs += [TensorSpec(recached_value(i), shape, dtype) for i in range(L)]
    return GraphContract("recache", tuple(inputs), tuple(outputs))


def vae_decode_contract(vae: VAEDecoderConfig, run: RunConfig, dtype: str, batch: int,
                        latent_frames: int = STEP_LATENT_FRAMES) -> GraphContract:
    """One streaming VAE decode step (``memrope.vae.WanStreamingDecoder``): ``latent_frames``
    latent frames (artifacts: ``STEP_LATENT_FRAMES``), the first-frame flag and every feature
    cache in; uint8 frames, float32 pixels (validation) and the updated caches out."""
    check_engine_geometry(vae)
    if vae.z_dim != run.latent_channels:
        raise ValueError(f"the VAE takes {vae.z_dim} latent channels, the run has latent_channels="
                         f"{run.latent_channels}")
    lh, lw, t = run.latent_height, run.latent_width, latent_frames
    frames, height, width = vae.temporal_stride * t, lh * vae.spatial_stride, lw * vae.spatial_stride
    slots = feature_cache_layout(vae)
    inputs = [TensorSpec("latents", (batch, t, vae.z_dim, lh, lw), dtype), TensorSpec("first_frame", (1,), "bool")]
    inputs += [TensorSpec(feat_cache(i), s.shape(batch, lh, lw), dtype) for i, s in enumerate(slots)]
    outputs = [TensorSpec("frames", (batch, frames, height, width, vae.pixel_channels), "uint8"),
               TensorSpec("pixels", (batch, vae.pixel_channels, frames, height, width), "float32")]
    outputs += [TensorSpec(present_feat_cache(i), s.shape(batch, lh, lw), dtype) for i, s in enumerate(slots)]
    return GraphContract("vae_decode", tuple(inputs), tuple(outputs))


def build_contract(model: WanConfig, run: RunConfig, layout: CacheLayout, dtype: str, batch: int,
                   height: int, width: int, vae: VAEDecoderConfig | None = None,
                   quantization: dict | None = None) -> ArtifactContract:
    """The contract of an export at ``height`` x ``width`` pixels (latent = pixels / 8), with a
    ``vae_decode`` graph when ``vae`` is given."""
    graphs = {"step": step_contract(model, run, layout, dtype, batch), "text": text_contract(model, dtype, batch),
              "recache": recache_contract(model, run, layout, dtype, batch)}
    if vae is not None:
        graphs["vae_decode"] = vae_decode_contract(vae, run, dtype, batch)
    return ArtifactContract(model, run, dtype, batch, height, width, layout.describe(), graphs, vae, quantization)


def read_contract_json(path: Path) -> dict[str, Any]:
    from memrope.io import read_json, shown

    raw = read_json(path, "artifact contract")
    if raw.get("contract_version") != CONTRACT_VERSION:
        raise ValueError(f"artifact contract {path} has version {shown(raw.get('contract_version'))}; this "
                         f"engine reads version {CONTRACT_VERSION}: re-export it with `memrope export`")
    return raw


def step_arguments(feeds: Mapping[str, torch.Tensor], num_layers: int, has_memory: bool) -> tuple:
    """Named step inputs -> the positional arguments of ``MemRoPEStep.forward``."""
    L = range(num_layers)
    controls = CacheControls(*(feeds[name] for name in CONTROL_NAMES))
    memory_keys = [feeds[memory_key(i)] for i in L] if has_memory else None
    memory_values = [feeds[memory_value(i)] for i in L] if has_memory else None
    return (feeds["latents"], feeds["timestep"], feeds["sigma"], [feeds[past_key(i)] for i in L],
            [feeds[past_value(i)] for i in L], [feeds[cross_key(i)] for i in L],
            [feeds[cross_value(i)] for i in L], controls, memory_keys, memory_values)


def recache_arguments(feeds: Mapping[str, torch.Tensor], num_layers: int, has_memory: bool) -> tuple:
    """Named recache inputs -> the positional arguments of ``MemRoPEStep.recache`` (per-layer
    lists of every layer but the last, see :func:`recache_contract`)."""
    L = range(num_layers - 1)
    memory_keys = [feeds[memory_key(i)] for i in L] if has_memory else None
    memory_values = [feeds[memory_value(i)] for i in L] if has_memory else None
    return (feeds["latents"], feeds["timestep"], [feeds[past_key(i)] for i in L], [feeds[past_value(i)] for i in L],
            [feeds[cross_key(i)] for i in L], [feeds[cross_value(i)] for i in L], feeds["slot_valid"],
            feeds["memory_ready"] if has_memory else None, memory_keys, memory_values)


def named_recache_outputs(keys: list[torch.Tensor], values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``MemRoPEStep.recache``'s per-layer keys and values -> the contract's output names."""
    named = {recached_key(i): k for i, k in enumerate(keys)}
    named.update({recached_value(i): v for i, v in enumerate(values)})
    return named


def named_step_outputs(out: StepOutputs) -> dict[str, torch.Tensor]:
    """``StepOutputs`` -> the contract's output names."""
    named = {"flow": out.flow, "x0": out.x0}
    for i, (k, v) in enumerate(zip(out.block_keys, out.block_values, strict=True)):
        named[present_key(i)], named[present_value(i)] = k, v
    for i, (k, v) in enumerate(zip(out.memory_keys, out.memory_values, strict=True)):
        named[present_memory_key(i)], named[present_memory_value(i)] = k, v
    return named


def step_outputs_from_named(named: Mapping[str, torch.Tensor], num_layers: int) -> StepOutputs:
    """The contract's named outputs -> ``StepOutputs`` (memory lists empty when absent)."""
    L = range(num_layers)
    has_memory = present_memory_key(0) in named
    return StepOutputs(named["flow"], named["x0"], [named[present_key(i)] for i in L],
                       [named[present_value(i)] for i in L],
                       [named[present_memory_key(i)] for i in L] if has_memory else [],
                       [named[present_memory_value(i)] for i in L] if has_memory else [])
