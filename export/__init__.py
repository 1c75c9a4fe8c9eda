"""``memrope.export``: the ONNX graphs of an artifact.

Owns: the exportable wrappers of one DiT call with explicit cache I/O (``graph``), the artifact
writer (``onnx_export``: step, text and recache graphs, contract, config, audit, validation),
the VAE's streaming decode step (``vae_export``), the shared exporter settings (``torch_onnx``),
the TensorRT parser audit (``audit``) and ONNX Runtime vs eager validation (``validate``).
Imports only ``memrope``'s method modules.
"""
