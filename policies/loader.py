"""Reading policy files: one file, or the whole set (built-ins plus `ORCH_POLICY_DIR`).

A policy file is named after its policy (`balanced.toml` holds `name = "balanced"`), so a name
always points at one file. A file that fails to load is reported and refused; the store keeps
serving the last good version of that policy, so a typo saved mid-edit never takes routing down.
With a `SharedVersions` (the database's, for a service of several processes) that version is the
service's: the newest any of its processes read, not the one this process happened to read last.
"""

from __future__ import annotations

import builtins
import difflib
import hashlib
import logging
import os
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from orchestrator.errors import InvalidRequest, NotFound, shown
from orchestrator.workers import open_regular_file
from policies.schema import PRIVACY_TAG, Policy, Rule, is_private, rule_label

log = logging.getLogger(__name__)

BUILTIN = "builtin"


@dataclass(frozen=True)
class Seen:
    """What a process read of the policy file of the extra directory named `name`: its bytes, or
    None when the file was gone; and when, in ns of the service's clock, taken before the read.
    The newest version is the one read last, not the file changed last: a rollback (a link, a
    directory or a snapshot swapped back) brings back older files."""

    name: str
    source: str
    content: bytes | None
    read_ns: int
    # Made by a load of this process and not told yet: only such a read is told, and kept (its time
    # later than the kept one's, or the kept one's from a clock since set back). What a process
    # read before (its refused files' versions, a directory's it cannot list) is old news.
    new: bool = False


class SharedVersions(Protocol):
    """Where the processes of one service keep each policy file's newest good version (`Seen`)."""

    def now_ns(self) -> int:
        """The service's clock (`Seen.read_ns`)."""

    def remember(self, seen: Sequence[Seen]) -> None:
        """Keep each of `seen` (news) unless a version read later is kept already."""

    def recall(self, names: Sequence[str] | None) -> dict[str, Seen]:
        """The versions kept of `names` (a name never kept is left out), or of every file (None)."""


# A policy, and the bytes of the file of the extra directory it came from (None: a built-in).
_Loaded = tuple[Policy, bytes | None]
# (policy name, loader, whether its file is the extra directory's), in the order they are loaded.
_Files = list[tuple[str, Callable[[], _Loaded], bool]]


class PolicyError(InvalidRequest):
    """A policy file that cannot be used. The message names the file, the rule and the field."""

    def __init__(self, message: str, *, file: str) -> None:
        super().__init__(message, details={"file": file})
        self.file = file


MAX_POLICY_BYTES = 1024 * 1024


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def parse_policy(data: bytes, *, label: str, source: str, expect_name: str | None = None) -> Policy:
    """Validate the bytes of one policy file. `label` names the file in error messages; `source` is
    what `Policy.source` reports; `expect_name` is the file stem the policy's name must equal."""
    try:
        # utf-8-sig: an editor's byte order mark is not a TOML syntax error at line 1, column 1.
        raw = tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{label}: not UTF-8 text (byte {exc.start})", file=label) from None
    except tomllib.TOMLDecodeError as exc:
        # The 3.11 exception has no line attribute; its message ends "(at line N, column M)".
        raise PolicyError(f"{label}: TOML syntax error: {exc}", file=label) from None
    except RecursionError:  # some hundreds of nested brackets: a 500 at reload, a traceback at start
        raise PolicyError(f"{label}: nested too deeply to be a policy", file=label) from None
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(f"{label}: {_describe(raw, exc)}", file=label) from None
    except RecursionError:
        raise PolicyError(f"{label}: nested too deeply to be a policy", file=label) from None
    if expect_name is not None and policy.name != expect_name:
        raise PolicyError(f"{label}: name: '{policy.name}' does not match the file name; "
                          f"a policy lives in a file named after it ({policy.name}.toml)", file=label)
    return policy.bind_source(source, content_hash(data))


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    """Load one policy file; raises `PolicyError` when it cannot be used."""
    return _read_policy_file(Path(path))[0]


