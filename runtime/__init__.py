"""``memrope.runtime``: the engine driven for users.

Owns: the one loader (``load``) and the Python API on it (``api``: ``memrope.VideoPipeline``),
text encoding (``text``), the VAE and its streamed decode (``vae``), video files (``video``),
prompt timelines (``prompts``), the streaming text-to-video driver and the demo model (``t2v``),
the demo world and its evaluator (``demo``), serving (``serve``), benchmarks (``bench``) and the
``memrope`` command line (``cli``, ``args``). The top layer: nothing below imports it.
"""
