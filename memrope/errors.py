"""Typed errors for stage failures (user-input errors are ValueError/TypeError)."""


class StageError(RuntimeError):
    """A pipeline stage (export, validation, engine build) failed; the message says which and why."""


class NonFiniteError(StageError):
    """A block's output holds NaN or Inf; the message names the block and the likely cause."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be (:func:`raise_terminated`), so every clean-up that
    an interrupt runs (temp files removed, partial outputs discarded) runs for it too."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: raise :class:`Terminated` in the main thread."""
    raise Terminated
