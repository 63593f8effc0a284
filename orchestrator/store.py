"""The artifact store: PNG files named by their sha256 under `<data_dir>/assets/ab/<sha>.png`.

A file is written to a temporary name in the same folder, flushed to disk and renamed into place,
so a reader never sees half an image; the asset row is inserted only after the rename, in the
same transaction that finishes the job. Identical images share one file.

A job that ends without its rows (canceled while its images were being stored) leaves files no
asset names; `ArtifactStore.sweep_orphans` removes them once they are old enough that no finishing
transaction can still be about to name them.

Each PNG carries a `parameters` text chunk in AUTOMATIC1111's infotext format (so other tools
read the prompt and seed) and an `orchestrator` chunk with the whole generation record as JSON.
The record holds only what made the image, never job ids or times, so the same request with the
same seed gives byte-identical files.

Step previews of running jobs live beside them, one file per job under `<data_dir>/previews/`
(`PreviewFiles`), so that any process on the data dir can serve the preview of a job another
process runs.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

from PIL import Image, ImageCms, PngImagePlugin

from orchestrator.db import stored_json
from orchestrator.errors import ContentUnavailable, NotFound, first_line
from orchestrator.ids import ID_RE
from orchestrator.workers import open_regular_file
from tiers._images import eight_bit
from tiers.base import PREVIEW_MAX_SIDE, home_expanded
from tiers.registry import HOSTED

log = logging.getLogger(__name__)

SHA_RE = re.compile(r"[0-9a-f]{64}")
RECORD_CHUNK = "orchestrator"
# zlib level 4, as ComfyUI saves: on a 512x512 image with natural structure it encodes in 36 ms
# where the default level 6 takes 124 ms, for a file of about the same size (295 vs 303 KiB).
PNG_COMPRESS_LEVEL = 4
# The largest colour profile an image is stored with (display profiles take 0.5 to 4 KB; a
# printer's or a camera's with lookup tables up to megabytes), so that a job's storage bound
# (`orchestrator.quota.image_bound`) holds: Pillow writes an image's own profile into its PNG, and a
# provider's 60 KB one passed the bound of a 64x64 image. A larger one is applied to the pixels
# (to sRGB, so the image looks as it did) and not kept.
MAX_ICC_BYTES = 16 * 2**10
RECENT_BYTES = 32 * 2**20
READ_CHUNK = 256 * 2**10  # bytes read at a time of a file too large to hold whole (`get_or_open`)
# How long a just-made asset's bytes are served from memory without asking the database: an asset
# deleted through another process is served from here no longer than this.
RECENT_SECONDS = 30.0
# How long a file hashed whole, whose stat has not changed since, is taken as intact without being
# read again (`ArtifactStore.intact`). A submit of an identical paid request looks for the result
# to copy before its transaction and again under the write lock: each look read and hashed every
# image (16 polished ones, about 130 ms here) while every writer of the service waited.
VERIFIED_SECONDS = 60.0
VERIFIED_MAX = 4096  # files remembered; past it, the oldest half is forgotten


def _umask() -> int:
    """The process's umask, read once (setting it to read it is not safe among threads)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The mode of the files the store writes: as any file this process creates (mkstemp's 0600 left
# a backup job or another user of the group unable to read them; a fixed 0644 let every account
# of a shared machine read every project's images, whatever umask the operator set).
FILE_MODE = 0o666 & ~_umask()
RECENT_REMOVED = 10_000
# A temp preview file younger than this may be another process's write in progress.
PREVIEW_TEMP_SECONDS = 60.0
# How much older than the running attempt's start a preview file may look and still be its own:
# a file's time comes from the kernel's coarse clock (a few ms behind), or from another host on a
# shared filesystem. Recovery removes a crashed attempt's file before the job can run again.
PREVIEW_CLOCK_SLACK = 1.0
# An asset file no row names yet, younger than this, may be a finishing job's (its transaction
# retries for two minutes at most): the orphan sweep leaves it.
ORPHAN_GRACE_SECONDS = 3600.0
ORPHAN_BATCH = 500
# Orphans are the files of jobs canceled while storing them (removed at once, `discard`) and of
# processes that died in between: rare. More than this many, and more
# than this share of the store, say the database is the wrong one (see `sweep_orphans`).
ORPHAN_ALARM_FILES = 20
ORPHAN_ALARM_SHARE = 0.05


# Files no row names, as the guard asks of them: (sha256, the file's generation record or None,
# its modification time) -> the sha256s a crash of a job of this database explains
# (`orchestrator.retention.made_by_jobs`).
CrashedJobs = Callable[[list[tuple[str, dict[str, Any] | None, float]]], Collection[str]]


# How often a put looks for its file and writes one (`ArtifactStore.put_file`).
PUT_TRIES = 4
# What `os.link` raises where a filesystem has no hard links (vfat, some FUSE and SMB mounts).
NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK})


class SweepRefused(Exception):
    """The orphan sweep found too many files no row names to trust the database it asked."""


def file_record(path: Path) -> dict[str, Any] | None:
    """The generation record (`RECORD_CHUNK`) of a store file, read from its head (the chunk
    precedes the pixels); None where it has none, or is no image this store wrote."""
    try:
        with open_regular(path, follow=False) as f, Image.open(f) as image:
            text = image.info.get(RECORD_CHUNK)
        loaded = json.loads(text) if isinstance(text, str) else None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # anything put in the store
        return None
    return loaded if isinstance(loaded, dict) else None


