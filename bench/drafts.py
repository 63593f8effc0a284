"""Benchmark: what a draft job costs through the REST API, over the bare diffusers call it wraps.

This is a benchmark, not a test: it prints ONE JSON object to stdout (logs go to stderr).

What is compared
----------------
Both sides load the SAME model folder (by default the offline random-weight tiny SD pipeline,
written once with `tiers.tiny.save_tiny_pipeline(folder)`; the service gets
`Settings(lite_model=<that folder>)`), on the same device and dtype (`LocalRuntime`'s choice),
with the same torch intra-op thread count set on a dedicated inference thread.

* `direct`: in a worker process of its own (one OpenMP team per process, see `Direct`), whose
  initializer calls `torch.set_num_threads(T)` (exactly like `LocalRuntime._init_thread`), the call
  `tiers/lite.py` makes: the pipeline loaded
  with `AutoPipelineForText2Image.from_pretrained`, safety checker off, progress bar off, then
  `pipe(prompt, negative_prompt=None, num_inference_steps=S, guidance_scale=0, width=W, height=W,
  num_images_per_prompt=n, generator=[torch.Generator("cpu").manual_seed(seed + i) ...])` under
  `torch.inference_mode()`, chunked by `lite_max_batch` like the service. The time is measured in
  that process around generator creation + the pipeline call (PIL images out). No step callback,
  no PNG, no disk, no HTTP.
* `api`: the service started in this process with `orchestrator.server.serve_in_thread` (uvicorn,
  SQLite in a fresh temporary data dir), driven by a keep-alive `httpx.Client` from the main thread.
  One job = from just before `POST /v1/projects/{id}/drafts` until the body of
  `GET /v1/assets/{id}/content` of every asset has been read; completion is awaited by following
  `GET /v1/jobs/{id}/events` (SSE) to the terminal event, not by polling. Everything the service
  does is inside: validation, routing, job row, scheduler dispatch and claim, the inference-thread
  hop, per-step progress callbacks with previews, PNG encoding, the fsync'd artifact store, the
  finishing transaction, events, and the content reads.

Both sides are warmed up first (the service loads its model on its first job). Repeats are
interleaved (direct and api alternate order each repeat) so drift hits both equally. Every
repeat uses new seeds, so the content-addressed store never skips a write because it already
holds the file.

`overhead_ratio = median(api) / median(direct)`; the issue's target is <= 1.05 on the tiny model
at 64x64, 4 steps, n=4.

Batching: the same n-image API job as above (`batched`) versus n API jobs with n=1 run one after
the other (`sequential`, each timed the same way, seeds seed+i so they render the same
variations; their prompt differs by one word so the store cannot dedupe them against the batched
job's files). `batch_speedup = median(sequential) / median(batched)`.

`--profile` adds `breakdown_median_ms_per_job`: per-job medians (ms) of the service's internal phases, measured by
wrapping service functions in this process at run time (no file is changed).

Run: `.venv/bin/python bench/drafts.py [--size 64] [--steps 4] [--n 4] [--repeats 20] [--profile]`
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx

# The vendors' own variables, which the remote engines read too (orchestrator/settings.py).
JOB_DEADLINE = 600  # seconds; a draft job the benchmark makes ends far sooner
VENDOR_KEYS = ("GEMINI_API_KEY", "OPENAI_API_KEY", "STABILITY_API_KEY", "REPLICATE_API_TOKEN", "FAL_KEY")

TARGET = 1.05
TERMINAL = {"succeeded", "failed", "canceled"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- statistics ------------------------------------------------------------------------------------


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 5), "p90_s": round(p90(values), 5),
            "min_s": round(min(values), 5)}


# -- the direct baseline -----------------------------------------------------------------------------

# The direct side runs in its own process. torch's CPU build parallelises ops with GNU OpenMP, which
# gives every calling thread its own team of workers; with two teams in one process (the service's
# inference thread and a baseline thread) libgomp sees more threads than cores, stops spinning
# between parallel regions and every small op pays a futex wake-up. On 2 cores that made BOTH sides
# 2-3x slower on the tiny model, so neither figure meant anything.
_PIPE: Any = None


def _init_direct_worker(folder: str, device: str, dtype_name: str, threads: int) -> None:
    """What `LocalRuntime._init_thread` and `LocalRuntime._load` do, with the same settings."""
    import logging
    import warnings

    import torch
    from diffusers import AutoPipelineForText2Image
    from diffusers.utils import logging as dlogging

    global _PIPE
    torch.set_num_threads(threads)
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    dlogging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=getattr(torch, dtype_name))
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # The service's own warm-up step (LocalRuntime._warm_up), so both start from the same state.
    pipe(prompt="warm-up", num_inference_steps=1, guidance_scale=0.0, width=64, height=64, output_type="latent")
    _PIPE = pipe


def _direct_generate(prompt: str, size: int, steps: int, n: int, seed: int, max_batch: int) -> float:
    """The call `tiers/lite.py` makes, without its step callback; seconds, timed in the worker."""
    import torch

    start = time.perf_counter()
    images = []
    for first in range(0, n, max_batch):
        chunk = list(range(first, min(first + max_batch, n)))
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in chunk]
        with torch.inference_mode():
            out = _PIPE(prompt=prompt, negative_prompt=None, num_inference_steps=steps, guidance_scale=0.0,
                        width=size, height=size, num_images_per_prompt=len(chunk), generator=generators)
        images.extend(out.images)
    elapsed = time.perf_counter() - start
    assert len(images) == n
    return elapsed


class Direct:
    """The diffusers pipeline called directly, in a worker process of its own."""

    def __init__(self, folder: Path, device: str, dtype: Any, threads: int, max_batch: int) -> None:
        import multiprocessing

        self.max_batch = max_batch
        dtype_name = str(dtype).removeprefix("torch.")
        self._executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_direct_worker,
                                             initargs=(str(folder), device, dtype_name, threads))
        self._executor.submit(int).result()  # wait for the load and warm-up

    def run(self, prompt: str, size: int, steps: int, n: int, seed: int) -> float:
        seconds: float = self._executor.submit(_direct_generate, prompt, size, steps, n, seed,
                                               self.max_batch).result()
        return seconds

    def close(self) -> None:
        self._executor.shutdown(wait=True)


# -- the API client ----------------------------------------------------------------------------------


def follow_events(client: httpx.Client, job_id: str) -> list[str]:
    """Read the job's SSE stream until its terminal event; the asset ids, in order."""
    event = ""
    assets: list[str] = []
    deadline = time.monotonic() + JOB_DEADLINE
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if time.monotonic() > deadline:  # the stream's keep-alives would wait for ever
                raise RuntimeError(f"job {job_id} did not end within {JOB_DEADLINE} s")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "asset":
                    assets.append(data["asset_id"])
                elif event in TERMINAL:
                    if event != "succeeded":
                        raise RuntimeError(f"job {job_id} ended {event}: {data}")
                    return list(data.get("assets") or assets)
    raise RuntimeError(f"the event stream of job {job_id} ended without a terminal event")


