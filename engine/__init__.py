"""``memrope.engine``: what executes an artifact, and the engines built from it.

Owns: the backends behind :class:`memrope.backend.Backend` (eager, compiled, ONNX Runtime,
TensorRT) and :class:`memrope.backend.VAEBackend` (eager, ONNX Runtime, TensorRT), the TensorRT
and TensorRT-RTX builds (``build``) and their sidecars (``sidecar``). Imports ``memrope`` and
``memrope.export`` only.
"""