def _read_policy_file(file: Path) -> _Loaded:
    try:
        # Not a FIFO (a read would wait for a writer, holding every reload) nor a file of any size
        # (a 50 MB one took 9 s a reload, and `GET /v1/policies` sent it whole).
        with open_regular_file(file, os.O_RDONLY, "rb", follow=True) as opened:
            data = opened.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"{file}: cannot read: {exc.strerror or exc}", file=str(file)) from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"{file}: larger than {MAX_POLICY_BYTES // 1024 // 1024} MiB, which no policy needs "
                          "(is it the file meant?)", file=str(file))
    return parse_policy(data, label=str(file), source=str(file), expect_name=file.stem), data


class PolicyStore:
    """The policies a service can route with: the built-ins shipped in this package, overridden or
    extended by the `*.toml` files of `extra_dir`. Loads on construction; `errors` holds what the
    last load refused. With `shared`, a refused file of `extra_dir` is served as the newest good
    version any process sharing it read (this process's own when it cannot be asked)."""

    def __init__(self, extra_dir: str | os.PathLike[str] | None = None, *, include_builtins: bool = True,
                 shared: SharedVersions | None = None) -> None:
        self.extra_dir = None if extra_dir is None else Path(extra_dir)
        self.include_builtins = include_builtins
        self.shared = shared
        self._policies: dict[str, Policy] = {}
        # This process's last look at each file of `extra_dir` it loaded: the version it serves, or
        # the file's removal. Told to `shared` at each load, and weighed against what it recalls.
        self._seen: dict[str, Seen] = {}
        # The kept versions this release could not load, by name: their `read_ns`, not parsed again.
        self._unloadable: dict[str, int] = {}
        # Since the last load: the files of `extra_dir` refused, the built-ins loaded, whether
        # `shared` failed (both looked at again by `resync`), and the refused files served from
        # `shared` (True: its version; False: the file's removal, which another process saw).
        self._refused: builtins.list[str] = []
        self._shipped: dict[str, Policy] = {}
        self._unshared = False
        self._unlisted = False  # the directory could not be listed at the last load
        self._from_service: dict[str, bool] = {}
        self._errors: builtins.list[PolicyError] = []
        self._reloading = threading.Lock()
        self.loaded_fingerprint: object = None  # the files' `fingerprint` at the last load
        self.reload()

    @property
    def errors(self) -> builtins.list[PolicyError]:
        return builtins.list(self._errors)

    def reload(self) -> builtins.list[PolicyError]:
        """Read every file again. Returns the files refused; each refused policy keeps its last
        good version (a policy that never loaded stays absent, or built-in when one exists)."""
        with self._reloading:
            # Taken before reading: a file written while this load reads it is seen as changed again.
            # Kept only once the load is done: one that fails is tried again at the next look.
            fingerprint = self.fingerprint()
            listed_ns = self._now_ns()  # before the listing: a removal it misses happened before
            previous = self._policies
            fresh: dict[str, Policy] = {}
            shipped: dict[str, Policy] = {}
            refused: builtins.list[str] = []
            errors: builtins.list[PolicyError] = []
            files, listed = self._files(errors)
            for name, load, in_dir in files:
                # Each file's own, just before its read: a read stamped before an edit and made
                # after it (the listing, other files read between) lost to an older one.
                read_ns = self._now_ns() if in_dir else None
                try:
                    fresh[name], read = load()
                except PolicyError as exc:
                    errors.append(exc)
                    if in_dir:
                        refused.append(name)
                    if name in previous:
                        fresh[name] = previous[name]
                    continue
                if read is not None:
                    self._seen[name] = _seen_at(name, fresh[name].source, read, read_ns)
                if not in_dir:
                    shipped[name] = fresh[name]
            if not listed:
                # A directory that vanished for a moment (remount, deploy), or that this process may
                # not read (a permission lost), should not drop policies: its files are not gone.
                for name, policy in previous.items():
                    if policy.source != BUILTIN:
                        fresh[name] = policy
                # Each file of it is as good as refused, those this process never read too (one
                # overriding a built-in served the built-in): served as the service keeps them,
                # which the other processes, that can read the files, tell.
                refused = builtins.list(self._seen)
            else:
                self._note_removals({name for name, _, in_dir in files if in_dir}, listed_ns)
            # A refused file still served as the service's version is still told so.
            told = {name: was for name, was in self._from_service.items() if name in refused}
            self._refused, self._shipped, self._from_service = refused, shipped, told
            self._unlisted = not listed
            if self.shared is not None:
                self._share(fresh)
            # One assignment: readers on other threads see the old set or the new one, never a mix.
            self._policies = fresh
            self._errors = errors
            self.loaded_fingerprint = fingerprint
            return builtins.list(errors)

    def resync(self) -> builtins.list[str]:
        """While a file is refused, the directory cannot be listed, or `shared` failed: tell `shared`
        what this process read and could not tell yet, and serve the refused files as it keeps them
        now (the names whose served version changed). A process asked once, as it found the
        refusal: a read another process told after that (its database write waiting on a lock, or
        away), or one this process could not tell, left them on different versions until the next
        edit. Called at each look."""
        with self._reloading:
            if not self.needs_resync:
                return []
            fresh = dict(self._policies)
            self._share(fresh)
            changed = [name for name in self._refused if fresh.get(name) is not self._policies.get(name)]
            self._policies = fresh
            return changed

    @property
    def needs_resync(self) -> bool:
        return self.shared is not None and bool(self._refused or self._unshared or self._unlisted)

    def from_service(self, name: str) -> bool | None:
        """For a refused file: whether what serves in its place is the service's version that
        another process read (True), or what the file's removal left, which another process saw
        (False); None when it is this process's own."""
        return self._from_service.get(name)

    def _now_ns(self) -> int | None:
        """The service's clock; None when it cannot be read (on PostgreSQL, a process that never
        reached the database): what is read then is never told, as its time is no time of the
        service's (hosts' clocks differ), and the next load tells what it reads."""
        if self.shared is None:
            return None
        try:
            return self.shared.now_ns()
        except Exception:
            return None

    def _note_removals(self, listed: set[str], read_ns: int | None) -> None:
        """Files of the extra directory loaded before and no longer listed: their removal is a
        version too, so that a refused file of that name later does not bring an older one back."""
        for name, seen in builtins.list(self._seen.items()):
            if name not in listed:
                self._seen[name] = _seen_at(name, seen.source, None, read_ns)

    def _share(self, fresh: dict[str, Policy]) -> None:
        """Tell `shared` what this process read; serve each refused file as the newest good version
        of the service. Without it, an edit followed by a refused one before every process had read
        the first left processes on different versions until the file was mended: a process that
        missed an edit making a policy private went on routing its projects to the cloud."""
        assert self.shared is not None
        try:
            if news := [seen for seen in self._seen.values() if seen.new]:
                # First: what this process's loads read is kept unless another read a version later,
                # which is then the one to serve. What it read before is no news: never told again.
                self.shared.remember(news)
                self._seen = {name: replace(seen, new=False) for name, seen in self._seen.items()}
            recalled = self.shared.recall(None if self._unlisted else self._refused) \
                if self._refused or self._unlisted else {}
        except Exception as exc:  # the database away: this process's own last good versions serve
            if not self._unshared:
                log.warning("policies: the service's last good versions could not be shared (%s); this process's "
                            "own serve until it can (tried again at each look)", exc)
            self._unshared = True
            return
        self._unshared = False
        if self._unlisted:
            self._refused += [name for name in recalled if name not in self._refused]
        for name in self._refused:
            theirs, mine = recalled.get(name), self._seen.get(name)
            if theirs is None or (mine is not None and mine.content == theirs.content) \
                    or self._unloadable.get(name) == theirs.read_ns:
                continue
            if theirs.content is None:  # removed after the version this process read
                fresh.pop(name, None)
                if name in self._shipped:
                    fresh[name] = self._shipped[name]
            else:
                try:
                    fresh[name] = parse_policy(theirs.content, label=theirs.source, source=theirs.source,
                                               expect_name=name)
                except PolicyError as exc:  # read by another release of the service, whose schema differs
                    log.warning("policies: the service's last good version of '%s' does not load here (%s); this "
                                "process's own serves", name, exc.message)
                    self._unloadable[name] = theirs.read_ns  # not parsed, nor warned of, again at each look
                    continue
            self._seen[name] = theirs
            self._from_service[name] = theirs.content is not None

    def fingerprint(self) -> object:
        """The policy files (the shipped ones and the extra directory's) as their names and what
        their status tells of their content: one that differs from `loaded_fingerprint` was added,
        removed or rewritten since the last load (a service's other processes reload on this, as
        the one asked to did). Not the time and size alone: a file made readable (chmod), or a
        directory of files of fixed times swapped for another (a Nix or image generation), kept
        both, and a project made local-only by the new file went on sending to the cloud."""
        seen: builtins.list[object] = []
        if self.include_builtins:
            # Edited in a checkout (an editable install): each process reloads them too.
            shipped = Path(str(resources.files("policies")))
            seen.append(("shipped", [_status(path) for path in sorted(shipped.glob("*.toml"))]
                         if shipped.is_dir() else None))
        if self.extra_dir is None:
            return seen
        try:
            paths = _policy_paths(self.extra_dir)
        except PolicyError as exc:
            # Gone or unreadable (a remount, a permission): a state of its own, which a reload reports
            # (keeping the policies loaded), and whose end is a change again.
            return [*seen, ("not listed", exc.message)]
        return [*seen, *(_status(path) for path in paths)]

    def _files(self, errors: builtins.list[PolicyError]) -> tuple[_Files, bool]:
        """(policy name, loader) in precedence order: built-ins first, so the extra directory wins;
        and whether the extra directory (if any) could be listed (when not, the error is in `errors`)."""
        files: _Files = []
        if self.include_builtins:
            for entry in sorted(resources.files("policies").iterdir(), key=lambda e: e.name):
                if entry.name.endswith(".toml") and entry.is_file():
                    stem = entry.name.removesuffix(".toml")
                    files.append((stem, _builtin_loader(entry.read_bytes, entry.name, stem), False))
        if self.extra_dir is None:
            return files, True
        try:
            paths = _policy_paths(self.extra_dir)
        except PolicyError as exc:
            errors.append(exc)
            return files, False
        by_name: dict[str, builtins.list[Path]] = {}
        for path in paths:
            by_name.setdefault(path.stem, []).append(path)
        for name, same in by_name.items():
            # `studio.toml` beside `studio.TOML`: one silently won. Neither does; the last good stays.
            files.append((name, _file_loader(same[0]) if len(same) == 1 else _two_files(name, same), True))
        return files, True

    def as_it_reads_now(self, name: str) -> Policy | None:
        """Policy `name` as its file reads now, not kept (this process's loaded version stays):
        None when the file is refused, gone, or cannot be listed."""
        errors: builtins.list[PolicyError] = []
        files, listed = self._files(errors)
        found = [load for stem, load, _ in files if stem == name]  # in precedence order: the last wins
        if not found or not listed:
            return None
        try:
            return found[-1]()[0]
        except PolicyError:
            return None

    def get(self, name: str) -> Policy:
        try:
            return self._policies[name]
        except KeyError:
            # Echoed as any id a client sent: a key's secret given for the name is masked, and a
            # long name cut (`GET /v1/policies/{name}` repeated both whole).
            told = shown(name)
            raise NotFound(f"unknown policy '{told}'", details={"policy": told, "known": self.names()}) from None

    def __contains__(self, name: object) -> bool:
        return name in self._policies

    def names(self) -> builtins.list[str]:
        return sorted(self._policies)

    def list(self) -> builtins.list[Policy]:
        policies = self._policies
        return [policies[name] for name in sorted(policies)]

    def engine_warnings(self, known: Iterable[str], leaving: Iterable[str] = (),
                        stages: Mapping[str, Iterable[str]] | None = None) -> builtins.list[str]:
        """Warnings about loaded policies' rules that fail or skip every request they would route,
        given the registry's engine names (`known`), those of them that send data off the machine
        (`leaving`) and the stages each serves (`stages`, by name; an engine left out is not judged).
        Policies are validated without the registry, so `engines = ["Gemini"]` loads, and so does a
        private rule listing only cloud engines, a rule none of whose engines serves its stages, or
        one matching a requested engine it does not list; none is refused (an engine may be missing
        for a while, a plugin not installed yet), but each fails every request it routes. A rule
        after an earlier one that fits every request it fits never applies. The warnings say so
        once, at load."""
        known, leaving = set(known), set(leaving)
        served = {name: set(of) for name, of in (stages or {}).items()}
        warnings: builtins.list[str] = []
        for policy in self.list():
            label = f"policies/{policy.name}.toml" if policy.source == BUILTIN else policy.source
            labels = [rule_label(i, rule) for i, rule in enumerate(policy.rules, start=1)]
            shadowed = dict(policy.shadowed())
            where: dict[str, builtins.list[str]] = {}
            for i, rule in enumerate(policy.rules, start=1):
                named = labels[i - 1]
                if i in shadowed:
                    earlier = policy.rules[shadowed[i] - 1]
                    warnings.append(f"{label}: {named} never applies: {labels[shadowed[i] - 1]}, before it, "
                                    f"matches every request it matches{_what_goes_instead(rule, earlier)}")
                for key, names in (("engines", rule.engines), ("match.engine", rule.match.engine)):
                    for name in names or ():
                        if name not in known:
                            where.setdefault(name, []).append(f"{named} {key}")
                if rule.engines is None:
                    continue
                listed = [name for name in rule.engines if name in known]
                if listed and all(name in leaving for name in listed) and _always_private(rule):
                    warnings.append(f"{label}: {named} keeps what it routes on this machine, and every engine "
                                    f"it lists ({', '.join(listed)}) sends data off it: each request it matches is "
                                    "refused")
                # An unknown name is refused before any rule is matched ("unknown engine"), and told above.
                not_listed = [name for name in rule.match.engine or () if name in known and name not in rule.engines]
                if not_listed:
                    warnings.append(f"{label}: {named} matches requests for {', '.join(not_listed)}, which "
                                    f"its engines ({', '.join(rule.engines)}) do not list: each such request is "
                                    "refused (engine not allowed here)")
                # The engines a request it matches may go to: the one it asked for when the rule matches on it.
                tried = [name for name in rule.engines if rule.match.engine is None or name in rule.match.engine]
                wanted = rule.match.stages
                if not tried or not all(name in served for name in tried):
                    continue
                unserved = sorted(stage for stage in wanted if not any(stage in served[name] for name in tried))
                if len(unserved) == len(wanted):
                    warnings.append(f"{label}: {named} matches {', '.join(unserved)} requests, and none "
                                    f"of its engines ({', '.join(tried)}) serves "
                                    f"{'that stage' if len(wanted) == 1 else 'any of these stages'}: each request "
                                    "it matches is refused")
                elif unserved and rule.match.stage is not None:
                    # Only where its stages are listed: a rule matching any stage (a catch-all) is
                    # often reached by the stages its engines serve alone, earlier rules taking the rest.
                    warnings.append(f"{label}: {named} matches {', '.join(unserved)} requests too, and none "
                                    f"of its engines ({', '.join(tried)}) serves "
                                    f"{'that stage' if len(unserved) == 1 else 'these stages'}: each such request "
                                    "that reaches it is refused")
            for name, places in where.items():
                warnings.append(f"{label}: unknown engine '{name}'{_did_you_mean(name, known)} in "
                                f"{', '.join(places)}: no request is routed to it (known: {', '.join(sorted(known))})")
        return warnings


