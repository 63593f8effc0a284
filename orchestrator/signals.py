"""Which thread takes a process's signals: the main one, where a command handles them.

The kernel hands a process's signal to any thread that does not block it, and Python runs the
handler only when the main thread next runs. The demo's main thread waits in a socket read for
its job's next event or keep-alive, so a Ctrl-C another thread took ended it up to 15 s late.
The service it runs in a thread of its own, and every thread that one starts (the executors, the
inference thread, torch's), block them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# A Ctrl-C, a stop, a closed terminal.
MAIN_THREAD_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                                if hasattr(signal, name))


def leave_signals_to_the_main_thread() -> None:
    """Block `MAIN_THREAD_SIGNALS` in the calling thread, and so in every thread it starts from now
    on, where the platform has thread signal masks. The main thread's own are left alone."""
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is not threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)


@contextmanager
def signals_held_back() -> Iterator[None]:
    """`MAIN_THREAD_SIGNALS` blocked in the calling thread meanwhile: the threads started inside
    (OpenBLAS's, as the service's modules first import numpy) leave them to the main thread. One
    that arrives meanwhile waits, and is handled once the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
