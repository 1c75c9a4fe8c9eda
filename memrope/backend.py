"""The backend interfaces: one DiT call with explicit cache I/O, and one streaming VAE decode
step with explicit feature-cache I/O, by name.

Owns: :class:`Backend`, the only thing the block loop (``memrope.pipeline``) drives (a step
call, a text call, and a prompt switch's re-cache call); :class:`VAEBackend`, the only thing
the runtime's frame path drives;
:class:`StepModuleBackend`, the interface over this package's own :class:`MemRoPEStep` in this
process (what the eager backend and the export's validation run); and :func:`cross_named`, the
contract names of per-layer cross-attention keys/values. The runtimes (eager PyTorch,
``torch.compile``, ONNX Runtime, TensorRT) live in ``engine/``, one module each.
"""

from __future__ import annotations

import weakref

import torch

from memrope.cache import CacheLayout
from memrope.config import WanConfig
from memrope.contract import (
    GraphContract,
    cross_key,
    cross_value,
    named_recache_outputs,
    named_step_outputs,
    recache_arguments,
    step_arguments,
)
from memrope.model import MemRoPEStep
from memrope.vae import VAEDecoderConfig


class Backend:
    """One DiT call with explicit cache I/O, by name: the only thing the loop drives.

    A backend maps the contract's named inputs (:func:`memrope.contract.step_contract`) to its
    named outputs. The loop owns the input buffers and keeps their addresses fixed for the whole
    run (cache views, controls, a latent buffer), so a backend may bind them once (ONNX Runtime
    IO binding, TensorRT tensor addresses, CUDA graphs). Returned outputs stay valid until the
    next call. Backends are context managers; ``close`` releases sessions, engines and buffers.

    Attributes: ``name``; ``model`` (WanConfig); ``layout`` (CacheLayout); ``dtype`` and
    ``device`` of the tensors it takes and returns; ``can_recache``: :meth:`recache` works.
    """

    name = "backend"
    can_recache = False
    model: WanConfig
    layout: CacheLayout
    dtype: torch.dtype
    device: torch.device

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release what the backend holds (sessions, engines, device buffers)."""

    def encode_text(self, prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """``prompt_embeds [B, text_len, text_dim]`` (zero-padded) -> ``cross_key_values.*``."""
        raise NotImplementedError

    def encode_text_into(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """The text call writing into the caller's buffers: ``feeds["prompt_embeds"]`` ->
        ``outputs[cross_key_values.*]``.

        A stream passes the same :class:`Feeds` pair every time (its padded prompt buffer and its
        cross-attention buffers), so an exported backend may bind them once and a prompt switch
        costs one text call and no copy. By default: :meth:`encode_text`, then a copy.
        """
        for name, tensor in self.encode_text(feeds["prompt_embeds"]).items():
            outputs[name].copy_(tensor)

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One call: every input of the step contract by name -> every output by name.

        ``feeds`` is a stream's :class:`Feeds`: the same object, holding the same tensors, on
        every call of that stream, so a backend may bind it once (:class:`StreamBindings`).
        """
        raise NotImplementedError

    def recache(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """A prompt switch's re-cache: every input of the recache contract by name
        (:func:`memrope.contract.recache_contract`) -> each output written into ``outputs[name]``.

        ``outputs`` (a :class:`Feeds`) are the loop's own destination tensors (views of its
        cache's tail), so an exported backend can bind them as the graph's outputs and the switch
        allocates nothing that outlives it. Like ``feeds``, a stream passes the same pair of
        objects every time; the graph reads no byte of the cache it writes.
        """
        raise NotImplementedError(f"backend {self.name} cannot re-cache the window at a prompt switch")


class Feeds(dict):
    """One stream's named input buffers (contract name -> tensor), fixed for the stream's life.

    The loop hands the same object to every call of a stream and only writes into its tensors;
    a backend may therefore bind the addresses once per ``Feeds`` (another object is another
    stream). Weak-referenceable, so per-stream bindings die with their stream.
    """

    __slots__ = ("__weakref__",)


class StreamBindings:
    """Per-stream bindings a backend makes once and reuses: ``get(feeds)`` returns the binding
    ``make(feeds, index)`` built for this :class:`Feeds` object (``index`` numbers the streams
    0, 1, ...), building it on first sight. A binding is dropped when its stream's feeds are
    garbage-collected, so a server's finished sessions release theirs.
    """

    def __init__(self, make):
        self._make = make
        self._by_id: dict[int, tuple[weakref.ref, object]] = {}
        self._last: tuple[weakref.ref, object] | None = None  # never a strong reference to a stream
        self._count = 0

    def get(self, feeds: dict[str, torch.Tensor]):
        last = self._last
        if last is not None and last[0]() is feeds:
            return last[1]
        entry = self._by_id.get(id(feeds))
        if entry is None or entry[0]() is not feeds:
            if not isinstance(feeds, Feeds):
                raise TypeError("a backend binds a stream's Feeds once; got a plain dict (wrap it in "
                                "memrope.backend.Feeds and keep passing the same object)")
            key = id(feeds)
            entry = (weakref.ref(feeds, lambda _ref, key=key: self._forget(key)), self._make(feeds, self._count))
            self._count += 1
            self._by_id[key] = entry
        self._last = (entry[0], entry[1])
        return entry[1]

    def _forget(self, key: int) -> None:
        """A stream's feeds died: drop its binding (which may hold its tensors) everywhere."""
        entry = self._by_id.pop(key, None)
        if entry is not None and self._last is not None and self._last[0] is entry[0]:
            self._last = None

    def __len__(self) -> int:
        return len(self._by_id)


class VAEBackend:
    """One streaming VAE decode step (the ``vae_decode`` contract), by name.

    ``run(feeds, outputs)`` reads every contract input from ``feeds`` (``latents``,
    ``first_frame``, ``feat_cache.*``) and writes every output into the caller's tensors in
    ``outputs`` (``frames``, ``pixels``, ``present_feat_cache.*``). Both dicts hold fixed-address
    buffers owned by the caller, who alternates two (feeds, outputs) pairs with the cache
    buffers swapped, so no cache is ever copied. A backend may bind each pair once, keyed by
    the identity of the two dicts; a dict whose tensors moved must be a new dict. Work is
    enqueued on the current CUDA stream (GPU) and may still be running when ``run`` returns.

    Attributes: ``name``; ``contract`` (GraphContract); ``config`` (VAEDecoderConfig);
    ``device``; ``dtype`` of the latents and caches.
    """

    name = "vae-backend"
    contract: GraphContract
    config: VAEDecoderConfig
    device: torch.device
    dtype: torch.dtype

    def __enter__(self) -> VAEBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release what the backend holds (sessions, engines)."""

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def forget(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Drop whatever was bound for this (feeds, outputs) pair: its owner is done with it (a
        served session ended), so the backend must not keep its buffers alive."""


def cross_named(keys: list[torch.Tensor], values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer cross-attention keys and values -> the contract's ``cross_key_values.*`` names."""
    named = {cross_key(i): k for i, k in enumerate(keys)}
    named.update({cross_value(i): v for i, v in enumerate(values)})
    return named


class StepModuleBackend(Backend):
    """The interface over a :class:`MemRoPEStep` module run in this process (no export).

    Args:
        step: the step module, bound to a DiT, a cache layout and a latent grid.
    """

    name = "step-module"
    can_recache = True

    def __init__(self, step: MemRoPEStep):
        self.module = step
        self.dit = step.dit
        self.model = step.config
        self.layout = step.layout
        self.device = self.dit.head.head.weight.device
        self.dtype = self.dit.dtype
        self._arguments = StreamBindings(
            lambda feeds, _: step_arguments(feeds, self.model.num_layers, self.layout.has_memory))
        self._recache_arguments = StreamBindings(
            lambda feeds, _: recache_arguments(feeds, self.model.num_layers, self.layout.has_memory))

    def encode_text(self, prompt_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        keys, values = self.dit.encode_text(prompt_embeds.to(self.device))
        return cross_named(keys, values)

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return named_step_outputs(self.module(*self._arguments.get(feeds)))

    def recache(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        # The module returns new tensors (transient, freed on return); the loop's cache gets a copy.
        keys, values = self.module.recache(*self._recache_arguments.get(feeds))
        for name, tensor in named_recache_outputs(keys, values).items():
            outputs[name].copy_(tensor)