def _seen_at(name: str, source: str, content: bytes | None, read_ns: int | None) -> Seen:
    """What a load found, news to tell when the service's clock stamped it."""
    return Seen(name, source, content, time.time_ns() if read_ns is None else read_ns, new=read_ns is not None)


def _what_goes_instead(rule: Rule, earlier: Rule) -> str:
    """What the shadowing changes, when it is more than a rule's engines: a refusal or privacy lost."""
    if earlier.engines is None:
        return ""
    if rule.deny is not None:
        return "; what it would refuse is routed by that rule instead"
    if rule.private and not _always_private(earlier):
        return "; what it would keep on this machine goes to that rule's engines, which may send it off"
    return ""


def _status(path: Path) -> tuple[str, int | None, int | None, int | None, int | None]:
    """A file's name, and its modification time, size, inode and change time (a chmod, a chown,
    any write; a rename or a link's new target is another inode)."""
    try:
        stat = path.stat()
    except OSError:  # a dangling link, a file removed while listed: its name still counts
        return path.name, None, None, None, None
    return path.name, stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_ctime_ns


def _policy_paths(directory: Path) -> builtins.list[Path]:
    """The policy files of `directory`, sorted; `PolicyError` when it cannot be listed. (`Path.glob`
    finds nothing in a directory it may not open, which dropped its policies without a word.)"""
    label = str(directory)
    try:
        with os.scandir(directory) as entries:
            names = [entry.name for entry in entries]
    except (FileNotFoundError, NotADirectoryError):
        try:
            there = directory.exists()
        except OSError:
            there = False
        why = "is a file, not a directory of policy files" if there else "policy directory not found"
        raise PolicyError(f"{label}: {why}", file=label) from None
    except OSError as exc:
        raise PolicyError(f"{label}: cannot list the policy directory: {exc.strerror or exc}",
                          file=label) from None
    # A leading dot: editors' swap and backup files. The suffix in any case: `studio.TOML` was
    # skipped without a word.
    return [directory / name for name in sorted(names)
            if name.lower().endswith(".toml") and not name.startswith(".")]


