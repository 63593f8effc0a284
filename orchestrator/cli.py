"""`orchestrator serve | worker | migrate | check | demo`."""

from __future__ import annotations

import argparse
import io
import logging
import logging.handlers
import os
import re
import select
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from pydantic import ValidationError
from sqlalchemy.exc import DatabaseError

from orchestrator import __version__
from orchestrator.control_characters import CONTROL_CHARACTER
from orchestrator.entry import interrupted as _interrupted
from orchestrator.entry import release_stop
from orchestrator.errors import first_line

if TYPE_CHECKING:
    from orchestrator.services import Stopped
    from orchestrator.settings import Settings


LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
# The demo polishes at twice the draft size, and the embedded engines make at most 2048 px.
DEMO_SIZES = range(64, 1025, 8)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)") from None
    if not 0 < port < 65536:
        # The socket layer would take it modulo 65536 and listen elsewhere without a word.
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, but a flag's: "(default: False)" says nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0:  # store_true and the like
            return action.help
        return super()._get_help_string(action)


def _demo_size(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels") from None
    if size not in DEMO_SIZES:
        raise argparse.ArgumentTypeError(f"{size}: drafts are 64-1024 px, a multiple of 8 (polish doubles it)")
    return size


def _demo_prompt(text: str) -> str:
    # Refused here, not by the service's 422 after the demo had made its project.
    if not text.strip():
        raise argparse.ArgumentTypeError("a prompt says what to draw: it cannot be empty")
    return text


def _service_url(text: str) -> str:
    from orchestrator.settings import http_address

    # Not echoed when it may hold credentials that could not be told apart from the rest.
    said = repr(text) if "@" not in text else "the address given"
    try:
        http_address(text, example="http://127.0.0.1:8000")
    except ValueError as exc:
        told = str(exc) if str(exc).startswith("has ") else "is not an http:// or https:// address"
        raise argparse.ArgumentTypeError(f"{said} {told}") from None
    return text


def without_password(url: str | httpx.URL) -> str:
    """A URL to print: a reverse proxy's Basic credentials in it (`demo --url http://u:pw@host/`) are not."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(username=parsed.username, password="***") if parsed.password else parsed)


class _StoppedBeforeStart(BaseException):
    """SIGTERM to a worker or `serve` before its loop takes its signals. Not an `Exception`: nothing
    on the way out of the start may take it for a failure and carry on."""


def _stop_before_start(signum: int, frame: object) -> None:
    # The stop is under way: another SIGTERM (a supervisor's second, a process group's) raised
    # again in the unwinding, or as the stop is told, ended it with a traceback and exit 1.
    signal.signal(signum, signal.SIG_IGN)
    raise _StoppedBeforeStart


# What a stop during `serve`'s start left: the migration it may have been in is one transaction
# (migrations/env.py), rolled back as the signal unwinds it, or committed whole before it came.
START_STOPPED = ("the start was stopped before the service ran, nothing was half-written (the database is at a "
                 "whole revision)")


def _end_as_signaled(signum: int) -> int:
    """End the process by `signum` with its default action, as a running `serve` ends on SIGTERM
    (uvicorn raises it again): a supervisor sees the same stop however early it came. The status
    128 + the signal's number is returned where the signal did not end the process."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    try:
        return _stopped_main(argv)
    except KeyboardInterrupt:
        # A second Ctrl-C as the command's own `except KeyboardInterrupt` began to tell the first,
        # before it ignored SIGINT, escaped it: a traceback of both, killed by SIGINT.
        return _interrupted()


def _stopped_main(argv: list[str] | None) -> int:
    given = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in given if not arg.startswith("-")), None)
    if command in ("serve", "worker"):
        # SIGHUP reloads the policies once the service runs; until then (settings read, a migration
        # waiting for another's lock) it must not end the start: ignored before anything else.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if command not in ("serve", "worker"):
        return _main(given)
    # A supervisor's stop in the first second (the arguments, imports, settings, waiting for
    # another's migration or in its own, which is one transaction) ended it with 143, without a word.
    previous = signal.signal(signal.SIGTERM, _stop_before_start)
    try:
        release_stop()  # one held back through the console script's imports is told here
        return _main(given)
    except _StoppedBeforeStart:
        if command == "worker":
            return 0  # nothing had started: a clean stop, as a supervisor asked
        print(f"orchestrator: terminated; {START_STOPPED}", file=sys.stderr)
        return _end_as_signaled(signal.SIGTERM)
    finally:
        # A `serve` still here (refused at start, or its service stopped by a Ctrl-C, SIGTERM's
        # default put in place for uvicorn) gives the caller (a test, a program running it) its own
        # handler back; the worker's stop leaves SIGTERM ignored (see `_run`).
        if command == "serve":
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _top_option(arg: str) -> bool:
    """Whether `arg` is an option the top parser takes: -h, or --help or --version, whole or cut
    short as argparse reads them (`--vers`), which the check of options before a command refused."""
    return arg == "-h" or (len(arg) > 2 and any(option.startswith(arg) for option in ("--help", "--version")))