def api_job(client: httpx.Client, project_id: str, body: dict[str, Any], *, profile: bool = False) -> dict[str, float]:
    """One draft job end to end; seconds per client-side phase and in total. With `profile` (and
    `--profile`), the service's phases of this job are recorded."""
    if profile and PROFILER.enabled:
        PROFILER.reset()
    start = time.perf_counter()
    response = client.post(f"/v1/projects/{project_id}/drafts", json=body)
    response.raise_for_status()
    job_id = response.json()["id"]
    posted = time.perf_counter()
    assets = follow_events(client, job_id)
    finished = time.perf_counter()
    for asset_id in assets:
        content = client.get(f"/v1/assets/{asset_id}/content")
        content.raise_for_status()
        if not content.content.startswith(PNG_MAGIC):
            raise RuntimeError(f"asset {asset_id} is not a PNG")
    end = time.perf_counter()
    if len(assets) != body["n"]:
        raise RuntimeError(f"job {job_id} made {len(assets)} assets, expected {body['n']}")
    if profile and PROFILER.enabled:
        PROFILER.client_marks(job_id, start, posted, finished, end)
    return {"total": end - start, "post": posted - start, "events": finished - posted, "content": end - finished}


def draft_body(prompt: str, size: int, steps: int, n: int, seed: int) -> dict[str, Any]:
    return {"prompt": prompt, "n": n, "seed": seed, "width": size, "height": size, "steps": steps,
            "guidance_scale": 0.0, "engine": "lite", "cache": False}


# -- optional profile: the service's phases, timed by wrapping its functions ---------------------------