def _always_private(rule: Rule) -> bool:
    """Whether every request the rule matches stays on the machine: it says `private`, or it
    matches only privacy values that keep a request local."""
    allowed = rule.match.tags.get(PRIVACY_TAG)
    return rule.private or (allowed is not None and all(is_private({PRIVACY_TAG: value}) for value in allowed))


def _builtin_loader(read: Callable[[], bytes], filename: str, stem: str) -> Callable[[], _Loaded]:
    return lambda: (parse_policy(read(), label=f"policies/{filename}", source=BUILTIN, expect_name=stem), None)


def _file_loader(path: Path) -> Callable[[], _Loaded]:
    return lambda: _read_policy_file(path)


def _two_files(name: str, paths: builtins.list[Path]) -> Callable[[], _Loaded]:
    def refuse() -> _Loaded:
        label = str(paths[0].parent)
        # Its file is the first of them: a reload says what serves in their place (`Services._what_stays`).
        raise PolicyError(f"{label}: policy '{name}' is in {len(paths)} files "
                          f"({', '.join(p.name for p in paths)}); keep one", file=str(paths[0]))
    return refuse


def _did_you_mean(name: str, known: set[str]) -> str:
    same_but_case = [k for k in known if k.lower() == name.lower()]
    found = same_but_case or difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
    return f" (did you mean '{found[0]}'?)" if found else ""


def _describe(raw: dict[str, Any], exc: ValidationError) -> str:
    """Pydantic's errors as "rule 2 ('bridge-cheap'): match.stage[0]: ..." joined by "; "."""
    parts: builtins.list[str] = []
    for error in exc.errors():
        loc = error["loc"]
        where: builtins.list[str] = []
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            where.append(_rule_label(raw, loc[1]))
            loc = loc[2:]
        if loc:
            where.append("".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                                 for i, p in enumerate(loc)))
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        message = message.removeprefix("Value error, ")
        value = error.get("input")
        if error["type"] not in ("missing", "extra_forbidden") and isinstance(value, str | int | float | bool):
            message += f" (got {value!r})"
        parts.append(": ".join([*where, message]))
    return "; ".join(parts)


def _rule_label(raw: dict[str, Any], index: int) -> str:
    rules = raw.get("rules")
    rule = rules[index] if isinstance(rules, builtins.list) and index < len(rules) else None
    name = rule.get("name") if isinstance(rule, dict) else None
    if not isinstance(name, str) or not name:
        return f"rule {index + 1}"
    # A name refused for its control characters is shown escaped, as its value is ("got").
    return f"rule {index + 1} ('{name}')" if name.isprintable() else f"rule {index + 1} ({name!r})"
