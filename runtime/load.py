"""One loader: what to run (a preset, a checkpoint, a Wan2.1 folder or an exported artifact, on a
backend, a device and a dtype) resolved into the parts that run it.

Owns: :class:`LoadRequest` (a frozen, validated description of the model source, the backends,
the device, the dtype and the run), :func:`resolve` (files only, no weights: the model and run
configs, the artifact and its checks, the model folder, the embedded demo), and
:class:`Resolved`, whose methods load the parts in the order a run wants them: the DiT backend,
the text encoder (or cached prompt embeddings), the VAE stream, the noise source. The CLI
(``memrope generate/export/serve``), the server, the benchmarks and the Python API
(:mod:`memrope.runtime.api`) all load through here.

Does not own argument parsing (``memrope.runtime.args``), the block loop (``memrope.pipeline``),
or the models themselves (``memrope.model``, ``memrope.runtime.text``, ``memrope.runtime.vae``).

Errors name the CLI flag a value comes from (``--checkpoint``, ``--engine``): the Python API takes
the same names as keyword arguments.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from memrope.config import RunConfig, WanConfig

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("eager", "compiled", "onnxruntime", "tensorrt")
EXPORTED_BACKENDS = ("onnxruntime", "tensorrt")
VAE_BACKENDS = ("eager", "onnxruntime", "tensorrt")
PRESETS = ("tiny", "mid", "wan-1.3b")
NOISE_SOURCES = ("reference", "streamed", "device")
# Reference-order noise draws the whole video's initial noise up front; past this many
# elements per run the loop draws block by block instead (constant memory).
REFERENCE_NOISE_MAX_ELEMENTS = 1 << 28
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def torch_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``, checked against this machine before any work."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def vae_provider(ort_provider: str) -> str:
    """The VAE session's provider for ``--ort-provider``: the same, but TensorRT's EP (DiT only)
    means CUDA where it exists."""
    return ort_provider if ort_provider in ("cpu", "cuda") else "auto"


def demo_run_config(preset: str, video: bool = False) -> RunConfig:
    """A preset's run when no ``--config`` is given: the embedded demo's video (``video``), the
    golden traces' latent run for ``tiny``, or 30 frames at the preset's own size."""
    if preset == "tiny":
        if video:
            from memrope.runtime.t2v import DEMO_LATENT

            # The embedded demo: a 64x96-pixel video, 4 s unless --seconds says otherwise.
            return RunConfig(num_output_frames=18, latent_height=DEMO_LATENT[0], latent_width=DEMO_LATENT[1],
                             use_ema=True)
        # The golden traces' run: 30 frames of a 4x6 latent with the shipped MemRoPE cache.
        return RunConfig(num_output_frames=30, latent_height=4, latent_width=6, use_ema=True)
    return RunConfig(num_output_frames=30, use_ema=True)


@dataclass(frozen=True)
class LoadRequest:
    """What to load and run. Every field has the meaning of the CLI flag of the same name.

    Model source (one of): ``engine`` (an artifact directory from ``memrope export``, for the
    exported backends), ``checkpoint`` (a Self-Forcing/LongLive ``.pt``, a ``.safetensors`` or a
    Wan2.1 folder; ``lora`` merged at load), ``model_dir`` (a Wan2.1 folder: its DiT, text encoder
    and VAE), or ``preset`` alone (random weights; ``tiny`` is the embedded demo model when text or
    frames are wanted). ``model_config`` names Wan's ``config.json`` where the source does not.

    Run: ``config`` (the authors' YAML) or ``run`` (a :class:`RunConfig`), else the preset's demo
    run or the artifact's; then ``memory_dtype``, ``seed``, ``height``/``width`` (pixels,
    multiples of 16) and the length (``num_frames`` latent frames, or ``seconds`` of 16 fps video,
    or the frames in the ``noise`` file).

    Execution: ``backend`` for the DiT, ``vae_backend`` for the decode (``decode=False``: latents
    only), ``device`` (``cpu``/``cuda[:N]``), ``dtype`` (``float32``/``bfloat16``/``float16``;
    exported backends run their artifact's), ``ort_provider``, ``verify_artifact``.
    ``text``: prompts will be encoded (the text encoder is needed). ``recache``: prompt changes
    will re-encode the window (exported backends open their recache graph too).
    """

    preset: str | None = None
    checkpoint: Path | None = None
    model_config: Path | None = None
    model_dir: Path | None = None
    lora: Path | None = None
    use_ema: bool | None = None
    engine: Path | None = None
    verify_artifact: bool = False
    config: Path | None = None
    run: RunConfig | None = None
    memory_dtype: str | None = None
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    seconds: float | None = None
    noise: Path | None = None
    backend: str = "eager"
    vae_backend: str = "eager"
    decode: bool = True
    text: bool = True
    recache: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    ort_provider: str = "auto"

    def __post_init__(self) -> None:
        for name in ("checkpoint", "model_config", "model_dir", "lora", "engine", "config", "noise"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        for name, value, allowed in (("preset", self.preset, PRESETS), ("backend", self.backend, BACKENDS),
                                     ("vae_backend", self.vae_backend, VAE_BACKENDS),
                                     ("dtype", self.dtype, tuple(DTYPES)),
                                     ("ort_provider", self.ort_provider, ("auto", "cpu", "cuda", "tensorrt")),
                                     ("memory_dtype", self.memory_dtype, ("cache", "float32"))):
            if value is not None and value not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")
        if self.seconds is not None and self.num_frames is not None:
            raise ValueError("pass either --seconds or --num-frames, not both")
        if (self.height is None) != (self.width is None):
            raise ValueError("pass --height and --width together (pixels, multiples of 16)")
        if self.config is not None and self.run is not None:
            raise ValueError("pass either a run config file (config) or a RunConfig (run), not both")

    @property
    def exported(self) -> bool:
        """Whether the DiT runs an exported graph (``--engine``)."""
        return self.backend in EXPORTED_BACKENDS

    @property
    def vae_exported(self) -> bool:
        return self.decode and self.vae_backend in EXPORTED_BACKENDS

    def check_inputs_exist(self) -> None:
        """Every input file named exists: a typo fails first, in milliseconds."""
        for name in ("checkpoint", "model_config", "config", "lora", "noise", "engine"):
            path = getattr(self, name)
            if path is not None and not path.exists():
                raise FileNotFoundError(f"--{name.replace('_', '-')} not found: {path}")


@dataclass(frozen=True)
class Resolved:
    """A :class:`LoadRequest` resolved from files alone (no weights loaded yet).

    artifact: the checked artifact (exported backends, or an exported VAE), else ``None``.
    model: the DiT's architecture. run: the run (resolution, cache policy, sampler, length).
    model_dir: the Wan2.1 folder with the text encoder and the VAE (``--model-dir``, or the
      embedded demo model), else ``None``.
    """

    request: LoadRequest
    artifact: object | None
    model: WanConfig
    run: RunConfig
    model_dir: Path | None
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        """The DiT's dtype: the request's, or an exported backend's artifact's."""
        return DTYPES[self.artifact.contract.dtype if self.request.exported else self.request.dtype]

    @property
    def dit_checkpoint(self) -> Path | None:
        """Where the DiT weights come from: ``--checkpoint``, else the model folder's
        ``diffusion_pytorch_model.safetensors``; ``None`` for a preset's random weights."""
        from memrope.checkpoint import WAN_WEIGHTS_FILE

        r = self.request
        if r.checkpoint is None and self.model_dir is not None and (self.model_dir / WAN_WEIGHTS_FILE).is_file():
            return self.model_dir
        return r.checkpoint

    @property
    def use_ema(self) -> bool:
        return self.run.use_ema if self.request.use_ema is None else self.request.use_ema

    def check_checkpoint(self) -> None:
        """The DiT checkpoint's (and LoRA's) names and shapes against the model, from headers
        only: a wrong file fails in milliseconds, before a text encoder or VAE loads. Exported
        backends run their artifact's weights: nothing to check."""
        from memrope.checkpoint import check_dit_checkpoint

        if self.request.exported:
            return
        checkpoint = self.dit_checkpoint
        if checkpoint is not None:
            check_dit_checkpoint(checkpoint, self.model, use_ema=self.use_ema, lora_path=self.request.lora,
                                 lora=self.run.lora)

    # -- loading ---------------------------------------------------------------------------------

    def load_dit(self, *, device: torch.device | None = None, dtype: torch.dtype | None = None):
        """The DiT module from the checkpoint (with the LoRA), the model folder's weights, or
        random weights for a preset (seed ``run.seed + 1234``: the demo model's own for the demo
        run)."""
        from memrope.checkpoint import load_dit_state_dict
        from memrope.model import build_dit, random_state_dict

        r = self.request
        checkpoint = self.dit_checkpoint
        if checkpoint is not None and self.run.lora_ckpt and r.lora is None:
            logger.warning("the run config names a LoRA (lora_ckpt: %s) but --lora was not given: running the "
                           "base weights only", self.run.lora_ckpt)
        if checkpoint is not None:
            state = load_dit_state_dict(checkpoint, self.model, use_ema=self.use_ema, lora_path=r.lora,
                                        lora=self.run.lora, dtype=torch.float32)
        else:
            if r.preset is None:
                raise ValueError("pass --checkpoint, or --preset for random weights")
            if r.preset != "tiny":
                logger.warning("no --checkpoint: RANDOM weights (preset %s); the output shows the machinery, "
                               "not a picture", r.preset)
            state = random_state_dict(self.model, seed=self.run.seed + 1234)
        dit = build_dit(self.model, state, dtype=dtype or self.dtype, device=device or self.device)
        del state
        return dit

    def load_backend(self, *, decode: bool | None = None, ort_threads: int | None = None):
        """The DiT backend (a :class:`memrope.backend.Backend`). An exported backend opens its
        recache graph only when prompt changes re-cache (a second copy of the weights). With a
        VAE decoding in this process (``decode``, default the request's), ONNX Runtime's CPU
        threads do not spin between calls: they would steal the cores from the decode
        (docs/frame_path_schedule_cpu.md)."""
        r = self.request
        decode = r.decode if decode is None else decode
        if r.backend == "onnxruntime":
            from memrope.engine.onnxruntime_backend import OnnxRuntimeBackend

            return OnnxRuntimeBackend(self.artifact, provider=r.ort_provider, recache=r.recache,
                                      spinning=False if decode else None, threads=ort_threads)
        if r.backend == "tensorrt":
            from memrope.engine.tensorrt_backend import TensorRTBackend

            return TensorRTBackend(self.artifact, recache=r.recache)
        dit = self.load_dit()
        if r.backend == "compiled":
            from memrope.engine.compiled_backend import CompiledBackend

            return CompiledBackend(dit, self.run)
        from memrope.engine.eager_backend import EagerBackend

        return EagerBackend(dit, self.run)

    def load_vae_backend(self):
        """The decode as a :class:`memrope.backend.VAEBackend`: the VAE module of the model folder
        (eager) or the artifact's ``vae_decode`` graph."""
        from memrope.runtime.vae import make_vae_backend

        self._check_vae()
        return make_vae_backend(self.request.vae_backend, self.run, artifact=self.artifact, model_dir=self.model_dir,
                                device=self.device, provider=vae_provider(self.request.ort_provider))

    def load_vae_stream(self, *, overlap: bool | None = None):
        """A :class:`memrope.runtime.vae.VAEStream` over :meth:`load_vae_backend`. ``overlap``
        (default: on a GPU, or on a CPU when both stages run on ONNX Runtime) decodes block b in
        a worker while the DiT computes block b+1."""
        from memrope.runtime.vae import VAEStream, overlap_by_default

        r = self.request
        if overlap is None:
            overlap = overlap_by_default(self.device, r.backend, r.vae_backend)
        return VAEStream(self.load_vae_backend(), self.run.cache.block_frames, overlap=overlap)

    def _check_vae(self) -> None:
        if self.request.vae_backend == "eager" and self.model_dir is None:
            raise ValueError("decoding needs the VAE: pass --model-dir WAN_DIR (or --no-decode, or "
                             "--vae-backend onnxruntime with an artifact exported with a VAE)")

    def load_text_encoder(self):
        """The umT5 of the model folder, kept open (a :class:`memrope.runtime.text.PromptEncoder`)."""
        from memrope.runtime.text import PromptEncoder

        if self.model_dir is None:
            raise ValueError("prompts need a text encoder: pass --model-dir WAN_DIR (or --text-embeds)")
        return PromptEncoder.from_model_dir(self.model_dir, text_len=self.model.text_len,
                                            text_dim=self.model.text_dim, batch=self.run.batch_size)

    def encode_prompts(self, prompts: list[str], flag: str = "--prompt",
                       cache_dir: Path | None = None) -> list[torch.Tensor]:
        """Each prompt -> ``[B, text_len, text_dim]`` with the umT5 of the model folder, cached on
        disk by prompt (``cache_dir``, default ``$MEMROPE_CACHE/text``); the encoder is loaded
        only on a cache miss and freed at once. A prompt longer than ``text_len`` tokens is
        truncated, with a warning before the run."""
        from memrope.runtime.text import TextEncoder, encode_cached, load_tokenizer, prompt_tokens, validate_prompts

        if self.model_dir is None:
            raise ValueError(f"{flag} needs a text encoder: pass --model-dir WAN_DIR (or --text-embeds)")
        model_dir, text_len = self.model_dir, self.model.text_len
        tokenizer = load_tokenizer(model_dir)
        for text in dict.fromkeys(validate_prompts(prompts)):
            tokens = prompt_tokens(tokenizer, text)
            if tokens > text_len:
                logger.warning("%s %r is %d tokens long (end-of-text included); the model reads the first "
                               "text_len=%d and drops the rest", flag, text if len(text) <= 60 else text[:57] + "...",
                               tokens, text_len)
        from memrope.runtime.t2v import cache_root

        cache_dir = cache_dir or cache_root() / "text"
        embeds = encode_cached(lambda: TextEncoder.from_model_dir(model_dir, text_len=text_len),
                               [p for p in prompts for _ in range(self.run.batch_size)], cache_dir,
                               key=f"{model_dir.resolve()}|{text_len}")
        if embeds.shape[-1] != self.model.text_dim:
            raise ValueError(f"the text encoder in {model_dir} gives {embeds.shape[-1]}-wide embeddings; the DiT "
                             f"takes text_dim={self.model.text_dim}")
        return list(embeds.split(self.run.batch_size))

    def text_embeddings(self, prompt: str | None = None, text_embeds: Path | None = None,
                        cache_dir: Path | None = None) -> torch.Tensor:
        """``[B, text_len, text_dim]`` for a run with one prompt: ``text_embeds`` (a safetensors
        file with ``prompt_embeds``), else ``prompt`` encoded (:meth:`encode_prompts`), else, for a
        preset's random weights with no text encoder, seeded random embeddings (a demo)."""
        from memrope.io import read_text_embeds

        if text_embeds is not None:
            if prompt is not None:
                raise ValueError("pass either --prompt or --text-embeds, not both")
            embeds = read_text_embeds(text_embeds, self.model.text_dim, self.model.text_len)
        elif prompt is not None:
            embeds = self.encode_prompts([prompt], "--prompt", cache_dir)[0]
        elif self.request.checkpoint is None and self.request.engine is None and self.model_dir is None:
            logger.warning("no --prompt or --text-embeds: using random text embeddings (demo)")
            g = torch.Generator("cpu").manual_seed(self.run.seed + 4321)
            embeds = torch.randn(self.run.batch_size, self.model.text_len, self.model.text_dim, generator=g)
        else:
            raise ValueError("pass --prompt TEXT (with --model-dir) or --text-embeds FILE.safetensors")
        if embeds.shape[0] != self.run.batch_size:
            raise ValueError(f"text embeddings have batch {embeds.shape[0]}, the run config's "
                             f"num_samples is {self.run.batch_size}")
        return embeds

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(width, height)`` of the video in pixels."""
        from memrope.config import VAE_SPATIAL_STRIDE

        return VAE_SPATIAL_STRIDE * self.run.latent_width, VAE_SPATIAL_STRIDE * self.run.latent_height

    def noise(self, source: str = "reference", dtype: torch.dtype | None = None,
              device: torch.device | None = None, run: RunConfig | None = None):
        """The run's noise (a :class:`memrope.sampler.NoiseSource`): the ``noise`` file, else the
        seed through ``source`` (``reference``: the authors' CPU generator and draw order;
        ``streamed``: block by block at constant memory, automatic for very long videos;
        ``device``: a generator on the device). ``run``: another length or seed of this run."""
        from memrope.io import read_noise
        from memrope.sampler import DeviceNoise, SeededNoise, StreamingSeededNoise, TensorNoise, build_schedule

        run, dtype, device = run or self.run, dtype or self.dtype, device or self.device
        if source not in NOISE_SOURCES:
            raise ValueError(f"--noise-source must be one of {', '.join(NOISE_SOURCES)}, got {source!r}")
        latent_shape = (run.latent_channels, run.latent_height, run.latent_width)
        if self.request.noise is not None:
            if source != "reference":
                raise ValueError("--noise gives the noise itself; drop --noise-source/--stream-noise")
            tensors = read_noise(self.request.noise, run.batch_size, latent_shape, run.cache.block_frames,
                                 build_schedule(run.sampler).num_steps)
            return TensorNoise(*tensors, run.cache.block_frames)
        if source == "device":
            return DeviceNoise(run.seed, device)
        elements = run.batch_size * run.num_output_frames * run.latent_channels * run.latent_height * run.latent_width
        if source == "streamed" or elements > REFERENCE_NOISE_MAX_ELEMENTS:
            if source != "streamed":
                logger.warning("video too long for the reference's up-front noise draw; drawing block by block")
            return StreamingSeededNoise(run.seed, run.batch_size, latent_shape, run.cache.block_frames, dtype)
        return SeededNoise(run.seed, run.batch_size, run.num_output_frames, latent_shape, run.cache.block_frames,
                           dtype)

    def describe(self) -> dict:
        """What runs, for ``/healthz``, the page and logs."""
        r = self.request
        return {"backend": r.backend, "device": str(self.device),
                "dtype": str(self.artifact.contract.dtype if r.exported else r.dtype).removeprefix("torch."),
                "model_dir": None if self.model_dir is None else str(self.model_dir),
                "dim": self.model.dim, "num_layers": self.model.num_layers, "text_len": self.model.text_len,
                "cache_policy": self.run.cache.policy, "vae_backend": r.vae_backend if r.decode else None}


# ------------------------------------------------------------------------------------------------
# Resolution: files only
# ------------------------------------------------------------------------------------------------

def _model_dir(r: LoadRequest) -> Path | None:
    """The Wan2.1 folder holding the text encoder and VAE: ``--model-dir``, or the embedded demo
    model for ``--preset tiny`` without a checkpoint when it needs text or frames."""
    if r.model_dir is not None:
        if not r.model_dir.is_dir():
            raise FileNotFoundError(f"--model-dir not found: {r.model_dir}")
        return r.model_dir
    if r.preset == "tiny" and r.checkpoint is None and (r.decode or r.text):
        from memrope.runtime.t2v import ensure_demo_model

        return ensure_demo_model()
    return None


def _model_config(r: LoadRequest, model_dir: Path | None) -> WanConfig:
    from memrope.config import model_preset

    if r.model_config is not None:
        return WanConfig.from_json(r.model_config)
    if model_dir is not None and (model_dir / "config.json").is_file():
        return WanConfig.from_json(model_dir / "config.json")
    if r.checkpoint is not None and r.checkpoint.is_dir() and (r.checkpoint / "config.json").is_file():
        return WanConfig.from_json(r.checkpoint / "config.json")
    if r.preset is not None:
        return model_preset(r.preset)
    raise ValueError("no model architecture: pass --model-config config.json, a Wan2.1 folder as "
                     "--checkpoint, or --preset")


def _run_config(r: LoadRequest, fallback: RunConfig | None, video_demo: bool) -> RunConfig:
    """``--config`` YAML (or ``run``), else ``fallback`` (an artifact's run), else the preset's
    demo run; then ``--memory-dtype`` and ``--seed``."""
    from memrope.config import load_run_config

    if r.config is not None:
        run = load_run_config(r.config)
    elif r.run is not None:
        run = r.run
    elif fallback is not None:
        run = fallback
    elif r.preset is not None:
        run = demo_run_config(r.preset, video=video_demo)
    else:
        raise ValueError("no run configuration: pass --config run.yaml")
    if r.memory_dtype is not None:
        run = replace(run, cache=replace(run.cache, memory_dtype=r.memory_dtype))
    if r.seed is not None:
        run = replace(run, seed=r.seed)
    return run


def _check_engine_files(artifact, backend: str, graphs: list[str], flag: str) -> None:
    """A TensorRT run needs a built plan for each of ``graphs``: say so before any model loads."""
    if backend != "tensorrt":
        return
    from memrope.engine.sidecar import plan_path, sidecar_path

    if not torch.cuda.is_available():
        raise ValueError(f"{flag} tensorrt runs TensorRT plans on an NVIDIA GPU and this machine has none "
                         f"(torch.cuda.is_available() is False); run the artifact with {flag} onnxruntime")
    for graph in graphs:
        plan = plan_path(artifact.path, graph)
        for file in (plan, sidecar_path(plan)):
            if not file.is_file():
                raise FileNotFoundError(f"artifact {artifact.path} has no TensorRT engine ({file.name} missing); "
                                        f"build it with `memrope build {artifact.path} --target rtx` (RTX GPUs) "
                                        "or `--target server`")


def _open_artifact(r: LoadRequest):
    """The ``--engine`` artifact, checked for what the request will run on it (providers this
    machine lacks, graphs, TensorRT plans), before the text encoder and the VAE load."""
    from memrope.artifact import load_artifact

    if r.engine is None:
        flag = f"--backend {r.backend}" if r.exported else f"--vae-backend {r.vae_backend}"
        raise ValueError(f"{flag} needs --engine DIR (an artifact from `memrope export`)")
    if r.exported:
        given = [flag for flag, value in (("--checkpoint", r.checkpoint), ("--lora", r.lora)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} cannot change --backend {r.backend}'s weights: an "
                             "exported backend runs the weights in its --engine artifact (export them with "
                             "`memrope export --checkpoint ...`), or run them with --backend eager")
    artifact = load_artifact(r.engine, verify=r.verify_artifact)
    wanted = ([r.ort_provider] if r.backend == "onnxruntime" else []) + \
             ([vae_provider(r.ort_provider)] if r.vae_exported and r.vae_backend == "onnxruntime" else [])
    if wanted:
        from memrope.engine.onnxruntime_backend import resolve_provider

        for each in wanted:
            resolve_provider(each, artifact.contract.dtype, artifact.path)
    if r.exported:
        _check_engine_files(artifact, r.backend, ["step", "text", *(["recache"] if r.recache else [])], "--backend")
    if r.vae_exported:
        if "vae_decode" not in artifact.contract.graphs:
            raise ValueError(f"artifact {artifact.path} has no vae_decode graph: export it with --model-dir "
                             "WAN_DIR (the VAE is exported from there), or decode with --vae-backend eager")
        _check_engine_files(artifact, r.vae_backend, ["vae_decode"], "--vae-backend")
    return artifact


def resolve(request: LoadRequest, *, check_checkpoint: bool = True) -> Resolved:
    """Resolve ``request`` from files alone, checking everything that can be checked before a
    weight loads: the inputs exist; the artifact's contract, file hashes, graphs and plans; the
    model and run configs (resolution, length, noise file); the DiT checkpoint's headers.

    An exported backend takes both configs from its artifact, whose resolution applies to the
    run at once; the other backends take them from the checkpoint, the preset or ``--config``.
    Raises ``ValueError``/``FileNotFoundError`` (bad input) naming what is wrong.
    ``check_checkpoint=False`` leaves the checkpoint's headers to the caller
    (:meth:`Resolved.check_checkpoint`), who checks something else of the run first."""
    from memrope.artifact import specialise_run

    r = request
    r.check_inputs_exist()
    device = torch_device(r.device)
    if r.engine is not None and not (r.exported or r.vae_exported):
        raise ValueError(f"--engine is for exported backends; --backend {r.backend} runs the checkpoint")
    artifact = _open_artifact(r) if (r.exported or r.vae_exported) else None
    model_dir = _model_dir(r)
    model = artifact.model if r.exported else _model_config(r, model_dir)
    run = _run_config(r, artifact.run if artifact is not None else None,
                      video_demo=model_dir is not None and r.model_dir is None)
    if r.height is not None:
        if artifact is not None:
            raise ValueError("--height/--width: an exported artifact runs at the resolution it was exported at "
                             f"({8 * artifact.run.latent_height}x{8 * artifact.run.latent_width} pixels); export "
                             "another with `memrope export --height H --width W`")
        run = specialise_run(run, model, r.height, r.width, run.batch_size)
    if artifact is not None:
        run = artifact.check_run(run)
    if run.latent_channels != model.in_dim:
        raise ValueError(f"run config latent_channels={run.latent_channels} does not match the "
                         f"model's in_dim={model.in_dim}")
    run = _run_length(r, run)
    if artifact is not None:
        run = artifact.check_run(run)  # the global policy's cache is sized by the frame count
    resolved = Resolved(r, artifact, model, run, model_dir, device)
    if check_checkpoint:
        resolved.check_checkpoint()
    return resolved


def _run_length(r: LoadRequest, run: RunConfig) -> RunConfig:
    """The run's latent frame count: the noise file's, then ``num_frames`` or ``seconds``."""
    from memrope.io import read_noise
    from memrope.runtime.t2v import latent_frames_for
    from memrope.sampler import build_schedule

    if r.noise is not None:
        latent_shape = (run.latent_channels, run.latent_height, run.latent_width)
        noise_frames = read_noise(r.noise, run.batch_size, latent_shape, run.cache.block_frames,
                                  build_schedule(run.sampler).num_steps)[0].shape[1]
        run = run.with_frames(noise_frames)
    frames = r.num_frames
    if r.seconds is not None:
        frames = latent_frames_for(r.seconds, run.cache.block_frames)
    if frames is not None:
        if r.noise is not None and frames > run.num_output_frames:
            raise ValueError(f"{frames} latent frames exceed the {run.num_output_frames} frames in the noise file")
        run = run.with_frames(frames)
    return run
