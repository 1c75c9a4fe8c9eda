"""Backends behind one runtime loop, streaming decode and benchmarks (see README)."""
