"""Stop a training run cleanly on SIGTERM / Ctrl-C: the step in flight finishes, the resume state is
written, and the run ends; ``--resume`` then continues exactly there instead of at the last periodic
checkpoint. A second signal stops at once (the usual KeyboardInterrupt).

Work that can be thrown away and redone (validation: minutes of sampling, after the resume state
was written) runs inside ``interrupting()``: there a signal stops at once with ``StopNow``, so a
deadline's grace period is never spent waiting for it."""
from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Iterator


class StopNow(BaseException):
    """A stop signal arrived inside ``StopOnSignal.interrupting()`` (a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` in the interrupted work swallows it)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Context manager; ``requested`` is the name of the signal received, or None."""

    def __init__(self, enabled: bool = True) -> None:
        # Handlers can only be set from the main thread; a run started elsewhere keeps the defaults.
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        self._interrupting = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self._interrupting:
            raise StopNow(self.requested)
        print(f"\n{self.requested} received: finishing the current step and saving the resume state "
              "(send it again to stop at once)", flush=True)

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        """Inside, a stop signal (one already received included) raises ``StopNow`` at once."""
        if self.requested is not None:
            raise StopNow(self.requested)
        self._interrupting = True
        try:
            yield
        finally:
            self._interrupting = False

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> "StopOnSignal":
        if self.enabled:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