def unexplained_orphans(orphans: list[Path], files: int, crashed: CrashedJobs | None) -> int:
    """How many of `orphans` (files no row names, of the store's `files`) no crash explains, as the
    foreign-database guard counts them: not a `.gc-` file (only this store's sweep or a job's
    discard sets one aside, once this database's rows named none of it), nor a file written while
    a job of this database that it names none of was making it (`crashed`). Counted by batches,
    and only until they pass the alarm (`ORPHAN_ALARM_FILES` and `ORPHAN_ALARM_SHARE`): a foreign
    store of 200,000 files is not read whole to say so."""
    home = [path for path in orphans if not path.name.startswith(".gc-")]
    if crashed is None:
        return len(home)
    alarm = max(ORPHAN_ALARM_FILES, files * ORPHAN_ALARM_SHARE)
    dated: list[tuple[float, str, Path]] = []
    for path in home:
        sha = stored_sha(path)
        try:
            written = path.stat().st_mtime
        except OSError:  # gone meanwhile: nothing to weigh
            continue
        if sha is not None:
            dated.append((written, sha, path))
    # Oldest first, so that each batch spans a short while and `crashed` asks for the few jobs
    # that lived then, not for every job of the database.
    dated.sort()
    left = 0
    for start in range(0, len(dated), ORPHAN_BATCH):
        found = [(sha, file_record(path), written) for written, sha, path in dated[start:start + ORPHAN_BATCH]]
        made = set(crashed(found))
        left += sum(1 for sha, _, _ in found if sha not in made)
        if left > alarm:
            break
    return left


def _hashes_to(path: Path, sha: str) -> bool:
    with open_regular(path) as f:
        return hashlib.sha256(f.read()).hexdigest() == sha


def stored_sha(path: Path) -> str | None:
    """The sha256 of a store file (`<sha>.png`, or `.gc-<sha>-<tag>.png` set aside by a sweep)
    in its own shard folder; None for any other file."""
    name = path.name
    sha = name[4:68] if name.startswith(".gc-") else name.removesuffix(".png")
    if not SHA_RE.fullmatch(sha) or path.parent.name != sha[:2]:
        return None
    if name.startswith(".gc-") and not re.fullmatch(r"\.gc-[0-9a-f]{64}-[0-9a-f]+\.png", name):
        return None
    return sha


