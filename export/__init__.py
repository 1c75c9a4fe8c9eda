"""ONNX export of the denoiser step with explicit cache I/O (filled by the export work; see README)."""
