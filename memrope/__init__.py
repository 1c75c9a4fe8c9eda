"""MemRoPE: infinite-length autoregressive video generation with a fixed-size cache.

The package is the method (``memrope.config``, ``memrope.model``, ``memrope.cache``,
``memrope.pipeline``, ...) and, as subpackages, the layers built on it: ``memrope.export`` makes
the ONNX graphs, ``memrope.engine`` builds and executes them, ``memrope.runtime`` drives them for
users (text, VAE, video, serving, bench, the CLI).

The public Python API is :class:`VideoPipeline` (from :mod:`memrope.runtime.api`, imported on
first use so that ``import memrope`` stays light)::

    import memrope

    pipe = memrope.VideoPipeline.from_pretrained("tiny")
    pipe.generate("a red ball bouncing on a blue background", seconds=2, out="ball.mp4")
"""

from __future__ import annotations

__all__ = ["LoadRequest", "VideoPipeline", "VideoStream"]


def __getattr__(name: str):
    if name in ("VideoPipeline", "VideoStream"):
        from memrope.runtime import api

        return getattr(api, name)
    if name == "LoadRequest":
        from memrope.runtime.load import LoadRequest

        return LoadRequest
    raise AttributeError(f"module 'memrope' has no attribute {name!r}")