class Profiler:
    """Per-job timestamps and summed durations of service functions (enabled by `--profile`)."""

    def __init__(self) -> None:
        self.enabled = False
        self.marks: dict[str, dict[str, float]] = defaultdict(dict)
        self.durations: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.jobs: list[dict[str, float]] = []

    def reset(self) -> None:
        self.marks.clear()
        self.durations.clear()
        self.calls.clear()

    def add(self, name: str, seconds: float) -> None:
        self.durations[name] += seconds
        self.calls[name] += 1

    def timed(self, owner: Any, attr: str, name: str, job: Callable[..., str | None] | None = None) -> None:
        """Wrap `owner.attr` (sync or async) to sum its time under `name` and, when `job` gives
        the job id from the call's arguments, mark its start and end on that job's timeline."""
        import inspect

        original = getattr(owner, attr, None)
        if original is None:  # the service changed: nothing to wrap
            return
        profiler = self

        if inspect.iscoroutinefunction(original):
            @functools.wraps(original)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                job_id = job(*args) if job else None
                start = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    end = time.perf_counter()
                    profiler.add(name, end - start)
                    if job_id:
                        profiler.marks[job_id][name + ":start"] = start
                        profiler.marks[job_id][name + ":end"] = end

            setattr(owner, attr, async_wrapper)
            return

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            job_id = job(*args) if job else None
            start = time.perf_counter()
            result = original(*args, **kwargs)
            end = time.perf_counter()
            profiler.add(name, end - start)
            if name == "JobService.submit":
                job_id = result[0].id
            if job_id:
                profiler.marks[job_id][name + ":start"] = start
                profiler.marks[job_id][name + ":end"] = end
            return result

        setattr(owner, attr, wrapper)

    def install(self) -> None:
        from diffusers import StableDiffusionPipeline

        import orchestrator.runner as runner
        from orchestrator.jobs import JobService
        from orchestrator.queue import Scheduler
        from orchestrator.store import ArtifactStore
        from tiers._local import LocalRuntime
        from tiers.lite import LiteEngine

        self.enabled = True
        self.timed(JobService, "prepare_draft", "JobService.prepare_draft")
        self.timed(JobService, "submit", "JobService.submit")
        self.timed(Scheduler, "_queued", "Scheduler._queued")
        self.timed(Scheduler, "_claim", "Scheduler._claim", job=lambda _self, job: job.id)
        self.timed(runner.JobRunner, "run", "JobRunner.run", job=lambda _self, claim: claim.job.id)
        self.timed(LiteEngine, "_generate", "LiteEngine._generate",
                   job=lambda _self, _req, progress, _cancel: progress.claim.job.id)
        self.timed(LocalRuntime, "preview", "LocalRuntime.preview (latents_to_preview)")
        self.timed(runner.JobProgress, "step", "JobProgress.step")
        self.timed(runner.JobRunner, "write_progress", "JobRunner.write_progress")
        self.timed(runner.JobRunner, "_succeed", "JobRunner._succeed", job=lambda _self, claim, *_rest: claim.job.id)
        self.timed(runner, "encode_png", "store.encode_png")
        self.timed(ArtifactStore, "put", "ArtifactStore.put (fsync)")
        self.timed(ArtifactStore, "get", "ArtifactStore.get")
        self.timed(os, "fsync", "os.fsync")
        with contextlib.suppress(ImportError):
            from orchestrator.ledger import Ledger

            self.timed(Ledger, "capture", "Ledger.capture")

        original_call = StableDiffusionPipeline.__call__

        @functools.wraps(original_call)
        def pipe_call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original_call(*args, **kwargs)
            finally:
                self.add("StableDiffusionPipeline.__call__ [service]", time.perf_counter() - start)

        StableDiffusionPipeline.__call__ = pipe_call  # type: ignore[method-assign]

    def client_marks(self, job_id: str, start: float, posted: float, finished: float, end: float) -> None:
        m = self.marks[job_id]
        m.update({"client:start": start, "client:posted": posted, "client:terminal": finished, "client:end": end})
        ms = {name: 1000 * seconds for name, seconds in self.durations.items()}
        ms.update({f"calls {name}": float(count) for name, count in self.calls.items()})

        def span(a: str, b: str) -> float | None:
            return 1000 * (m[b] - m[a]) if a in m and b in m else None

        timeline = {
            "0 client start -> JobService.submit start (HTTP in, validation, prepare_draft)":
                span("client:start", "JobService.submit:start"),
            "1 POST round trip (client)": span("client:start", "client:posted"),
            "1a   of which JobService.submit": span("JobService.submit:start", "JobService.submit:end"),
            "1b   of which submit end -> client has the 202": span("JobService.submit:end", "client:posted"),
            "2 submit end -> claim start (dispatch wake + queued query)": span("JobService.submit:end",
                                                                                "Scheduler._claim:start"),
            "2a   client has the 202 -> claim start": span("client:posted", "Scheduler._claim:start"),
            "3 Scheduler._claim": span("Scheduler._claim:start", "Scheduler._claim:end"),
            "4 claim end -> LiteEngine._generate start (task + inference-thread hop)":
                span("Scheduler._claim:end", "LiteEngine._generate:start"),
            "5 LiteEngine._generate": span("LiteEngine._generate:start", "LiteEngine._generate:end"),
            "6 _generate end -> _succeed start (loop hop + to_thread)": span("LiteEngine._generate:end",
                                                                             "JobRunner._succeed:start"),
            "7 JobRunner._succeed (PNG + store + transaction)": span("JobRunner._succeed:start",
                                                                     "JobRunner._succeed:end"),
            "8 _succeed end -> client reads terminal event": span("JobRunner._succeed:end", "client:terminal"),
            "9 GET /content of every asset (client)": span("client:terminal", "client:end"),
        }
        ms.update({k: v for k, v in timeline.items() if v is not None})
        self.jobs.append(ms)

    def report(self) -> dict[str, float]:
        keys = sorted({k for job in self.jobs for k in job})
        return {k: round(statistics.median(job.get(k, 0.0) for job in self.jobs), 3) for k in keys}


