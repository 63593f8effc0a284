"""The `orchestrator` command's entry point: the signals a supervisor may send in the command's
first half second are set before the command's imports (httpx, pydantic, SQLAlchemy), which
take that long. A `systemctl reload` (SIGHUP) then ended a `serve` or `worker` starting (129),
and a stop (SIGTERM) a starting worker (143), before `orchestrator.cli.main` could take them; a
Ctrl-C there is told as the command's own is."""

from __future__ import annotations

import signal
import sys


def _stopped_while_importing(signum: int, frame: object) -> None:
    raise SystemExit(0)  # nothing had started: a clean stop, as a supervisor asked


def main() -> int:
    given = sys.argv[1:]
    command = next((arg for arg in given if not arg.startswith("-")), None)
    if command in ("serve", "worker"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # `cli.main` says why
    if command == "worker":
        signal.signal(signal.SIGTERM, _stopped_while_importing)  # `cli.main` takes it over
    try:
        from orchestrator.cli import main as run
    except KeyboardInterrupt:
        # Ctrl-C in those imports: README's one line and 130, as `cli.main` says it (an import's
        # traceback, and a process killed by SIGINT, before).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("orchestrator: interrupted", file=sys.stderr)
        return 130
    return run(given)