def _quoted(value: Any) -> str:
    """A value as AUTOMATIC1111 writes it: JSON-quoted when it holds a separator its readers split on."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


# An absolute or home-relative path in a sentence: up to a quote, a space or the end of a clause.
_PATH = re.compile(r"(?<![\w.:/])(?:~|/)[^\s'\",;:]*")
# A quoted value ('...'), which may be a path with spaces in it, or a relative one, or a quote of
# its own (`/srv/o'brien-client/`): it ends at a quote that no letter follows.
_QUOTED = re.compile(r"(?<!\w)'([^\n]+?)'(?!\w)")


def hide_paths(text: str, engine: str | None = None) -> str:
    """`text` with the server's file paths cut to their last part (a model, a workflow file): what
    clients read names files as `model_name` does; the operator's log keeps the whole path.
    Messages quote the paths they name ('/srv/studio x/flow.json'): unquoted, a path ends at a
    space."""
    text = _QUOTED.sub(lambda found: f"'{model_name(found.group(1), engine)}'", text)
    return _PATH.sub(lambda found: Path(found.group()).name, text)


@functools.lru_cache(maxsize=256)
def _is_path(model: str, hosted: bool = False) -> bool:
    """Whether `model` names a file or folder rather than a Hub id (`org/name`): absolute, `~`- or
    `.`-relative, more than two parts (`models/acme-client/hifi`), or there, relative to the
    working directory, as the loaders would take it. A hosted provider's model (`hosted`) is an id
    of its own, of any number of parts (`fal-ai/nano-banana-2/edit`), unless it is absolute or relative."""
    if home_expanded(model).is_absolute() or model.startswith(("~", ".")) or "\\" in model:
        return True
    if hosted:
        return False
    if model.count("/") > 1:
        return True
    try:
        return Path(model).exists()
    except (OSError, ValueError):  # a name too long for a file, a NUL
        return False


def model_name(model: str | None, engine: str | None = None) -> str | None:
    """The model as images name it: a local folder or file by its own name, never the server's
    path to it (a Hub id such as `stabilityai/sd-turbo` is kept whole, and so is a hosted
    provider's id of three parts: fal's `fal-ai/nano-banana-2/edit` was shown as `edit`)."""
    if not model or not _is_path(model, engine in HOSTED):
        return model
    path = home_expanded(model.replace("\\", "/"))
    for part in reversed(path.parts):
        # A Hugging Face cache folder (`models--org--name/snapshots/<hash>`) is its Hub id.
        if part.startswith("models--") and part.count("--") == 2:
            return part.removeprefix("models--").replace("--", "/")
    return path.name


# diffusers' scheduler classes by the names AUTOMATIC1111 gives its samplers: its readers (and
# "send to txt2img") know those, not a class name. The JSON record keeps the class.
A1111_SAMPLERS = {
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
    "LMSDiscreteScheduler": "LMS", "HeunDiscreteScheduler": "Heun", "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSDEScheduler": "DPM++ SDE", "DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC", "LCMScheduler": "LCM", "DEISMultistepScheduler": "DEIS",
}


def _one_line(text: object) -> str:
    """A prompt on one line: readers of the format take a prompt's line that starts `Negative
    prompt:` as the negative prompt, so `cat\nNegative prompt: dog` would read as another request.
    The text encoder reads a line break as a space; the JSON record keeps the prompt as sent."""
    return " ".join(str(text).splitlines())


def a1111_sampler(sampler: object, settings: object) -> tuple[object, str | None]:
    """The sampler and the schedule type as AUTOMATIC1111 names them, for a diffusers scheduler's
    class and its `sampler_settings` (see `tiers._local.sampler_used`)."""
    if not isinstance(sampler, str):
        return sampler, None
    given = settings if isinstance(settings, dict) else {}
    name = A1111_SAMPLERS.get(sampler, sampler)
    if sampler == "DPMSolverMultistepScheduler" and str(given.get("algorithm_type", "")).startswith("sde-"):
        name = "DPM++ 3M SDE" if given.get("solver_order") == 3 else "DPM++ 2M SDE"
    schedule = next((told for key, told in (("use_karras_sigmas", "Karras"), ("use_exponential_sigmas", "Exponential"),
                                            ("use_beta_sigmas", "Beta")) if given.get(key) is True), None)
    return name, schedule


def infotext(record: dict[str, Any]) -> str:
    """AUTOMATIC1111's `parameters` format: prompt, negative prompt, then `Key: value` pairs."""
    sampler, schedule = a1111_sampler(record.get("sampler"), record.get("sampler_settings"))
    prompt = _one_line(record.get("prompt", ""))
    if prompt.strip().startswith("Negative prompt:"):
        # Readers strip a line before they look at its start, so a space would not do: a zero-width
        # one keeps the prompt a prompt (it read back as an empty one, and this as the negative).
        prompt = "\u200b" + prompt
    lines = [prompt]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {_one_line(record['negative_prompt'])}")
    pairs = [
        ("Steps", record.get("steps")),
        ("Sampler", sampler),
        ("Schedule type", schedule),
        ("CFG scale", record.get("guidance_scale")),
        ("Seed", record.get("seed")),
        ("Size", f"{record.get('width')}x{record.get('height')}"),
        ("Model", record.get("model")),
        ("Denoising strength", record.get("strength", record.get("creativity"))),
        ("Engine", record.get("engine")),
        ("Stage", record.get("stage")),
    ]
    lines.append(", ".join(f"{k}: {_quoted(v)}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def _profile_within_cap(image: Image.Image) -> Image.Image:
    """`image` (RGB or RGBA) with a colour profile of `MAX_ICC_BYTES` at most, or none: a larger
    one applied to its pixels, converting them to sRGB, and dropped (one lcms cannot read is
    dropped as it is: no reader could apply it either)."""
    icc = image.info.get("icc_profile")
    if not icc or len(icc) <= MAX_ICC_BYTES:
        return image
    try:
        converted = ImageCms.profileToProfile(image, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                              ImageCms.createProfile("sRGB"), outputMode=image.mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        log.warning("an image's colour profile of %d bytes is unreadable: stored without it", len(icc))
        converted = None
    kept = image.copy() if converted is None else converted
    kept.info.pop("icc_profile", None)
    return kept


def encode_png(image: Image.Image, record: dict[str, Any]) -> bytes:
    # The file travels (a client, a pipeline, a website): it names the model, not where it lives.
    # Its values as the database keeps them (`stored_json`): a plugin's numpy guidance failed the
    # job's store after its images were made (and billed), and a NaN made a chunk no strict JSON
    # reader takes, saying otherwise than the API's record.
    record = json.loads(stored_json({**record, "model": model_name(record.get("model"), record.get("engine"))}))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(record))
    info.add_itxt(RECORD_CHUNK, json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False))
    buf = io.BytesIO()
    image = eight_bit(image)
    rgb = _profile_within_cap(image if image.mode in ("RGB", "RGBA") else image.convert("RGB"))
    rgb.save(buf, format="PNG", pnginfo=info, optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def read_record(data: bytes) -> dict[str, Any]:
    with Image.open(io.BytesIO(data)) as img:
        text = img.info.get(RECORD_CHUNK)
    return dict(json.loads(text)) if text else {}


class RecentContent:
    """The newest assets' bytes by asset id, in memory, least recently used out first.

    Clients read a job's images right after its terminal event, and an asset never changes once
    its row is committed, so those reads need neither the database nor the disk. Only committed
    assets are added, and each is kept `RECENT_SECONDS` (it may be deleted). Thread-safe.
    """

    def __init__(self, max_bytes: int = RECENT_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[str, bytes, float]] = OrderedDict()
        self._removed: OrderedDict[str, None] = OrderedDict()  # deleted assets, the latest RECENT_REMOVED
        self._forgets = 0  # bulk deletes so far (`forget`): see `mark`
        self._size = 0
        self._lock = threading.Lock()

    def mark(self) -> int:
        """Taken before a read of an asset's row that may end in `add(..., since=mark)`: a bulk
        delete (`forget`) in between refuses that add, as it does not mark the assets it does not
        hold. A draft retention deleted while its content was read from the store was put in
        memory as that read ended, and served for `RECENT_SECONDS` while its metadata answered 410."""
        with self._lock:
            return self._forgets

    def add(self, asset_id: str, sha256: str, data: bytes, *, since: int | None = None) -> None:
        """Keep a committed asset's bytes; `since`: the `mark` taken before its row was read."""
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if asset_id in self._removed or (since is not None and since != self._forgets):
                return
            old = self._items.pop(asset_id, None)
            if old is not None:
                self._size -= len(old[1])
            now = time.monotonic()
            self._items[asset_id] = (sha256, data, now)
            self._size += len(data)
            # Out of date at the front (never to be served again: see `get`), then by size. Without
            # the first, what nobody read again stayed until the cache was full: 32 MiB for good.
            while self._items:
                _, (_, first, added) = next(iter(self._items.items()))
                if self._size <= self.max_bytes and now - added <= RECENT_SECONDS:
                    break
                self._items.popitem(last=False)
                self._size -= len(first)

    def get(self, asset_id: str) -> tuple[str, bytes] | None:
        with self._lock:
            found = self._items.get(asset_id)
            if found is None:
                return None
            sha256, data, added = found
            if time.monotonic() - added > RECENT_SECONDS:
                # Another process may have deleted it since: read again through the database.
                del self._items[asset_id]
                self._size -= len(data)
                return None
            self._items.move_to_end(asset_id)
            return sha256, data

    def remove(self, asset_id: str) -> None:
        """The asset was deleted: out, and never added again (a read that found its row before
        the delete would put it back as it ends)."""
        with self._lock:
            found = self._items.pop(asset_id, None)
            if found is not None:
                self._size -= len(found[1])
            self._removed[asset_id] = None
            while len(self._removed) > RECENT_REMOVED:
                self._removed.popitem(last=False)

    def forget(self, asset_ids: Collection[str]) -> None:
        """Assets deleted in bulk (draft retention): those held are taken out and never added
        again, as `remove` does. Only those: marking each of a sweep's 100,000 drafts would push out
        the marks of DELETEs made meanwhile, and one not held was not read in the last moments."""
        with self._lock:
            self._forgets += 1  # the reads under way of those not held keep none of them (`mark`)
            held = [asset_id for asset_id in asset_ids if asset_id in self._items]
        for asset_id in held:
            self.remove(asset_id)

    @property
    def size(self) -> int:
        return self._size


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is written or replaced: its device, inode, size and modification time."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


def _regular_size(path: Path) -> int | None:
    """The size of the regular file at `path` (through a link, as `get` reads it); None for what
    `get` cannot read as an image (a folder, a FIFO: a restore gone wrong), whose size is not the
    image's: measured so, an asset kept it for good once its file was mended."""
    found = os.stat(path)
    return found.st_size if stat.S_ISREG(found.st_mode) else None


def _fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename, a new name) durable. Best effort where a folder cannot
    be opened for it (some network filesystems): the file's own fsync still holds its bytes."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Put:
    """What `ArtifactStore.put_file` did: the bytes' sha256, and `made`, the inode and modification
    time of the file it wrote where none was (None when it found the bytes there, or rewrote a
    damaged or unreadable copy, which rows may name)."""

    sha256: str
    made: tuple[int, int] | None


class ArtifactStore:
    def __init__(self, root: Path, recent_bytes: int = RECENT_BYTES) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.recent = RecentContent(recent_bytes)
        # sha256 -> (the file's stat when it was last found whole, when): see `intact`.
        self._verified: dict[str, tuple[tuple[int, int, int, int], float]] = {}
        self._verified_lock = threading.Lock()

    def path_for(self, sha256: str) -> Path:
        if not SHA_RE.fullmatch(sha256):  # the whole string: with match(), "$" lets a final newline in
            raise NotFound("no such asset content")
        # 64 hex digits cannot name a path out of the root. Not resolved: a shard folder linked to
        # another disk (the store spread over several) resolved out of it, and every image in it
        # was refused as "no such asset content", every new one failing its job.
        return self.root / sha256[:2] / f"{sha256}.png"

    def make_shards(self) -> int:
        """Make the shard folders (`path_for`'s `ab/`) that are missing, with one fsync of the root
        for them all; how many were made. Called as a service starts: made as their first images
        came, a new store's puts each paid a second folder fsync (the root's, for the new name)
        until all 256 were there. Best effort: where one cannot be made (a read-only store, a name
        taken), its first put makes it or fails, as it did before."""
        made = 0
        for shard in range(256):
            try:
                (self.root / f"{shard:02x}").mkdir()
            except FileExistsError:  # made, or a link an operator put there (another disk)
                continue
            except OSError as exc:
                log.warning("the asset store's shard folders cannot be made ahead (%s): each is made with "
                            "its first image", exc.strerror or exc)
                break
            made += 1
        if made:
            _fsync_dir(self.root)
        return made

    def put(self, data: bytes) -> str:
        """Store bytes atomically; return their sha256. The same bytes twice make one file, whose
        modification time the second `put` renews."""
        return self.put_file(data).sha256

    def put_file(self, data: bytes) -> Put:
        """`put`, saying whether this call made the file (see `Put.made`)."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.path_for(sha)
        for _ in range(PUT_TRIES - 1):
            put = self._put_once(sha, path, data)
            if put is not None:
                return put
        # Another put's file landed after each look, and was gone again at the next (a sweep):
        # written over, as a found file that could not be read is, taken for no file of its own.
        self.write_atomic(path, data)
        return Put(sha, None)

    def _put_once(self, sha: str, path: Path, data: bytes) -> Put | None:
        """`put_file`'s one look and write; None when another put's file landed between them."""
        try:
            # Compared whole, not by size: a flipped bit keeps the size. Only a repeated image
            # (a seed made again) pays this read, never of a FIFO in its place (it held the job).
            with open_regular(path) as f:
                seen = os.fstat(f.fileno()).st_mtime_ns
                same = f.read() == data
        except FileNotFoundError:
            made = self.write_new(path, data)
            return None if made is None else Put(sha, made)
        except OSError as exc:
            # Cannot be read (a restore with the wrong owner or mode, a bad sector, a folder in
            # its place): the bytes in hand replace it, so the new row and the earlier ones that
            # name it are served again. Where none can be written, the file stays as it was.
            log.warning("asset file %s cannot be read (%s): written again", path.name, exc.strerror or exc)
            self._replace_or_keep(path, data)
            return Put(sha, None)
        if not same:
            # A damaged copy (cut short by a crash of the disk, rotted, or edited by hand): the new
            # row must not name it, and the earlier rows that do get their bytes back.
            log.warning("asset file %s does not hold its image's bytes (damaged): written again", path.name)
            self.write_atomic(path, data)
            return Put(sha, None)
        try:
            # Fresh again, as a new file would be: an old orphan with these bytes (a canceled job's,
            # now made again) is about to be named by a row, and the orphan sweep must see that.
            # Later than it was in any case: a job that made the file and is discarding it (see
            # `discard`) must see it touched, whatever the clock's grain.
            os.utime(path)  # "now": what a writer that does not own the file may still set
            if path.stat().st_mtime_ns <= seen:  # within the clock's grain of the last write
                os.utime(path, ns=(time.time_ns(), seen + 1))
                if path.stat().st_mtime_ns <= seen:
                    # A filesystem keeping whole seconds (ext4's small inodes, vfat, some NFS):
                    # written anew, as another inode, which no discard takes for the file it made.
                    self.write_atomic(path, data)
            return Put(sha, None)
        except FileNotFoundError:
            pass
        except OSError:
            # There, but not ours to touch (another user's 0644 file): a fresh copy replaces it,
            # for the same reason. Where none can be written (a read-only mount), the file serves.
            self._replace_or_keep(path, data)
            return Put(sha, None)
        made = self.write_new(path, data)
        return None if made is None else Put(sha, made)

    def _replace_or_keep(self, path: Path, data: bytes) -> None:
        """`data` written over `path`; where nothing can be written, the file there is kept."""
        if path.is_dir() and not path.is_symlink():
            # No rename replaces a folder: each job that made this image again failed "the images
            # were made but could not be stored". Moved aside under a dot-name, which no sweep
            # reads as an image, for the operator to look at; nothing in it is removed.
            aside = path.with_name(f".broken-{path.name}-{secrets.token_hex(4)}")
            log.warning("asset file %s is a folder: moved aside to %s", path, aside.name)
            with contextlib.suppress(FileNotFoundError):  # another put of these bytes moved it
                path.rename(aside)
        try:
            self.write_atomic(path, data)
        except OSError:
            if not path.is_file():
                raise

    @staticmethod
    def write_new(path: Path, data: bytes) -> tuple[int, int] | None:
        """`write_atomic` where no file is: None, leaving the file there, where one is. Two puts
        of the same bytes that both found none both wrote, the later rename replacing the
        earlier's file: that put's `made` then named the file another put's row was about to name,
        and its job's `discard` removed it. Linked into place, only the put that made the name
        takes the file for its own; the other finds it there (as `put_file`'s look would have).
        A filesystem without hard links has the file renamed into place, as before."""
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(path.parent.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                written = os.fstat(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                # Another put's link, likely before its folder's fsync: made durable here, as the
                # file found is what this put's row will name (a rename over it fsynced it too).
                _fsync_dir(path.parent)
                return None
            except OSError as exc:
                if exc.errno not in NO_HARD_LINKS:
                    raise
                os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return written.st_ino, written.st_mtime_ns

    @staticmethod
    def write_atomic(path: Path, data: bytes) -> tuple[int, int]:
        """Write `path` whole or not at all, durably (temp file, fsync, rename, folder fsync),
        with the mode the process's umask gives (`FILE_MODE`); the file's inode and modification
        time as written."""
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(path.parent.parent)  # the new shard's name, as durable as what it will hold
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
        try:
            os.fchmod(fd, FILE_MODE)  # mkstemp makes it 0600
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                written = os.fstat(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The rename itself, before the row naming the file commits: after a power loss the
        # file's bytes alone (fsynced above) could sit under the temporary name.
        _fsync_dir(path.parent)
        return written.st_ino, written.st_mtime_ns

    def get(self, sha256: str) -> bytes:
        """The file's bytes, checked against their name: a damaged file is never served (nor kept
        in memory, nor sent to an engine) as the image it was."""
        found = self.get_or_open(sha256, up_to=None)
        assert isinstance(found, bytes)  # nothing is too large to read with no bound
        return found

    def get_or_open(self, sha256: str, *, up_to: int | None) -> bytes | BinaryIO:
        """`get`'s bytes when the file holds at most `up_to` (None: any size), else the file itself,
        open to read at its start: checked against its name all the same, read through once in
        `READ_CHUNK`s, so that a large image is never held whole in memory (each slow reader of an
        image held its whole copy for as long as it took to read it). The caller closes the file."""
        if not SHA_RE.fullmatch(sha256):  # a row mended by hand: the asset is there, its file is not named
            raise ContentUnavailable(
                "the asset's row holds a malformed sha256, which names no file: the operator must mend the row "
                "(`orchestrator check` lists every malformed one)",
                details={"sha256": sha256[:80], "reason": "malformed"})
        path = self.path_for(sha256)
        try:
            try:
                found = self._read_home(path, sha256, up_to)
            except FileNotFoundError:
                # Renamed aside by a sweep that stopped mid-way (or is judging it now): served from
                # there, as the next sweep puts it back.
                # Not aside either: it may have been put back home since the first look (a sweep or
                # `discard` found it named, a dead sweep's leftover settled), so home is read once
                # more (read in neither place, a live asset's reader was told, with a 500, to restore
                # a file that was there).
                aside = self._set_aside_copy(path)
                found = aside if aside is not None else self._read_home(path, sha256, up_to)
        except FileNotFoundError:
            raise ContentUnavailable(
                f"the image file {sha256[:12]} is missing from the store: restore it from a backup "
                "(`orchestrator check` lists every missing file)", details={"sha256": sha256, "reason": "missing"},
            ) from None
        except OSError as exc:
            # Not a bug of ours (an internal_error), but the store's: its owner or mode after a
            # restore, a disk's read error. `check` lists it as unreadable.
            log.error("asset file %s cannot be read: %s", path, exc)
            raise ContentUnavailable(
                f"the image file {sha256[:12]} cannot be read from the store ({exc.strerror or type(exc).__name__}): "
                "the operator must mend its file (`orchestrator check` lists every unreadable file)",
                details={"sha256": sha256, "reason": "unreadable"},
            ) from None
        if not isinstance(found, bytes):
            return found  # hashed as it was opened
        if hashlib.sha256(found).hexdigest() != sha256:
            raise self._damaged(path, sha256)
        return found

    def _read_home(self, path: Path, sha256: str, up_to: int | None) -> bytes | BinaryIO:
        """`get_or_open`'s read of the file at its home: its bytes (not checked yet), or the file
        open at its start once its bytes are checked, where it holds more than `up_to`."""
        # Its bytes are checked against its name, so a link may lead to them (a store moved by
        # links); a FIFO put in its place would hold the request for ever.
        f = open_regular(path)
        try:
            if up_to is None or os.fstat(f.fileno()).st_size <= up_to:
                with f:
                    return f.read()
            digest = hashlib.sha256()
            while chunk := f.read(READ_CHUNK):
                digest.update(chunk)
            if digest.hexdigest() != sha256:
                raise self._damaged(path, sha256)
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f

    @staticmethod
    def _damaged(path: Path, sha256: str) -> ContentUnavailable:
        log.error("asset file %s is damaged: its bytes do not hash to its name", path)
        return ContentUnavailable(
            f"the image file {sha256[:12]} is damaged in the store (its bytes do not match its sha256): "
            "restore it from a backup (`orchestrator check` lists every damaged file)",
            details={"sha256": sha256, "reason": "damaged"})

    def intact(self, sha256: str) -> bool:
        """Whether the file is there whole, as `get` finds it. One found so in the last
        `VERIFIED_SECONDS` whose stat (device, inode, size, modification time) has not changed
        since is not read again; any write or replacement of it changes that stat."""
        stamp = _stamp(self.path_for(sha256)) if SHA_RE.fullmatch(sha256) else None
        now = time.monotonic()
        with self._verified_lock:
            seen = self._verified.get(sha256)
        if stamp is not None and seen is not None and seen[0] == stamp and now - seen[1] < VERIFIED_SECONDS:
            return True
        try:
            self.get(sha256)
        except ContentUnavailable:
            with self._verified_lock:
                self._verified.pop(sha256, None)
            return False
        if stamp is not None:  # taken before the read: a file changed meanwhile is read again next time
            with self._verified_lock:
                self._verified[sha256] = (stamp, now)
                if len(self._verified) > VERIFIED_MAX:
                    for key in sorted(self._verified, key=lambda k: self._verified[k][1])[:VERIFIED_MAX // 2]:
                        del self._verified[key]
        return True

    def size_of(self, sha256: str) -> int | None:
        """The size of the file of these bytes, as `get` would find it: at home, else its copy set
        aside by a sweep (read, as `get` picks the sound one); None where there is none, or it
        cannot be read. `sha256` must be one (`path_for`)."""
        home = self.path_for(sha256)
        try:
            return _regular_size(home)
        except FileNotFoundError:
            pass
        except OSError:
            return None
        if (aside := self._set_aside_copy(home)) is not None:
            return len(aside)
        try:  # put back home since the first look (see `get_or_open`)
            return _regular_size(home)
        except OSError:
            return None

    @staticmethod
    def _set_aside_copy(home: Path) -> bytes | None:
        """The bytes of a file renamed aside from `home` (`.gc-<sha>-*.png`), if one can be read:
        one whose bytes hash to its name before any other (a damaged copy beside a sound one)."""
        found: bytes | None = None
        # The folder listed, not globbed: a glob compiled a pattern of its own for each sha (0.3 to
        # 0.8 ms), which each asset sweep paid again for every asset whose file is missing (left
        # unmeasured until its restore: `quota.measure`), 5 to 10 times what measuring a file costs.
        prefix = f".gc-{home.stem}-"
        try:
            with os.scandir(home.parent) as entries:
                names = [entry.name for entry in entries
                         if entry.name.startswith(prefix) and entry.name.endswith(".png")]
        except OSError:  # no such folder (every file of it lost), or one that cannot be listed
            return None
        for aside in (home.parent / name for name in names):
            try:
                with open_regular(aside) as f:
                    data = f.read()
            except OSError:  # settled meanwhile (back home, or removed): the next one, if any
                continue
            if hashlib.sha256(data).hexdigest() == home.stem:
                return data
            found = found if found is not None else data
        return found

    def discard(self, put: Put, named: Callable[[str], bool]) -> bool:
        """Remove the file `put` made (there was none before) for a job that then ended without a
        row naming it (canceled while its images were stored); True when removed. Left to the
        sweep, a few canceled n=16 jobs made more orphans than the sweep takes for a store of its
        own database, and it refused to remove any ("is it the database this data dir belongs to?").

        Renamed aside first, as the sweep does, then judged where no `put` can reach it: kept
        (renamed back) when it is not the file that put wrote (another put of the same bytes
        replaced it, or touched it, which makes its modification time later) or a row names it (a
        file made again for an older asset). A `put` after the rename writes a file of its own."""
        if put.made is None:
            return False
        home = self.path_for(put.sha256)
        aside = home.with_name(f".gc-{put.sha256}-{secrets.token_hex(4)}.png")
        try:
            os.rename(home, aside)
        except OSError:  # gone already (a sweep's), or a folder it may not change: the sweep's then
            return False
        try:
            found = aside.stat()
            if (found.st_ino, found.st_mtime_ns) == put.made and not named(put.sha256):
                aside.unlink()
                return True
        except FileNotFoundError:  # a sweep in another process put it back meanwhile
            return False
        except Exception as exc:  # the database away: kept, as the next sweep settles `.gc-` files
            log.warning("asset file %s of a canceled job is kept: %s", home.name, first_line(exc))
        try:
            os.replace(aside, home)
        except FileNotFoundError:
            pass  # put back by a sweep
        except OSError as exc:
            log.warning("asset file %s: cannot put it back from %s: %s", home.name, aside.name, exc)
        return False

    def sweep_orphans(self, referenced: Callable[[list[str]], Collection[str]],
                      older_than: float = ORPHAN_GRACE_SECONDS, *,
                      deleted: Callable[[list[str]], Collection[str]] | None = None,
                      emptied: bool = False, stop: threading.Event | None = None,
                      crashed: CrashedJobs | None = None) -> int:
        """Remove asset files that no asset row names and that were last written (or `put`) more
        than `older_than` seconds ago; returns how many. `referenced` gets a batch of sha256s and
        answers those some live row names; `deleted`, those only deleted assets' rows name (files
        the database knows it let go of: however many, they are no sign of a foreign database).

        A file is renamed aside (a name of this sweep's own) before its age is looked at again: a
        `put` of the same bytes either refreshed it before (it is renamed back) or finds no file
        and writes its own, so a row committed after the question never names a removed file. A
        sweep that died between the rename and the end leaves a `.gc-` file, settled by the next.

        Raises `SweepRefused`, removing nothing, when the rows name none of the files, or many
        of the old ones are orphans: a database that is not this store's (a new one, another
        install's) would otherwise make every file an orphan. `emptied`: the database has asset
        rows and every one is deleted, so it names no file, and a few orphans (a crash's) are no
        sign of another database (its swept files were the ones it named). Orphans a crash
        explains are no sign of one either, and are not counted (`unexplained_orphans`: `.gc-`
        files, and with `crashed`, the images of this database's jobs killed as they stored them):
        counted, 21 of them in a store of 400 files stopped every sweep, and `check` called the
        database foreign, until they were moved out by hand.

        Once `stop` is set (the service stopping), it ends before the next file or batch, each
        file it set aside settled: the rest are the next sweep's. Set before the listing is done,
        it removes nothing, as the alarm above needs the whole store's count."""
        stop = stop or threading.Event()
        cutoff = time.time() - older_than
        candidates: dict[str, list[Path]] = {}
        young: list[str] = []  # a few of the files too new to sweep, to tell a young install
        total = 0
        for path in self.root.glob("*/*.png"):
            # A stop waited out the whole walk: 5 to 6 s for 200,000 files, against 0.5 to 0.9 s once checked here.
            if stop.is_set():
                return 0
            sha = stored_sha(path)
            try:
                if sha is None or not stat.S_ISREG(path.lstat().st_mode):
                    continue  # not the store's: a temp file, what an operator put there
                total += 1
                if path.name.startswith(".gc-") or path.stat().st_mtime < cutoff:
                    candidates.setdefault(sha, []).append(path)
                elif len(young) < ORPHAN_BATCH:
                    young.append(sha)
            except OSError:  # gone since the listing, or unreadable: not this sweep's
                continue
        orphans: list[Path] = []
        let_go: list[Path] = []  # named by deleted assets only
        leftovers: list[Path] = []
        named_any = False
        shas = list(candidates)
        for start in range(0, len(shas), ORPHAN_BATCH):
            if stop.is_set():
                return 0
            batch = shas[start:start + ORPHAN_BATCH]
            named = set(referenced(batch))
            gone = set(deleted(batch)) - named if deleted is not None else set()
            named_any = named_any or bool(named) or bool(gone)
            for sha in batch:
                for path in candidates[sha]:
                    if sha in named:
                        if path.name.startswith(".gc-"):
                            leftovers.append(path)
                    else:
                        (let_go if sha in gone else orphans).append(path)
        if orphans and not named_any and young:
            # An install younger than the grace: its rows name its new files, not its old orphans
            # (an error was logged, and nothing removed, on a healthy install).
            named_any = bool(referenced(young))
        def alarmed(left: int) -> bool:
            return bool(left) and ((not named_any and not emptied) or (left > ORPHAN_ALARM_FILES
                                                                       and left > total * ORPHAN_ALARM_SHARE))

        left = sum(1 for path in orphans if not path.name.startswith(".gc-"))
        if alarmed(left):  # only then: it reads each orphan's head and asks the database about it
            left = unexplained_orphans(orphans, total, crashed)
        if alarmed(left):
            raise SweepRefused(f"{left} of the {total} files in {self.root} are named by no asset in this "
                               "database, nor images of its jobs: is it the database this data dir belongs to? "
                               "Nothing was removed. If it is, they are images of jobs killed as they stored "
                               "them: `orchestrator check` lists them, to move out of the store once you are sure")
        # Put back even once stopped: a few files, which are otherwise served from aside until the next sweep.
        for path in leftovers:
            self._set_aside(path, keep=True, cutoff=cutoff)
        removed = 0
        for path in [*let_go, *orphans]:
            if stop.is_set():
                break
            removed += self._set_aside(path, keep=False, cutoff=cutoff)
        return removed

    def _set_aside(self, path: Path, *, keep: bool, cutoff: float) -> int:
        """Settle one candidate; returns 1 when it was removed."""
        sha = stored_sha(path)
        assert sha is not None
        home = path.with_name(f"{sha}.png")
        try:
            if path == home:
                aside = home.with_name(f".gc-{sha}-{secrets.token_hex(4)}.png")
                os.rename(home, aside)
            else:
                aside = path
            if keep or aside.stat().st_mtime >= cutoff:
                # Named after all, or refreshed by a `put` since the listing. A file a `put` wrote
                # at home meanwhile has the same bytes: replacing it changes nothing. A dead sweep's
                # copy that is damaged does not replace one there (a sound copy beside it, a put).
                if keep and path != home and home.exists() and not _hashes_to(aside, sha):
                    log.warning("asset sweep: %s is damaged and %s is there: the damaged copy is removed", aside, home)
                    aside.unlink()
                    return 0
                os.replace(aside, home)
                return 0
            aside.unlink()
        except FileNotFoundError:  # another sweep settled it
            return 0
        except OSError as exc:  # a folder it may not change: the rest of the store is still swept
            log.warning("asset sweep: cannot settle %s: %s", path, exc)
            return 0
        return 1

    def sweep_temp(self, older_than: float = 3600.0) -> int:
        """Remove temp files left by a crash between write and rename. Only old ones: a fresh
        one may be another process's write in progress. Only files, and each one's failure its
        own: a folder so named (or a file the service may not remove) raised out of the sweep,
        which stopped the service's start, and each hourly asset sweep before its orphans."""
        removed = 0
        cutoff = time.time() - older_than
        for tmp in self.root.glob("*/.tmp-*"):
            try:
                found = tmp.lstat()
                if stat.S_ISREG(found.st_mode) and found.st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:  # read-only, another user's: the rest are still swept
                log.warning("asset sweep: cannot remove the temp file %s: %s", tmp, exc.strerror or exc)
        return removed


def preview_sized(image: Image.Image) -> Image.Image:
    """`image` at most `PREVIEW_MAX_SIDE` a side, its aspect kept (each side at least a pixel): an
    engine's preview as large as its image (a plugin's, a ComfyUI server's) was encoded, served and
    written at its full size, where a TAESD's are decoded at most this size."""
    longest = max(image.size)
    if longest <= PREVIEW_MAX_SIDE:
        return image
    fits = PREVIEW_MAX_SIDE / longest
    size = (max(1, round(image.width * fits)), max(1, round(image.height * fits)))
    # reducing_gap: a whole-pixel reduce first, then the filter: a fraction of a plain resize's time.
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def encode_preview(image: Image.Image) -> bytes:
    """A step preview as PNG, at most `PREVIEW_MAX_SIDE` a side: no metadata, the store's fast
    compression (it is shown, then gone)."""
    buf = io.BytesIO()
    preview_sized(image).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


class Preview:
    """A running job's latest step preview, encoded to PNG once, when first asked for: clients
    polling `GET /v1/jobs/{id}/preview` (and the write of its file) share one encode per step, where
    each GET encoded it again (a 512 px preview costs tens of ms of a worker thread). Asked from
    the API's threads and the write behind the engine at once: the second waits for the first's.

    Shrunk (`preview_sized`) as it is made, when the engine publishes it: kept whole until its first
    encode, a plugin's 8192x8192 preview held 192 MiB per running job until the next step replaced
    it, where 512x512 holds 768 KiB."""

    def __init__(self, image: Image.Image) -> None:
        if 0 in image.size:
            raise ValueError(f"an empty preview ({image.width}x{image.height}) is no preview: see `Preview.of`")
        self.image = preview_sized(image)
        self._png: bytes | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, image: Image.Image) -> Preview | None:
        """The preview of `image`, or None for an empty one (0xN, Nx0): a plugin's, which failed
        every read of the job's preview (PNG holds no empty image) while its `progress` event named
        it. Dropped, the step is told without a preview."""
        return None if 0 in image.size else cls(image)

    def png(self) -> bytes:
        with self._lock:
            if self._png is None:
                self._png = encode_preview(self.image)
            return self._png


def open_regular(path: Path, *, follow: bool = True) -> BinaryIO:
    """`path` opened to read if it is a regular file (`OSError` otherwise, without blocking on a
    FIFO); with `follow=False`, not through a symbolic link either."""
    return cast(BinaryIO, open_regular_file(path, os.O_RDONLY, "rb", follow=follow))


class PreviewFiles:
    """The latest step preview of each running job as `<root>/<job_id>.png` (root: the data dir's
    `previews` folder), written by the process that runs the job and read by any process.

    A preview is replaced within a second and worthless after a crash, so a write is atomic
    (temp file and rename: a reader never sees half an image) but never flushed to disk.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path_for(self, job_id: str) -> Path | None:
        """The job's file, or None for a string that is not a job id (it never names a path)."""
        if not ID_RE.fullmatch(job_id) or not job_id.startswith("job_"):
            return None
        path = self.root / f"{job_id}.png"
        return path if path.parent == self.root else None

    def write(self, job_id: str, preview: Preview) -> None:
        path = self.path_for(job_id)
        if path is None:
            return
        data = preview.png()
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".png")
        try:
            os.fchmod(fd, FILE_MODE)  # served by API processes that may run as another user of the group
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self, job_id: str, since: datetime | None = None) -> bytes | None:
        """The job's preview, unless it was written before `since` (the running attempt's start:
        an older file is a crashed attempt's, not yet swept)."""
        path = self.path_for(job_id)
        if path is None:
            return None
        try:
            # Never through a link, nor anything but a file: the folder may be shared with other users
            # of the data dir's group, and a link put there served the file it named to any key of
            # the job's project (the server's own /proc/<pid>/environ: its keys), a FIFO held the request.
            with open_regular(path, follow=False) as f:
                if since is not None and os.fstat(f.fileno()).st_mtime < since.timestamp() - PREVIEW_CLOCK_SLACK:
                    return None
                return f.read()
        except (FileNotFoundError, NotADirectoryError):  # the job ended between its row's read and this
            return None
        except OSError as exc:
            log.warning("the preview file %s is not read: %s", path, exc.strerror or exc)
            return None

    def exists(self, job_id: str, since: datetime | None = None) -> bool:
        path = self.path_for(job_id)
        if path is None:
            return False
        try:
            found = path.lstat()  # as `read` opens it: a link is not the job's preview
        except (FileNotFoundError, NotADirectoryError):
            return False
        return stat.S_ISREG(found.st_mode) and (since is None
                                                or found.st_mtime >= since.timestamp() - PREVIEW_CLOCK_SLACK)

    def remove(self, job_id: str) -> None:
        path = self.path_for(job_id)
        if path is not None:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                path.unlink()

    def sweep(self, running: Callable[[list[str]], Collection[str]]) -> int:
        """Remove the files of jobs that do not run (their process crashed or was killed) and old
        temp files; returns how many. `running` gets the job ids that have a file and answers
        those that run. It is asked after the listing: a job claimed meanwhile keeps its file, or
        loses it for the second until its next write."""
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return 0
        cutoff = time.time() - PREVIEW_TEMP_SECONDS
        removed = 0
        files: dict[str, Path] = {}
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                # No write makes a folder: none is a preview or its temp file. Tried, it was warned
                # of at each sweep (every 15 s) for good, as no unlink removes it.
                continue
            if entry.name.startswith(".tmp-"):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        removed += self._removed(path)
            elif path.suffix == ".png" and self.path_for(path.stem) == path:
                files[path.stem] = path
        if not files:
            return removed
        keep = running(list(files))
        for job_id, path in files.items():
            if job_id not in keep:
                removed += self._removed(path)
        return removed

    @staticmethod
    def _removed(path: Path) -> int:
        """1 once `path` is removed; 0 where it is gone already or cannot be (a read-only disk,
        another user's file), said in the log: raised, it stopped the sweep, and the scheduler's
        start. A folder so named is passed over before (`sweep`)."""
        try:
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("the step preview file %s cannot be removed: %s", path, exc.strerror or exc)
            return 0
        return 1
