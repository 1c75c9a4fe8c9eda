"""Typed errors for stage failures (user-input errors are ValueError/TypeError)."""


class StageError(RuntimeError):
    """A pipeline stage (export, validation, engine build) failed; the message says which and why."""


class NonFiniteError(StageError):
    """A block's output holds NaN or Inf; the message names the block and the likely cause."""
