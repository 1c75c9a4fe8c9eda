"""TensorRT engine build from an exported artifact (filled by the backends work; see README)."""
