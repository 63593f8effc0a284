"""The `orchestrator` command's entry point: the signals a supervisor may send in the command's
first half second are set before the command's imports (httpx, pydantic, SQLAlchemy), which
take that long. A `systemctl reload` (SIGHUP) then ended a `serve` or `worker` starting (129),
and a stop (SIGTERM) any command (143) without a word, before `orchestrator.cli.main` could take
them; a Ctrl-C there is told as the command's own is."""

from __future__ import annotations

import os
import signal
import sys

# Whether `main` holds SIGTERM back in the main thread while the command imports (`release_stop`).
_held: list[set[int | signal.Signals]] = []


def _hold_stop() -> None:
    """Block SIGTERM while the command imports: one sent meanwhile waits, to be told by whoever
    takes it (`release_stop`), where its default ended the process at once and silently. The
    threads the imports start keep it blocked, and leave it to the main thread. Not one the
    command's caller ignores (`trap '' TERM`) or blocks, which it inherits: held, it became
    pending, and ended the command it had left running."""
    if hasattr(signal, "pthread_sigmask") and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        if signal.SIGTERM not in previous:
            _held.append(previous)


def release_stop() -> None:
    """Let a SIGTERM `main` held back through the imports in: it is handled now, by the handler
    the caller has just put in place (`orchestrator.cli.main`'s, for `serve` and `worker`).
    Nothing when nothing was held (`cli.main` called by a test, a program)."""
    if _held:
        signal.pthread_sigmask(signal.SIG_SETMASK, _held.pop())


def _stopped_meanwhile() -> bool:
    return bool(_held) and signal.SIGTERM in signal.sigpending()


def interrupted(detail: str = "") -> int:
    """Ctrl-C's line; `detail`, what was done about it (the demo's jobs canceled). The command has
    stopped: another Ctrl-C in its last moments raised a KeyboardInterrupt nobody caught, and the
    process ended killed by SIGINT, not with 130 (seen once for serve's double Ctrl-C, in CI)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("orchestrator: interrupted" + (f"; {detail}" if detail else ""), file=sys.stderr)
    return 130


def main() -> int:
    try:
        return _main()
    except KeyboardInterrupt:
        # A second Ctrl-C as the command's own `except KeyboardInterrupt` began to tell the first,
        # before it ignored SIGINT, escaped it: a traceback of both, killed by SIGINT.
        return interrupted()


def _main() -> int:
    given = sys.argv[1:]
    command = next((arg for arg in given if not arg.startswith("-")), None)
    if command in ("serve", "worker"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # `cli.main` says why
    _hold_stop()
    try:
        from orchestrator.cli import main as run
    except KeyboardInterrupt:
        # Ctrl-C in those imports: README's one line and 130, as `cli.main` says it (an import's
        # traceback, and a process killed by SIGINT, before).
        return interrupted()
    if command not in ("serve", "worker"):  # theirs is taken, with the start's line, by `cli.main`
        if _stopped_meanwhile():
            # Nothing of the command ran: said, and ended as the stop would have ended it (143).
            print("orchestrator: terminated", file=sys.stderr)
            sys.stderr.flush()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            release_stop()  # the held one ends the process here
            os.kill(os.getpid(), signal.SIGTERM)
            return 128 + signal.SIGTERM
        release_stop()
    return run(given)