PROFILER = Profiler()


# -- the benchmark -----------------------------------------------------------------------------------


def default_model_folder() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "orchestrator"
    return cache / "bench-tiny-sd"


def without_the_users_settings(config_file: Path) -> list[str]:
    """Drop the `ORCH_*` variables and the vendors' keys from this process's environment (a
    service process started from it inherits it), and read `config_file` (empty) rather than an
    `orchestrator.toml`: the benchmark measures its own temporary install. With the user's, its
    service process ran on the user's database (and bound it to the benchmark's data dir, which
    the user's own service then refused), `run_jobs = false` left it waiting for ever, and a
    preview VAE added work on the API's side only. Returns the names dropped."""
    from orchestrator.settings import CONFIG_FILE_VARIABLE, Settings

    dropped = sorted(name for name in os.environ if name.startswith("ORCH_") or name in VENDOR_KEYS)
    for name in dropped:
        del os.environ[name]
    config_file.write_text("")
    os.environ[CONFIG_FILE_VARIABLE] = str(config_file)
    Settings.model_config["toml_file"] = str(config_file)  # read once, as the class was made
    return dropped + (["./orchestrator.toml"] if Path("orchestrator.toml").is_file() else [])


@contextlib.contextmanager
def service(settings: Any, *, separate_process: bool = False) -> Iterator[httpx.Client]:
    """The service in this process (a thread), or as `orchestrator serve` in its own process: the
    way it is deployed, where the benchmark's own client does not compete for this process's GIL."""
    from orchestrator.server import free_port, serve_in_thread

    if not separate_process:
        with serve_in_thread(settings) as base_url, httpx.Client(base_url=base_url, timeout=120.0) as client:
            yield client
        return
    port = free_port()
    env = {**os.environ, "ORCH_DATA_DIR": str(settings.data_dir), "ORCH_LITE_MODEL": settings.lite_model,
           "ORCH_LITE_DEVICE": settings.lite_device, "ORCH_TORCH_THREADS": str(settings.torch_threads),
           "ORCH_LITE_MAX_BATCH": str(settings.lite_max_batch), "ORCH_LOCAL_MAX_SIZE": str(settings.local_max_size)}
    log_file = settings.data_dir.parent / "service.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port),
                                 "--log-level", "warning"], env=env, stderr=log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120.0) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.get("/healthz").raise_for_status()
                    break
                except httpx.HTTPError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        said = log_file.read_text(errors="replace").strip()[-2000:]
                        raise RuntimeError(f"the orchestrator service did not start: {said or 'it said nothing'}"
                                           ) from None
                    time.sleep(0.1)
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch

    from orchestrator.settings import Settings
    from tiers._local import LocalRuntime, _usable_cpus
    from tiers.tiny import save_tiny_pipeline

    if args.model:
        folder = Path(args.model).expanduser().resolve()
        model_label = str(folder)
    else:
        folder = save_tiny_pipeline(default_model_folder())
        model_label = f"tiny-sd (random weights) at {folder}"
    threads = args.threads or _usable_cpus()  # as the service's ORCH_TORCH_THREADS=0 takes them
    max_batch = min(16, max(4, args.n))
    size, steps, n = args.size, args.steps, args.n

    if args.profile:
        PROFILER.install()

    with tempfile.TemporaryDirectory(prefix="bench-drafts-", dir=args.data_dir) as temporary:
        if dropped := without_the_users_settings(Path(temporary) / "empty.toml"):
            print(f"bench: not read, the benchmark runs its own install: {', '.join(dropped)}")
        data_dir = Path(temporary) / "data"
        settings = Settings(data_dir=data_dir, database_url=None, admin_key=None, lite_model=str(folder),
                            lite_device=args.device, torch_threads=threads, lite_max_batch=max_batch,
                            local_max_size=max(2048, size))
        probe = LocalRuntime(settings)
        device, dtype = probe.device, probe.dtype()
        probe.shutdown()

        direct = Direct(folder, device, dtype, threads, max_batch)
        api: list[dict[str, float]] = []
        direct_s: list[float] = []
        sequential_s: list[float] = []
        try:
            with service(settings, separate_process=args.server_process) as client:
                project = client.post("/v1/projects", json={"name": "bench drafts"})
                project.raise_for_status()
                project_id = project.json()["id"]

                # Warm-up: the service loads the model on its first job; both sides run each shape twice.
                for w in range(2):
                    seed = 10_000_000 + 100 * w
                    direct.run("warm up batch", size, steps, n, seed)
                    direct.run("warm up seqnt", size, steps, 1, seed)
                    api_job(client, project_id, draft_body("warm up batch", size, steps, n, seed))
                    api_job(client, project_id, draft_body("warm up seqnt", size, steps, 1, seed))

                for r in range(args.repeats):
                    seed = 1000 * (r + 1)
                    body = draft_body("a bench draft batch", size, steps, n, seed)
                    if r % 2 == 0:
                        direct_s.append(direct.run(body["prompt"], size, steps, n, seed))
                        api.append(api_job(client, project_id, body, profile=True))
                    else:
                        api.append(api_job(client, project_id, body, profile=True))
                        direct_s.append(direct.run(body["prompt"], size, steps, n, seed))
                    start = time.perf_counter()
                    for i in range(n):
                        api_job(client, project_id, draft_body("a bench draft seqnt", size, steps, 1, seed + i))
                    sequential_s.append(time.perf_counter() - start)
        finally:
            direct.close()

    api_total = [job["total"] for job in api]
    api_stats, direct_stats = summary(api_total), summary(direct_s)
    ratio = api_stats["median_s"] / direct_stats["median_s"]
    batched_stats, sequential_stats = summary(api_total), summary(sequential_s)
    result: dict[str, Any] = {
        "config": {
            "size": size, "steps": steps, "n": n, "repeats": args.repeats, "torch_threads": threads,
            "lite_max_batch": max_batch, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "model": model_label, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "profile": args.profile,
            "server": "separate process" if args.server_process else "thread in this process",
        },
        "overhead": {
            "api": api_stats,
            "direct": direct_stats,
            "api_phases_median_ms": {k: round(1000 * statistics.median(job[k] for job in api), 3)
                                     for k in ("post", "events", "content")},
            "overhead_median_ms": round(1000 * (api_stats["median_s"] - direct_stats["median_s"]), 3),
            "overhead_ratio": round(ratio, 4),
            "target": TARGET,
            "meets_target": ratio <= TARGET,
        },
        "batching": {
            "n": n,
            "batched": batched_stats,
            "sequential": sequential_stats,
            "batch_speedup": round(sequential_stats["median_s"] / batched_stats["median_s"], 4),
        },
    }
    if args.profile:
        result["breakdown_median_ms_per_job"] = PROFILER.report()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=64, help="width and height (multiple of 8, >= 64)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="images per draft job")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads; 0 = the CPUs this process may use, as the service counts them")
    parser.add_argument("--model", default=None, help="diffusers model folder; default: the tiny model, built once")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--data-dir", default=None, help="parent of the service's temporary data dir")
    parser.add_argument("--profile", action="store_true", help="add the service's per-phase breakdown")
    parser.add_argument("--server-process", action="store_true",
                        help="run the service as `orchestrator serve` in its own process (no --profile)")
    args = parser.parse_args(argv)
    if args.size % 8 or args.size < 64:
        parser.error("--size must be a multiple of 8, at least 64")
    if args.repeats < 1 or args.n < 1 or args.steps < 1 or args.n > 16:
        parser.error("--repeats, --n and --steps must be >= 1, and --n <= 16")
    if args.profile and args.server_process:
        # Its timers wrap the service's functions in this process: the other process's run untimed.
        parser.error("--profile times a service in this process: leave out --server-process")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON object only
        result = run(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