def _main(given: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="orchestrator", description="Tiered image-rendering orchestrator")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    defaults = _HelpWithDefaults
    serve = sub.add_parser("serve", help="run the HTTP service", formatter_class=defaults,
                           description="Run the HTTP service (settings: ORCH_* variables, see the README).")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on")
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="the service's and uvicorn's log level")
    serve.add_argument("--no-jobs", action="store_true",
                       help="queue jobs for `orchestrator worker` processes and run none here (ORCH_RUN_JOBS=false)")
    serve.add_argument("--allow-open", action="store_true",
                       help="listen beyond this machine without ORCH_ADMIN_KEY: anyone who reaches the port, and "
                       "any web page a browser on that network opens that rebinds its own name to this address "
                       "(others are refused changes), can spend the budgets and grant credits")

    worker = sub.add_parser("worker", help="run queued jobs from the database, without HTTP (one per GPU)",
                            formatter_class=defaults,
                            description="Run the jobs that API servers queue, on the same database and ORCH_DATA_DIR; "
                            "stops on SIGTERM or SIGINT.")
    worker.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level")

    sub.add_parser("migrate", help="apply database migrations and exit",
                   description="Bring the database of ORCH_DATABASE_URL (or ORCH_DATA_DIR's SQLite file) to this "
                   "version's schema, and exit. serve, worker and demo (without --url) also do this when they start.")
    check = sub.add_parser("check", help=("verify that every asset's PNG is in the store, byte for byte, "
                                          "and that the ledger and the projects' storage usage add up (read-only)"),
                           description="Verify, writing nothing, that every asset's PNG is in the store byte for "
                           "byte and that the ledger and the projects' storage usage add up. Exit 0: all good; 1: "
                           "problems, listed; 2: nothing to check where the settings point; 3: the database did not "
                           "answer for now (down, or a table locked by a migration): try again.")
    check.add_argument("--no-hash", action="store_true",
                       help="only look that each file is there, without reading it (fast on a large store)")

    demo = sub.add_parser("demo", help="draft -> promote -> polish on the embedded default, end to end",
                          description="Start the service on ORCH_DATA_DIR (or use --url), ask for 4 drafts, promote "
                          "one and polish it, following each job's event stream; save the images, a contact sheet "
                          "and the lineage in --out.")
    demo.add_argument("--url", type=_service_url,
                      help="use a running service instead of starting one (its key: ORCH_ADMIN_KEY)")
    demo.add_argument("--prompt", type=_demo_prompt, default="a lighthouse on a cliff at dusk, volumetric light",
                      help="what to draw (default: %(default)s)")
    demo.add_argument("--out", default="demo-output", help="folder for the images (default: demo-output)")
    demo.add_argument("--size", type=_demo_size, default=512,
                      help="width and height of the drafts: 64-1024, a multiple of 8 (default: 512)")
    demo.add_argument("--policy", default="local-only",
                      help="the demo project's routing policy (default: %(default)s, which sends nothing off this "
                      "machine; name one such as balanced to let its bridge and polish use the paid engines "
                      "configured)")

    # An option before any command (`orchestrator --port 8080`) was told as a missing command, or as
    # its value being an unknown one ("invalid choice: '8080'"), never as the option it is.
    first = next((i for i, arg in enumerate(given) if arg in sub.choices), len(given))
    if stray := [arg for arg in given[:first] if arg.startswith("-") and not _top_option(arg)]:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args, unknown = parser.parse_known_args(given)
    if unknown:
        # argparse leaves what a subcommand does not know to the top parser, whose usage then named
        # no option of the subcommand; the subcommand's is shown, unless it came before the subcommand.
        before = given[:given.index(args.command)] if args.command in given else given
        culprit = parser if any(arg in before for arg in unknown) else sub.choices[args.command]
        culprit.error(f"unrecognized arguments: {' '.join(unknown)}")
    level = getattr(args, "log_level", "info").upper()
    console = logging.StreamHandler()
    console.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[console])
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Its debug lines hold every response header (a provider's request id that echoes the key).
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # Its debug lines hold every handshake header: ComfyUI's basic auth from ORCH_COMFYUI_URL.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin, every start
    if args.command in ("demo", "check", "migrate"):
        # A new user's first `make demo` opened with 18 lines of revisions (migrate says from which to
        # which in a line); a service's log keeps them.
        logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    try:
        status = _run(args)
        sys.stdout.flush()  # inside the try: a reader gone (`check | head`) is told here, not at exit
        return status
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe's (a socket's): not a reader that stopped reading
        # The reader took what it wanted; the rest of the output goes nowhere, without a traceback
        # (Python's own advice: point stdout at devnull so the exit's flush cannot fail again).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C: whatever was running has stopped (the server cleanly)
        return _interrupted(str(exc))  # the demo says which of its jobs it canceled
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        from orchestrator.settings import source_of

        # Name the variable (or the file's key) to fix rather than print a traceback.
        problems = [f"  {e['msg']}" if e["type"] in ("unknown_setting", "config_file")  # name their file
                    else f"  {source_of(_field(e['loc']))}: {_message(e['type'], e['msg'])}"
                    f"{_shown_input(_field(e['loc']), e['input'], e['type'])}"
                    for e in exc.errors()]
        return _fail("invalid configuration:\n" + "\n".join(problems), status=2)
    except httpx.HTTPStatusError as exc:
        hint = " (the demo sends ORCH_ADMIN_KEY from its environment)" if exc.response.status_code == 401 else ""
        return _fail(f"{exc.request.method} {without_password(exc.request.url)} answered "
                     f"{exc.response.status_code}: {_error_message(exc.response)}{hint}")
    except httpx.TransportError as exc:
        return _fail(f"cannot reach {without_password(exc.request.url.copy_with(path='/', query=None))}: {exc}")
    except DatabaseError as exc:
        # The database is down or refuses us: say so in a line (the URL's password never shows).
        reason = _database_reason(exc)
        # One that is not there, refuses these credentials, or cannot be written is the setup's
        # (2, as `check` says it): a restart changes nothing. One that does not answer may come back (1).
        return _fail(f"cannot use the database ({_database_named()}): {reason}",
                     status=2 if _set_up_wrong(exc) else 1)


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone: a pipe's end then polls as an error on Linux, as a
    hang-up on macOS and for a socket (a journal stream)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no descriptor (a test's capture), no poll
        return False


# PostgreSQL's SQLSTATEs of a setup to fix: no such database, credentials refused, no privilege.
# No such database, credentials refused, no right to it. Not a server that takes no writes (25006)
# nor a search path naming no schema (3F000): a standby being promoted in a failover, a restore
# recreating its schema, are over within minutes, and a service exiting 2 then was never restarted.
SETUP_SQLSTATES = frozenset({"3D000", "28P01", "28000", "42501"})
# SQLite's words for a file that is not a database, cannot be opened, or cannot be written.
SETUP_SQLITE = ("file is not a database", "unable to open database file", "readonly database")
# libpq's, when the connection itself is refused so (its error then carries no SQLSTATE).
SETUP_LIBPQ = ("does not exist", "password authentication failed", "no pg_hba.conf entry", "permission denied",
               "not permitted to log in")
# libpq's own refusals before or without a server's word (no "FATAL:"): a password the server asks
# for and the URL lacks, an option it does not know or a value it cannot take, SSL asked of a server
# without it.
SETUP_CLIENT = ("no password supplied", "invalid connection option", "invalid uri query parameter",
                "invalid sslmode value", "invalid integer value", "bad value for", "server does not support ssl")


def _database_reason(exc: DatabaseError) -> str:
    """The database's refusal in a line, with what to do where the words alone do not say it."""
    reason = first_line(exc.orig or exc, type(exc).__name__)
    if "no password supplied" in reason:
        reason += " (the server asks for one: put it in the URL, PGPASSWORD or ~/.pgpass)"
    elif getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
        reason += (" (a table stayed locked past the lock timeout: a `migrate` running, or another session's "
                   "long transaction)")
    return reason


def _set_up_wrong(exc: DatabaseError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in SETUP_SQLSTATES:
        return True
    said = str(orig or exc).lower()
    if getattr(orig, "sqlite_errorname", None) is not None:
        return any(words in said for words in SETUP_SQLITE)
    return ("fatal:" in said and any(words in said for words in SETUP_LIBPQ)) or any(
        words in said for words in SETUP_CLIENT)


def _database_named() -> str:
    """Which database a failure is about, and where that was set: "unable to open database file"
    said neither (the default is a file in ORCH_DATA_DIR)."""
    from orchestrator.db import shown_url
    from orchestrator.settings import Settings, source_of

    settings = Settings()
    told = source_of("database_url") if settings.database_url else f"in {source_of('data_dir')}"
    return f"{told}: {shown_url(settings.resolved_database_url)}"


def _field(loc: tuple[int | str, ...]) -> str:
    """The setting an error is about: an alias (`ORCH_GEMINI_API_KEY`) read as its field (the line
    named ORCH_ORCH_GEMINI_API_KEY, and the value was hidden only as no field's)."""
    from orchestrator.settings import Settings, input_fields

    name = "_".join(str(p) for p in loc)
    return input_fields(Settings).get(name.lower(), name)


def _message(kind: str, message: str) -> str:
    """A setting's error without pydantic's "Value error, " before the settings' own validators' words."""
    return message.removeprefix("Value error, ") if kind == "value_error" else message


def _shown_input(field: str, value: object, kind: str = "") -> str:
    """The bad value, to help fix it, unless it may be a secret (a key, a password in an address):
    the message goes to the terminal and the service manager's journal. The settings' own
    validators (`value_error`) word their message whole: it names the bad part where it may."""
    from orchestrator.settings import Settings

    if kind == "value_error":
        return ""
    known = Settings.model_fields.get(field)
    if known is None or known.repr is False or "SecretStr" in str(known.annotation) or field.endswith("url"):
        return ""  # an address may carry user:password
    return f" (got {value!r})"


def _fail(message: str, status: int = 1) -> int:
    print(f"orchestrator: {message}", file=sys.stderr)
    return status


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        message = str(error["message"])
        known = (error.get("details") or {}).get("known")
        # A policy or engine name mistyped: the names there are belong on the line (`demo --policy`).
        if isinstance(known, list) and known and "known:" not in message:
            message += f" (known: {', '.join(map(str, known))})"
        return message
    except (ValueError, KeyError, TypeError, AttributeError):
        # Not the service's error body (a web server's page): its first line, not a page of HTML.
        lines = [line.strip() for line in response.text[:200].splitlines() if line.strip()]
        return lines[0] if lines else response.reason_phrase


MIN_KEY_LENGTH = 16


def _checked(settings: Settings, *, service: bool = True, demo_policy: str | None = None) -> int | None:
    """Exit status 2 with what to fix, before anything starts (1 when all of it may pass without a
    fix: a full disk, `services.ForNow`); None when nothing is wrong."""
    from orchestrator.services import ForNow, startup_problems

    problems = startup_problems(settings, service=service, demo_policy=demo_policy)
    if problems and all(isinstance(p, ForNow) for p in problems):
        return _fail("cannot start for now:\n" + "\n".join(f"  {p}" for p in problems), status=1)
    if problems:
        return _fail("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems), status=2)
    return None


def _resolution_problem(host: str, port: int) -> str | None:
    """Why `--host` names no address (a typo, a name no resolver knows); None when it names some."""
    from orchestrator.server import CannotListen, listening_addresses

    try:
        listening_addresses(host, port)
    except CannotListen as exc:
        return str(exc)
    return None


def _database_setting(settings: Settings) -> tuple[str, str]:
    """Where the database was named (the variable, or the config file's key), and what to point
    elsewhere to use another: the default is a file in the data dir, not ORCH_DATABASE_URL."""
    from orchestrator.settings import source_of

    if settings.database_url:
        where = source_of("database_url")
        return where, f"point {where} at a database of its own"
    where = source_of("data_dir")
    return (f"{where} (its orchestrator.db)",
            f"point {where} at a folder of its own, or ORCH_DATABASE_URL at a database of its own")


def _migrated(settings: Settings, *, writable: bool = False, found: list[str | None] | None = None) -> int | None:
    """Apply the migrations; with `writable`, also make sure the database takes writes (a
    read-only SQLite file migrates "up to date", and then the service failed at its first write
    with a traceback). None when it is ready; else the exit status, having said what is wrong.
    `found`, when given, gets the revision the upgrade found the database at.
    A database that refuses (down, read-only) raises `DatabaseError`, told in a line by `main`."""
    from alembic.util.exc import CommandError
    from sqlalchemy import text

    from orchestrator.db import Database, ForeignDatabase, MigrationRefused, shown_url, upgrade
    from orchestrator.services import NO_SPACE

    url = settings.resolved_database_url
    shown, (where, elsewhere) = shown_url(url), _database_setting(settings)
    try:
        before = upgrade(url)
        if found is not None:
            found.append(before)
        if writable:
            db = Database(url)
            try:
                with db.transaction() as s:  # a write that changes nothing
                    s.execute(text("UPDATE alembic_version SET version_num = version_num"))
            finally:
                db.dispose()
    except CommandError as exc:  # a revision this version does not know: the database is newer
        # A setup to fix, as `check` says of the same database (it exited 2, migrate and serve 1).
        return _fail(f"cannot migrate the database: {exc} (is it used by a newer orchestrator, or is it "
                     "another application's?)", status=2)
    except ForeignDatabase as exc:
        return _fail(f"{where}: {exc}: {elsewhere}", status=2)
    except MigrationRefused as exc:  # the data is the operator's to mend first; nothing was changed
        return _fail(f"cannot migrate the database: {exc}", status=2)
    except OSError as exc:  # its folder, or the lock file beside it, cannot be made
        return _fail(f"{where}: cannot write beside the database at {shown} ({exc.strerror or exc})",
                     status=1 if exc.errno in NO_SPACE else 2)  # a full disk may be freed: see `ForNow`
    return None


def _bound(settings: Settings) -> int | None:
    """Migrate, and bind the data dir to the database, before anything starts: a data dir that is
    not the database's store (`orchestrator.identity`) is told in a line, not in a traceback from
    inside the server's start-up; None when they are one install."""
    from orchestrator.db import Database
    from orchestrator.identity import WrongStore, bind
    from orchestrator.settings import source_of
    from orchestrator.store import ArtifactStore

    if (failed := _migrated(settings, writable=True)) is not None:
        return failed
    db = Database(settings.resolved_database_url)
    try:
        bind(db, ArtifactStore(settings.assets_dir))
    except WrongStore as exc:
        return _fail(f"{source_of('data_dir')}: {exc}", status=2)
    except OSError as exc:  # the store's id could not be written
        from orchestrator.services import cannot_write

        return _fail(f"{source_of('data_dir')}: {cannot_write(settings.assets_dir, exc)}", status=2)
    finally:
        db.dispose()
    return None


# Line breaks and the other control characters, direction controls included (after a right-to-left
# override, an editor or a browser showing the log reads the rest of the line backwards); a tab,
# which ends no line, is written as it is.
_CONTROL = re.compile(f"(?!\t){CONTROL_CHARACTER.pattern}")


class OneLineFormatter(logging.Formatter):
    """Each record's message on one line, its control characters escaped: a message quotes text
    from outside (a provider's error body, an id its answer named), and a line break there wrote
    a forged line of its own into the log (`... ERROR orchestrator.api: admin key rotated`). A
    traceback after it stays as Python writes it."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _CONTROL.sub(lambda found: repr(found.group())[1:-1], super().formatMessage(record))


class _NoFollowFileHandler(logging.handlers.WatchedFileHandler):
    """Reopened by name after a logrotate, as its base is, but never through a symbolic link put
    there meanwhile (the file is then not written: logging's own error report says so)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)
        except OSError:  # the reopen, outside the base's own guard: it must not fail the caller
            self.handleError(record)

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def _log_to_data_dir(settings: Settings, told: Sequence[str] = ()) -> None:
    """Also append this process's log to `ORCH_DATA_DIR/logs/orchestrator.log`, which every
    process of the data dir shares (lines carry their pid). Reopened when moved, for logrotate.
    `told`: warnings already said on stderr, written to the file too."""
    path = (settings.data_dir / "logs").resolve() / "orchestrator.log"
    if path.is_symlink():
        # The logs folder may be shared with other users of the data dir: a link put there would
        # have this process append to the file it names (as root, any file).
        logging.getLogger(__name__).warning("the log file %s is a symbolic link, not followed; logging to stderr only",
                                            path)
        return
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        return  # main() called again in this process: one handler per file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _NoFollowFileHandler(path, encoding="utf-8")
    except OSError as exc:  # another uid's file, a read-only folder: the service runs on, logging to stderr
        logging.getLogger(__name__).warning("cannot write the log file %s (%s); logging to stderr only", path,
                                            exc.strerror or exc)
        return
    handler.setFormatter(OneLineFormatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    # Told on stderr while the settings were read, before this file was open: a typo such as
    # ORCH_ADMIN_KYE (an API left open) belongs in the log an operator reads later too.
    from orchestrator.settings import Settings, unknown_variables

    told_by = logging.getLogger("orchestrator.settings")
    for sentence in unknown_variables(Settings, os.environ):
        handler.handle(told_by.makeRecord(told_by.name, logging.WARNING, __file__, 0, sentence, (), None))
    # The same for the start's own warnings (an API open beyond this machine, a short admin key).
    said_by = logging.getLogger(__name__)
    for sentence in told:
        handler.handle(said_by.makeRecord(said_by.name, logging.WARNING, __file__, 0, sentence, (), None))


def _log_what_it_uses(settings: Settings) -> None:
    """One line at start: which data dir, database, config file and auth the service runs with."""
    from orchestrator.db import shown_url
    from orchestrator.settings import Settings

    config = Path(os.path.expanduser(str(Settings.model_config.get("toml_file") or "")))
    logging.getLogger(__name__).info(
        "data dir %s, database %s, config file %s, %s, %s", settings.data_dir.resolve(),
        shown_url(settings.resolved_database_url),
        config.resolve() if config.is_file() else "none", "admin key on" if settings.admin_key else "no admin key",
        "runs jobs" if settings.run_jobs else "runs no jobs (workers do)")


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator.api.cross_site import is_loopback
    from orchestrator.server import StartInterrupted, serve

    if (failed := _checked(settings) or _bound(settings)) is not None:
        return failed
    warnings = []
    if settings.admin_key is None and not is_loopback(args.host):
        warnings.append(f"listening on {args.host} without ORCH_ADMIN_KEY (--allow-open): anyone who reaches the "
                        "port can use the API, and so can any web page a browser on that network opens (DNS "
                        "rebinding)")
    if settings.admin_key is not None and len(settings.admin_key.get_secret_value()) < MIN_KEY_LENGTH:
        warnings.append(f"ORCH_ADMIN_KEY has fewer than {MIN_KEY_LENGTH} characters and can be guessed; make one "
                        "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    for warning in warnings:
        print(f"orchestrator: warning: {warning}", file=sys.stderr)
    _log_to_data_dir(settings, told=warnings)
    if args.no_jobs:
        settings = settings.model_copy(update={"run_jobs": False})
    _log_what_it_uses(settings)
    # uvicorn takes SIGTERM and SIGINT once the app is built, and raises them again once it has
    # stopped: SIGTERM's default (put in place by `Server.run`) then ends the process,
    # a Ctrl-C is returned. Until then either is the start's stop: a SIGTERM told by `main`, a
    # Ctrl-C raised from here (while the app was built, which writes nothing) and told by `_run`.
    try:
        return _stopped(serve(settings, host=args.host, port=args.port, log_level=args.log_level))
    except StartInterrupted:
        raise
    except KeyboardInterrupt:  # the service ran (a second Ctrl-C as it ends): not the start's stop
        return _interrupted()


def _stopped(stopped: Stopped) -> int:
    """The status of a service's command once it has stopped: 130 with its line after a Ctrl-C, as
    every command ends on it; else 0 (the worker's SIGTERM: `serve` is ended by it, 143)."""
    return _ended(_interrupted() if stopped.signal == signal.SIGINT else 0, device_busy=stopped.device_busy)


def _ended(status: int, *, device_busy: bool) -> int:
    """`status`, or an exit with it at once when the service's inference thread is still busy.
    Its jobs are settled or left for recovery, but a model load (minutes, for a download) or a
    pipeline call holds that thread, which the interpreter's exit would wait for: past a
    supervisor's stop timeout (and then SIGKILL), or a user's patience after Ctrl-C."""
    if device_busy:  # the service said so as it stopped (unless a second Ctrl-C cut the demo's wait short)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from orchestrator.api.cross_site import is_loopback
        from orchestrator.server import CannotListen, check_listenable
        from orchestrator.settings import Settings

        settings = Settings()
        # Refused before anything is made: no data dir or database left behind by a start that is not one.
        if settings.admin_key is None and not is_loopback(args.host) and not args.allow_open:
            if (unknown_host := _resolution_problem(args.host, args.port)) is not None:
                return _fail(unknown_host, status=2)  # a name nothing listens on: the key is not the problem
            where = args.host or "every interface (--host '')"
            return _fail(f"refusing to listen on {where} without ORCH_ADMIN_KEY: anyone who reaches the port "
                         "could spend the budgets and grant credits. Set ORCH_ADMIN_KEY (or pass --allow-open "
                         "on a network you trust)", status=2)
        try:
            check_listenable(args.host, args.port)
        except CannotListen as exc:
            return _fail(str(exc), status=2)
        try:
            return _serve(args, settings)
        except KeyboardInterrupt as exc:  # told by `_main`, with what was left behind
            raise KeyboardInterrupt(str(exc) or START_STOPPED) from None
    if args.command == "worker":
        import asyncio

        from orchestrator.settings import Settings
        from orchestrator.worker import run_worker

        settings = Settings()
        if (failed := _checked(settings) or _bound(settings)) is not None:
            return failed
        _log_to_data_dir(settings)
        stopped = asyncio.run(run_worker(settings))
        # Its stop is done: the loop's close put back SIGTERM's default, and one more (a
        # supervisor's second, a process group's) would have ended the exit itself with 143.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return _stopped(stopped)
    if args.command == "migrate":
        from orchestrator.db import shown_url, stored_revision
        from orchestrator.settings import Settings

        settings = Settings()
        if (failed := _checked(settings, service=False)) is not None:
            return failed
        url = settings.resolved_database_url
        found: list[str | None] = []  # as the upgrade found it: read before, another's upgrade was told as ours
        # Written to as well: a read-only file was "up to date", exit 0, and `serve` then refused it.
        if (failed := _migrated(settings, writable=True, found=found)) is not None:
            return failed
        before, after = found[0], stored_revision(url)
        print(f"database at {shown_url(url)} " + (f"is up to date (revision {after})" if after == before else
                                                  f"migrated from {before or 'nothing'} to revision {after}"))
        return 0
    if args.command == "check":
        return _check(no_hash=args.no_hash)
    from orchestrator.signals import signals_held_back

    with signals_held_back():  # the threads these imports start (numpy's) leave a Ctrl-C to this one
        from orchestrator.demo import quiet_terminal_log
        from orchestrator.services import config_file_problem, file_in_the_way

    out = Path(args.out)
    if (file := file_in_the_way(out)) is not None:  # said before anything is made
        return _fail(f"cannot use {out} for the images: "
                     + ("not a directory" if file == out else f"{file} is not a directory"), status=2)
    if args.url is not None and (problem := config_file_problem()) is not None:
        # Its admin key may come from that file: one named and not there was passed over, and a
        # service that needs the key answered 401 to a demo that had never read it.
        return _fail(f"invalid configuration:\n  {problem}", status=2)
    if args.url is None:  # the demo starts the service itself: the same checks as `serve`
        from orchestrator.settings import Settings

        settings = Settings()
        # Its service's start and jobs log into the progress bars otherwise: on the terminal, only warnings.
        quiet_terminal_log()
        if (failed := _checked(settings, demo_policy=args.policy) or _bound(settings)) is not None:
            return failed
        _log_to_data_dir(settings)  # the rest, as `serve` keeps it
    # Made before anything runs, so that a folder that cannot be is refused first; removed again, with
    # the folders made for it, by a run that ends with nothing saved there (a service unreachable).
    made = [folder for folder in (out.resolve(), *out.resolve().parents) if not folder.exists()]
    try:
        return _demo(args, out)
    finally:
        for folder in made:  # innermost first; one holding anything stops the removal
            try:
                folder.rmdir()
            except OSError:
                break


def _demo(args: argparse.Namespace, out: Path) -> int:
    from orchestrator.demo import run_demo

    try:
        out.mkdir(parents=True, exist_ok=True)
        # Written to once: a folder that takes no files failed with a traceback after the drafts.
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        return _fail(f"cannot use {out} for the images: {exc.strerror or exc}", status=2)
    stops: list[Stopped] = []  # its own service's, when it started one
    # A stop (`timeout`, a CI's cancel, a closed terminal) ends the demo as Ctrl-C does: killed at
    # once, it left its job running, rendered later for nobody (a paid one under --policy balanced).
    terminated: list[int] = []

    def stop_as_ctrl_c(signum: int, _frame: object) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    # Only the main thread takes signals (a program running the demo in a thread keeps its own).
    on_main = threading.current_thread() is threading.main_thread()
    handlers = {stopping: signal.signal(stopping, stop_as_ctrl_c)
                for stopping in (signal.SIGTERM, signal.SIGHUP) if on_main}
    try:
        status = run_demo(url=args.url, prompt=args.prompt, out=args.out, size=args.size, policy=args.policy,
                          on_stop=stops.append)
    except KeyboardInterrupt as exc:
        status = _interrupted(str(exc))  # it says which of its jobs it canceled
        if terminated:  # as a process the signal ended: 128 + its number
            status = 128 + terminated[0]
    except SystemExit as exc:  # why it cannot go on, in a line as every command's errors
        if not isinstance(exc.code, str):
            raise
        status = _fail(exc.code)
    finally:
        for stopping, handler in handlers.items():
            signal.signal(stopping, handler)
    return _ended(status, device_busy=any(stop.device_busy for stop in stops))


CHECK_SHOWN = 20


def _check(*, no_hash: bool) -> int:
    """Exit 0 when every asset's file is sound and the ledger and the projects' storage usage add
    up, 1 when not, 2 when there is nothing to check where the settings point, 3 when the database
    did not answer for now."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from orchestrator.check import (
        ONE,
        UNNAMED_LISTED,
        CannotCheck,
        StoreReport,
        at_rest,
        check_identity,
        check_ledger,
        check_revision,
        check_storage,
        check_store,
        open_store,
        read_only_engine,
    )
    from orchestrator.services import config_file_problem, database_url_problems, file_in_the_way, not_a_directory
    from orchestrator.settings import Settings, source_of

    if (problem := config_file_problem()) is not None:
        return _fail(problem, status=2)
    settings = Settings()
    if problems := database_url_problems(settings.resolved_database_url):
        return _fail("\n".join(problems), status=2)
    if (file := file_in_the_way(settings.data_dir)) is not None:
        return _fail(f"{source_of('data_dir')}: {not_a_directory(settings.data_dir, file)}", status=2)
    url = settings.resolved_database_url
    try:
        # Read as immutable while nothing writes it, again if something wrote it meanwhile (a
        # migration, a service that started), whose changes could have been read half-way; live
        # while something has it open, or should it be written during a second read too.
        for attempt in range(3):
            before = at_rest(url)
            immutable = before is not None and attempt < 2
            engine = read_only_engine(url, immutable=immutable)
            try:
                check_revision(engine)
                store = open_store(settings.assets_dir, engine)
                wrong_store = None if store is None else check_identity(engine, store)
                report = StoreReport(hashed=not no_hash) if store is None else check_store(engine, store,
                                                                                            hashes=not no_hash)
                ledger = check_ledger(engine)
                storage = check_storage(engine)
            except DatabaseError:
                # Read again if a write may have torn it; a file that fails twice unchanged is
                # damaged (read live, SQLite would leave its -wal and -shm files beside it).
                if not immutable or (attempt == 1 and at_rest(url) == before):
                    raise
                continue
            finally:
                engine.dispose()
            if not immutable or at_rest(url) == before:
                break
    except CannotCheck as exc:
        return _fail(str(exc), status=2)
    except (ArgumentError, NoSuchModuleError) as exc:
        return _fail(f"{source_of('database_url')}: not a database URL I can open ({exc})", status=2)
    except DatabaseError as exc:  # not there, not migrated, not a database at all
        from orchestrator.db import transient

        reason = _database_reason(exc)
        if transient(exc) and not _set_up_wrong(exc):
            # Down, restarting, or a table locked by a migration: nothing is known of the data (1
            # says problems were found in it, 2 that there is none where the settings point).
            return _fail(f"could not check: the database did not answer for now ({_database_named()}): {reason}; "
                         "nothing was checked, try again", status=3)
        return _fail(f"cannot use the database ({_database_named()}): {reason}", status=2)
    if wrong_store is not None:
        print(f"PROBLEMS: {source_of('data_dir')}: {wrong_store}")
    if store is None:
        print(f"0 assets: nothing stored yet ({settings.assets_dir} is made at the service's first start)")
    else:
        how = "read and hashed" if report.hashed else "looked for (--no-hash: not read)"
        print(f"{_counted(report.assets, 'asset')}, {_counted(report.reads, 'file')} {how} in {settings.assets_dir}")
    for ids, one, many in ((report.missing, "asset missing", "assets missing"),
                           (report.unreadable, "asset unreadable (the disk or a permission)",
                            "assets unreadable (the disk or a permission)"),
                           (report.damaged, "asset damaged (the bytes do not match its sha256)",
                            "assets damaged (the bytes do not match their sha256)"),
                           (report.malformed, "asset with a malformed sha256 in its row",
                            "assets with a malformed sha256 in their row")):
        if ids:
            print(f"{_counted(len(ids), one, many)}: {_shown(ids)}")
    if report.resized:
        print(f"{_counted(len(report.resized), 'asset whose recorded size', 'assets whose recorded size')} "
              f"(bytes in the row) is not its file's: {_shown(report.resized)}")
    if report.set_aside:
        files = "asset's file was" if len(report.set_aside) == 1 else "assets' files were"
        print(f"{len(report.set_aside)} {files} set aside by a sweep that stopped mid-way (the service's next sweep, "
              f"at its start or within the hour, puts {_them(report.set_aside)} back): {_shown(report.set_aside)}")
    if report.foreign:
        print(f"{report.unnamed} of the {_counted(report.files, 'file')} in the store "
              f"{'is' if report.unnamed == 1 else 'are'} named by no asset in this database"
              + (f"; the first {len(report.unnamed_paths)}:" if len(report.unnamed_paths) < report.unnamed else ":"))
        for path in report.unnamed_paths:
            print(f"  {path}")
    elif report.unnamed and report.malformed:
        print(f"{_counted(report.unnamed, 'file')} no asset names, some maybe the files of the malformed rows above: "
              "mend those rows first, as the service removes files no asset names after an hour")
    elif report.unnamed:
        print(f"{_counted(report.unnamed, 'file')} no asset names (jobs' images left by a crash; the service "
              "removes them after an hour)")
    if report.in_flight:
        print(f"{_counted(report.in_flight, 'file')} no asset names, written in the last hour while jobs run "
              "(a running job's images before its end commits; the service removes any a crash left, after an hour)")
    if report.temp_files:
        print(f"{_counted(report.temp_files, 'temp file')} ({report.temp_bytes} bytes) left by image writes a crash "
              "cut short before their rename, or still being written (the service removes them once an hour old)")
    if report.broken:
        print(f"{_counted(len(report.broken), 'folder')} found in an image file's place and moved aside (the image "
              "was written again): look at and remove them, as no sweep does:")
        for path in report.broken[:UNNAMED_LISTED]:
            print(f"  {path}")
        if len(report.broken) > UNNAMED_LISTED:
            print(f"  ... and {len(report.broken) - UNNAMED_LISTED} more")
    print(f"ledger: {_counted(ledger.entries, 'entry', 'entries')}, {_counted(ledger.holds, 'hold')}")
    for what, ids in ledger.problems.items():
        print(f"{_counted(len(ids), ONE.get(what, what), what)}: {_entries(ids)}")
    if ledger.open_finished:
        print(f"{_counted(len(ledger.open_finished), 'open hold of a finished job', 'open holds of finished jobs')} "
              f"(a running service's sweep settles {_them(ledger.open_finished)}): {_entries(ledger.open_finished)}")
    if ledger.unflagged:
        print(f"{_counted(len(ledger.unflagged), 'settled hold')} still marked open (settled by an older version; "
              f"a running service's sweep marks {_them(ledger.unflagged)}): {_entries(ledger.unflagged)}")
    if ledger.unreconciled:
        print(f"{_counted(ledger.unreconciled, 'capture waits', 'captures wait')} to be reconciled against an invoice "
              "(GET /v1/projects/{id}/ledger?unreconciled=true)")
    print(f"storage usage: {_counted(storage.projects, 'project')}")
    for off in storage.off[:CHECK_SHOWN]:
        print(f"project {off.project_id}: {off.recorded} bytes recorded, its live assets hold {off.summed} "
              f"(difference {off.difference:+d})")
    if len(storage.off) > CHECK_SHOWN:
        print(f"... and {len(storage.off) - CHECK_SHOWN} more projects")
    if storage.unmeasured:
        print(f"{_counted(storage.unmeasured, 'live asset')} not measured yet (stored before sizes were kept, "
              f"counted as 0): the service's asset sweep measures {'it' if storage.unmeasured == 1 else 'them'} at "
              "its next start" + (", one whose file is missing once its file is restored" if report.missing else ""))
    if report.ok and ledger.ok and storage.ok and wrong_store is None:
        print("ok")
        return 0
    if report.foreign:
        sqlite = settings.resolved_database_url.startswith("sqlite")
        print("PROBLEMS: is it the database this data dir belongs to?" + (
            " A copy of a running service's SQLite file without its -wal file holds none of the recent rows: take "
            "backups as the README says." if sqlite and wrong_store is None else "")
              + (" If it is, the files listed are images of jobs killed as they stored them: once sure, move them "
                 "out of the store, and the sweep, which removes nothing meanwhile, goes on" if wrong_store is None
                 else ""))
    if report.lost and not report.foreign and wrong_store is None:
        # Of another install's store, the files are not lost: the data dir is the wrong one.
        print("PROBLEMS: restore those assets' files from a backup (the ids above name them)")
    if not ledger.ok:
        print("PROBLEMS: the ledger entries above do not add up; budgets and spend are off by them "
              "until they are corrected (restore the database, or correct them by hand)")
    if report.resized:
        print("PROBLEMS: the assets above count a size in their projects' storage usage that is not their "
              "file's: correct `bytes` in their rows, and their projects' `storage_bytes` by the difference "
              "(or restore the files, if they were replaced)")
    if not storage.ok:
        print("PROBLEMS: the projects above record a storage usage that is not what their live assets hold; "
              "their quotas are judged on it until `storage_bytes` is set to the sum by hand (or the database "
              "restored)")
    return 1


def _counted(n: int, one: str, many: str | None = None) -> str:
    """`1 asset`, `2 assets`: `many` where adding an s will not do."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def _them(ids: list[str]) -> str:
    return "it" if len(ids) == 1 else "them"


def _entries(ids: list[str]) -> str:
    return ("entry " if len(ids) == 1 else "entries ") + _shown(ids)


def _shown(ids: list[str]) -> str:
    more = f", ... ({len(ids) - CHECK_SHOWN} more)" if len(ids) > CHECK_SHOWN else ""
    return ", ".join(ids[:CHECK_SHOWN]) + more


if __name__ == "__main__":
    sys.exit(main())
