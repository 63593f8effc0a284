"""A self-hosted ComfyUI server, driven by the user's API-format workflow template.

The template (`ORCH_COMFYUI_WORKFLOW`) is a graph exported with "Export (API)" whose string inputs
may hold placeholders: `{{prompt}}`, `{{negative_prompt}}`, `{{seed}}`, `{{strength}}` (denoise),
`{{image}}` (the uploaded draft), `{{width}}`, `{{height}}`, `{{steps}}`, `{{guidance_scale}}` (a
sampler's `cfg`). A value that is exactly a placeholder becomes the typed value (ComfyUI rejects
`"42"` where it wants `42`); one inside a longer string is replaced as text. The graph is walked
as parsed JSON, so prompt text never needs escaping.

Flow: upload the draft, queue the graph under a prompt id we choose (so a crash can find the work
again before the server answers, and a restarted job can keep what it made), poll `/history/{id}`
until it appears, then download the images its output nodes wrote (`SaveImage` and the like; when
nodes are titled `orchestrator output`, only theirs), in the template's node order. Self-hosted, so it costs
no credits; `leaves_machine` is still True: `ORCH_COMFYUI_URL` may point at any host, and the
prompt and pixels go there.

Step progress: while a render runs, the engine also listens on the server's websocket
(`/ws?clientId=`, under the same URL) and reports its sampler's `progress` frames for the prompt
being followed, with the preview images the server sends after them. That is best effort only: the
history stays the word on completion, outputs and errors, and a server or proxy that refuses the
websocket, or drops it, leaves the job polling as it would without it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import re
import secrets
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

import httpx
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from orchestrator.errors import BadEngineInput, Canceled, EngineError, EngineTimeout, EngineUnavailable
from tiers._http import (
    GATEWAY_STATUSES,
    KeptOut,
    RemoteClient,
    SelfHostedEngine,
    answer_json,
    basic_auth_in,
    error_text,
    json_object,
    path_id,
    without_credentials,
)
from tiers._images import decode_image, encode_image
from tiers.base import (
    CancelToken,
    Capabilities,
    EngineContext,
    Progress,
    RenderedImage,
    RenderRequest,
    RenderResult,
    says_out_of_memory,
    still_holds_the_job,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
PLACEHOLDERS = frozenset(
    {"prompt", "negative_prompt", "seed", "strength", "image", "width", "height", "steps", "guidance_scale"}
)
# Bridge and polish are image-to-image: a template without these would silently ignore the request.
REQUIRED_PLACEHOLDERS = ("prompt", "image")
# How far a workflow without size placeholders may miss the size asked, per side: a fixed
# upscaler's factor of the source against the size `scale` asked, rounded to a multiple of 8.
SIZE_SLACK, SIZE_SLACK_PIXELS = 0.02, 8
# Far deeper than any API export (node, inputs, a [node, output] link: four levels).
MAX_WORKFLOW_DEPTH = 64
# ComfyUI's own KSampler defaults, used when the request leaves steps or guidance to the engine.
DEFAULT_STEPS = 20
DEFAULT_CFG = 8.0
SEED_RANGE = 2**32
URL_SETTING = "ORCH_COMFYUI_URL"
WORKFLOW_SETTING = "ORCH_COMFYUI_WORKFLOW"
# ComfyUI's validation errors that say the server cannot run the workflow at all, whatever the
# request: a node class it does not have (a custom node not installed), a value not among those it
# offers (a checkpoint or LoRA file it lacks), a workflow with no output node. Others (a size past a
# node's maximum) are the request's.
SETUP_ERRORS = frozenset({"missing_node_type", "invalid_prompt", "value_not_in_list", "prompt_no_outputs"})
# Cleanup after a cancel must not hold the job up for a full read timeout.
CLEANUP_TIMEOUT = 5.0
# A uuid's hex digits: a prompt id at least this long is named nowhere else in a `/queue` answer.
UUID_HEX = 32
# Empty history answers between looks at the queue for a prompt a restarted server has forgotten.
QUEUE_CHECK_POLLS = 5
# A node given this title in ComfyUI (its `_meta.title` in the API export) makes the results: a
# workflow that also saves intermediates (a first pass, a mask) says which images are the job's.
OUTPUT_TITLE = "orchestrator output"
# The websocket's limits. A frame past WS_MAX_FRAME ends the connection (the job goes on polling):
# ComfyUI's largest are previews of a few hundred KB, and without a cap a broken or hostile server
# could make the engine hold gigabytes; at most WS_MAX_QUEUE frames wait to be read.
WS_MAX_FRAME = 8 * 2**20
WS_MAX_QUEUE = 4
# The closing handshake when a render ends: a stalled server must not hold the job's end up.
WS_CLOSE_TIMEOUT = 1.0
# A binary frame is a 4-byte event type, then for a preview a 4-byte image format and the image.
PREVIEW_IMAGE = 1
PREVIEW_FORMATS = {1: "JPEG", 2: "PNG"}
# ComfyUI's previews are at most --preview-size (512 by default) on a side; they are decoded on
# the event loop, so anything much larger is not.
PREVIEW_MAX_BYTES = 2 * 2**20
PREVIEW_MAX_PIXELS = 1024 * 1024
# The most steps an image counts for (ComfyUI's own limit on a sampler's): a larger `max` in a
# frame is scaled down to it rather than stored as the job's step count.
MAX_UNIT = 10_000


def _queued_behind_a_gateway(response: httpx.Response) -> bool:
    """A proxy's gateway timeout (`GATEWAY_STATUSES`) to the POST of a prompt: not sent again (see `_execute`)."""
    return (response.status_code in GATEWAY_STATUSES and response.request.method == "POST"
            and response.request.url.path.endswith("/prompt"))


class WorkflowError(Exception):
    """The template file cannot be used; the message names the file and what is wrong. By its
    name only: the message reaches `/v1/engines` and job errors, which project keys read, and the
    operator knows where ORCH_COMFYUI_WORKFLOW points (a quote or a relative path in it slipped
    past `store.hide_paths`)."""


def _depth(node: Any) -> int:
    """How deeply lists and objects nest in `node`, counted without recursion (a hostile file must
    not exhaust the stack here either)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item)
    return deepest


def load_workflow(path: Path) -> dict[str, Any]:
    try:
        # utf-8-sig: Notepad's "UTF-8" writes a byte-order mark, which json.loads refuses.
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        why = exc.strerror or type(exc).__name__  # str(exc) names the whole path
        raise WorkflowError(f"cannot read the workflow file '{path.name}': {why}") from None
    except UnicodeDecodeError as exc:
        # PowerShell's `>` writes UTF-16; an old editor, a legacy code page.
        raise WorkflowError(
            f"the workflow file '{path.name}' is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    try:
        graph = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(
            f"the workflow file '{path.name}' is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    except RecursionError:
        too_deep = True
    else:
        # Placeholders are found and filled by recursion; an API export nests a handful of levels.
        too_deep = _depth(graph) > MAX_WORKFLOW_DEPTH
    if too_deep:
        raise WorkflowError(
            f"the workflow file '{path.name}' nests deeper than {MAX_WORKFLOW_DEPTH} levels; "
            "export it with 'Export (API)'"
        )
    if isinstance(graph, dict) and isinstance(graph.get("nodes"), list):
        # The most common mistake: "Save" writes the UI format, which /prompt cannot run.
        raise WorkflowError(
            f"the workflow file '{path.name}' is in ComfyUI's UI format; export it with 'Export (API)'"
        )
    if not isinstance(graph, dict) or not graph:
        raise WorkflowError(f"the workflow file '{path.name}' must be a JSON object of nodes (API format)")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs"), dict):
            raise WorkflowError(
                f"the workflow file '{path.name}': node {node_id!r} has no class_type/inputs; "
                "export it with 'Export (API)'"
            )
    found = placeholders(graph)
    unknown = sorted(found - PLACEHOLDERS)
    if unknown:
        names = ", ".join("{{" + name + "}}" for name in unknown)
        raise WorkflowError(f"the workflow file '{path.name}' uses unknown placeholders {names}; "
                            f"known: {', '.join(sorted(PLACEHOLDERS))}")
    missing = [name for name in REQUIRED_PLACEHOLDERS if name not in found]
    if missing:
        names = ", ".join("{{" + name + "}}" for name in missing)
        raise WorkflowError(f"the workflow file '{path.name}' has no {names} placeholder")
    return graph


def _errors_of(node: object) -> list[dict[str, Any]]:
    """A node's `errors` in ComfyUI's answer, the entries of another shape left out."""
    errors = node.get("errors") if isinstance(node, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def output_nodes(graph: Mapping[str, Any]) -> list[str]:
    """The ids of the nodes titled `orchestrator output` (any case), in the template's order."""
    marked = []
    for node_id, node in graph.items():
        meta = node.get("_meta") if isinstance(node, dict) else None
        title = meta.get("title") if isinstance(meta, dict) else None
        if isinstance(title, str) and title.strip().casefold() == OUTPUT_TITLE:
            marked.append(node_id)
    return marked


def placeholders(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(placeholders(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(placeholders(v) for v in node))
    if isinstance(node, str):
        return {m.group(1) for m in PLACEHOLDER.finditer(node)}
    return set()


def substitute(node: Any, values: Mapping[str, Any]) -> Any:
    """A copy of `node` with placeholders replaced; keys are never substituted."""
    if isinstance(node, dict):
        return {key: substitute(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [substitute(value, values) for value in node]
    if isinstance(node, str):
        whole = PLACEHOLDER.fullmatch(node)
        if whole and whole.group(1) in values:
            return values[whole.group(1)]
        return PLACEHOLDER.sub(
            lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), node
        )
    return node


class ComfyUIEngine(SelfHostedEngine):
    name = "comfyui"
    # The output size is whatever the workflow makes of {{width}}/{{height}}: upscaling workflows are common.
    capabilities = Capabilities(img2img=True, upscale=True, seeds=True, negative_prompt=True,
                                leaves_machine=True, max_width=4096, max_height=4096, size_multiple=8)

    def __init__(self, ctx: EngineContext, client: RemoteClient | None = None) -> None:
        s = ctx.settings
        self._url = s.comfyui_url
        self.concurrency = s.self_hosted_concurrency
        self._workflow = s.comfyui_workflow
        self._connect_timeout = s.remote_connect_timeout
        # Seconds between /history polls; tests set it to 0.
        self.poll_interval = 1.0
        # Whether renders listen on the server's websocket for step progress; tests whose server
        # is only respx's turn it off (their made-up host would be looked up in DNS).
        self.follow_progress = True
        # A server without a usable websocket is told of once at INFO, then at DEBUG: every job
        # would say the same.
        self._told_no_websocket = False
        # No auth of its own: a proxy in front of it may take `http://user:password@host`, sent as
        # Basic auth, the address kept without it.
        base_url, in_url = basic_auth_in(self._url) if self._url else (None, None)
        # The websocket's too, from the same parse: left in its URL, websockets refused a user
        # without a password (InvalidURI: no step progress) where httpx sent `user:`.
        self._ws_base = base_url
        self._ws_headers = {"Authorization": _basic(*in_url)} if in_url else {}
        self.http = self.self_hosted_client(
            s, client, base_url=base_url, auth=in_url,
            # A 401/403 comes from a proxy in front of it.
            key_setting=f"{URL_SETTING} (the proxy in front of ComfyUI refused the request)",
        )
        self.http.final_answer = _queued_behind_a_gateway

    @property
    def model(self) -> str:
        return f"comfyui:{self._workflow.stem}" if self._workflow else "comfyui"

    @property
    def configured(self) -> bool:
        """Whether the operator set it up (a server, or a workflow, given): unavailable without
        either is off by choice; a workflow without the URL is a mistake told at start."""
        return bool(self._url or self._workflow)

    def availability(self) -> tuple[bool, str | None]:
        if not self._url:
            return False, f"no server: set {URL_SETTING}"
        if self._workflow is None:
            return False, f"no workflow template: set {WORKFLOW_SETTING} to an API-format JSON file"
        try:
            load_workflow(self._workflow)
        except WorkflowError as exc:
            return False, f"{exc} ({WORKFLOW_SETTING})"
        return True, None

    def _check_size(self, req: RenderRequest, template: dict[str, Any], image: Any) -> None:
        """A workflow without {{width}} and {{height}} makes a size of its own (the source's, or a
        fixed upscaler's factor of it): a polish asked to upscale came back at the source's size,
        its record saying `scale` 2. One whose size is not the one asked is refused; routing
        takes the rule's next engine (the server bills nobody)."""
        if {"width", "height"} <= placeholders(template):
            return  # the workflow decides what it makes of the size asked
        width, height = image.size
        if (abs(width - req.width) <= max(SIZE_SLACK_PIXELS, SIZE_SLACK * req.width)
                and abs(height - req.height) <= max(SIZE_SLACK_PIXELS, SIZE_SLACK * req.height)):
            return
        error = BadEngineInput(
            f"{self.name}: its workflow (ORCH_COMFYUI_WORKFLOW) made {width}x{height}, not the {req.width}x"
            f"{req.height} asked, and has no {{{{width}}}} and {{{{height}}}} placeholders: put them in its size "
            "inputs (an ImageScale node)", retryable=True,
            details={"engine": self.name, "setting": WORKFLOW_SETTING, "made_width": width, "made_height": height})
        error.engine_fault = False  # the workflow's answer to this size: the server is well for every other
        raise error

    def _template(self) -> dict[str, Any]:
        if not self._url or self._workflow is None:
            raise EngineUnavailable(f"comfyui: {self.availability()[1]}", details={"engine": self.name})
        try:
            return load_workflow(self._workflow)
        except WorkflowError as exc:
            raise EngineUnavailable(
                f"comfyui: {exc} ({WORKFLOW_SETTING})", details={"engine": self.name}
            ) from None

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        return await self._render(req, [], progress, cancel)

    async def resume(self, req: RenderRequest, handles: list[dict[str, Any]], progress: Progress,
                     cancel: CancelToken) -> RenderResult:
        """After a crash: the dead attempt's prompts that finished are collected from the server's
        history and those still queued or running are waited for; only the images none of them
        makes are rendered again, with the seeds they were given (see `tiers.base.Resumable`)."""
        return await self._render(req, handles, progress, cancel)

    async def _render(self, req: RenderRequest, earlier: list[dict[str, Any]], progress: Progress,
                      cancel: CancelToken) -> RenderResult:
        try:
            template = self._template()
            cancel.raise_if_cancelled(charged="no")
        except EngineError:
            # Resumed, the job ends before it looked at the earlier attempt's prompts: they go too
            # (with no server set, there is none to ask).
            if self._url:
                await self._let_go_of(earlier, cancel)
            raise
        follower = _Follower(_Steps(progress, req.n), not_samplers(template))
        # In the background: the websocket must not hold up the upload and the first prompt.
        listening = (asyncio.create_task(self._listen(websocket_url(self._ws_base, follower.client_id), follower))
                     if self.follow_progress and self._ws_base else None)
        try:
            return await self._render_images(req, template, earlier, follower, progress, cancel)
        finally:
            if listening is not None:
                listening.cancel()
                await asyncio.gather(listening, return_exceptions=True)

    async def _render_images(self, req: RenderRequest, template: dict[str, Any], earlier: list[dict[str, Any]],
                             follower: _Follower, progress: Progress, cancel: CancelToken) -> RenderResult:
        uses_seed = "seed" in placeholders(template)
        kept = await self._keep(earlier, template, progress, cancel)
        # The dead attempt's first prompt had the base seed: a request without one keeps it.
        earlier_seeds = [h["seed"] for h in earlier if _seed(h) is not None]
        base_seed = (req.seed if req.seed is not None
                     else earlier_seeds[0] if earlier_seeds else secrets.randbelow(SEED_RANGE))
        image_name: str | None = None
        images: list[RenderedImage] = []
        prompt_ids: list[str] = []
        # One prompt per image: the template's own batch size is the user's business, and any extra
        # images it makes are dropped below.
        while len(images) < req.n:
            if prompt_ids and not uses_seed:
                # The same graph again: ComfyUI's cache would answer with the first one's image.
                raise BadEngineInput(
                    f"comfyui: the workflow made {len(images)} of {req.n} images and has no {{{{seed}}}} placeholder, "
                    "so another prompt would repeat them: put {{seed}} in its sampler's seed (or make the workflow "
                    "itself a batch of n), or ask for fewer images", details={"engine": self.name,
                                                                            "setting": WORKFLOW_SETTING})
            seed = (base_seed + len(prompt_ids)) % SEED_RANGE
            if seed in kept:
                prompt_id, outputs = kept.pop(seed)
            else:
                if image_name is None:
                    image_name = await self._upload(req, self.http.new_deadline(), cancel)
                graph = substitute(template, self._values(req, image_name, seed))
                prompt_id = str(uuid.uuid4())
                follower.follow(prompt_id, image=len(images))
                # A deadline per prompt, as ORCH_REMOTE_DEADLINE is for one render: shared by the n
                # of a job, a slow server ran out of it on a later image, within its time per image.
                prompt_id, outputs = await self._execute(graph, prompt_id, seed, follower, progress,
                                                         self.http.new_deadline(), cancel)
                follower.follow(None)
            prompt_ids.append(prompt_id)
            # The downloads' own deadline: what a render left of its deadline (1 s, if it finished
            # near the end) could be too little for a large image that is already made.
            fetch_by = self.http.new_deadline()
            for ref in outputs[: req.n - len(images)]:
                image = await self._download(ref, prompt_id, fetch_by, cancel)
                self._check_size(req, template, image)
                images.append(RenderedImage(image, seed=seed if uses_seed else None))
            follower.steps.images(len(images))
        for prompt_id, _ in kept.values():
            log.info("comfyui: prompt %s of an earlier attempt is not needed; its images are left", prompt_id)
        return RenderResult(
            images=images,
            model=self.model,
            cost_millicredits=0,
            provider_request_id=",".join(prompt_ids),
            metadata={"workflow": self._workflow.name if self._workflow else None, **self._used(req, template)},
        )

    @staticmethod
    def _used(req: RenderRequest, template: dict[str, Any]) -> dict[str, Any]:
        """What the image's record says of the request's parameters: those the template's placeholders
        take, as substituted (`_values`); None for the rest, whose values are the workflow's own and
        not known here (its sampler, its steps without `{{steps}}`, its guidance without `{{guidance_scale}}`)."""
        taken = placeholders(template)
        sent = ComfyUIEngine._values(req, "", 0)
        denoise = sent["strength"] if "strength" in taken else None
        polish = req.stage == "polish"  # a polish's `{{strength}}` is its creativity
        return {"negative_prompt": sent["negative_prompt"] if "negative_prompt" in taken else "",
                "steps": sent["steps"] if "steps" in taken else None,
                "guidance_scale": sent["guidance_scale"] if "guidance_scale" in taken else None, "sampler": None,
                "strength": None if polish else denoise, "creativity": denoise if polish else None, "quality": None}

    async def _keep(self, handles: list[dict[str, Any]], template: dict[str, Any], progress: Progress,
                    cancel: CancelToken) -> dict[int, tuple[str, list[dict[str, str]]]]:
        """The outputs of the earlier prompts worth keeping, by seed: finished ones, and queued or
        running ones once they finish. The rest (forgotten by a restarted server, failed, or saved
        without a seed by an older version) are taken off the server and rendered again."""
        kept: dict[int, tuple[str, list[dict[str, str]]]] = {}
        for i, handle in enumerate(handles):
            prompt_id, seed = _prompt_id(handle.get("id")), _seed(handle)
            if prompt_id is None:
                continue
            if seed is None or seed in kept:
                await self._drop(prompt_id)
                continue
            # Each earlier prompt is waited for within a deadline of its own, as a new one is.
            deadline = self.http.new_deadline()
            followed = False
            try:
                entry = await self._history(prompt_id, deadline, cancel)
                if entry is None and not await self._lost(prompt_id, cancel):  # still queued or running
                    progress.state("queued", prompt_id=prompt_id)
                    followed = True  # `_follow` takes it off the server itself if the wait fails
                    entry = await self._follow(prompt_id, deadline, cancel)
                elif entry is None:  # or it finished between the two looks
                    entry = await self._history(prompt_id, deadline, cancel)
            except EngineError:
                # A cancel or a failure ends the job: this prompt (unless `_follow` let go of it)
                # and those not looked at yet would render on the shared GPU for nobody. Those
                # before it are finished, lost or dropped already.
                rest = i + 1 if followed else i
                visited = {h["id"] for h in handles[:rest] if isinstance(h.get("id"), str)}
                await self._let_go_of(handles[rest:], cancel, skip=visited)
                raise
            try:
                outputs = self._outputs(entry, prompt_id, template) if entry is not None else None
            except EngineError as exc:
                log.info("comfyui: prompt %s of an earlier attempt is not kept: %s", prompt_id, exc.message)
                outputs = None
            if outputs:
                kept[seed] = (prompt_id, outputs)
        return kept

    @staticmethod
    def _values(req: RenderRequest, image_name: str, seed: int) -> dict[str, Any]:
        return {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "seed": seed,
            "strength": float(req.creativity if req.stage == "polish" else req.strength),
            "image": image_name,
            "width": int(req.width),
            "height": int(req.height),
            "steps": int(req.steps or DEFAULT_STEPS),
            # 0 is a guidance the sampler takes: only None means the default.
            "guidance_scale": float(DEFAULT_CFG if req.guidance_scale is None else req.guidance_scale),
        }

    async def _upload(self, req: RenderRequest, deadline: float, cancel: CancelToken) -> str:
        if req.init_image is None:
            raise BadEngineInput(f"comfyui: the {req.stage} stage needs a draft image",
                                 details={"engine": self.name})
        data = await asyncio.to_thread(encode_image, req.init_image, fmt="PNG")  # off the event loop
        # Named by content with overwrite=true: a repeat upload is a no-op, so it is safe to re-send
        # after a timeout, and the same draft does not pile up copies in ComfyUI's input folder.
        filename = f"orch-{hashlib.sha256(data).hexdigest()[:24]}.png"
        response = await cancel.race(
            # The job's first request: a server down (or a proxy answering for it) is waited for
            # as a restart is, about a minute, not until the deadline, before another engine may take it.
            self.http.request(
                "POST", "/upload/image", idempotent=True, starts_work=True, deadline=deadline,
                files={"image": (filename, data, "image/png")},
                data={"type": "input", "overwrite": "true"},
            ),
            charged="no",
        )
        if response.status_code != 200:
            raise self._refused(response, "/upload/image")
        body = json_object(response, self.name, "/upload/image")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise EngineError("comfyui: /upload/image answered without a file name",
                              details={"engine": self.name})
        subfolder = body.get("subfolder")
        return f"{subfolder}/{name}" if isinstance(subfolder, str) and subfolder else name

    async def _execute(self, graph: dict[str, Any], prompt_id: str, seed: int, follower: _Follower,
                       progress: Progress, deadline: float, cancel: CancelToken) -> tuple[str, list[dict[str, str]]]:
        """Queue one prompt and wait for it. Returns the prompt's id (the server's, where it
        ignores ours) and its output images."""
        # Before sending: if the process dies mid-request, the id still leads to the work, and the
        # seed tells a later attempt which image it is.
        progress.provider_request(prompt_id, {"seed": seed})
        progress.state("submitted", prompt_id=prompt_id)
        try:
            body = {"prompt": graph, "client_id": follower.client_id, "prompt_id": prompt_id}
            response = await self._queue_prompt(body, deadline, cancel)
            if response.status_code in GATEWAY_STATUSES:
                # The proxy gave up waiting, not the server: the prompt may be queued under the id we
                # chose. Sent again, it was rendered twice; followed, it is collected, or found lost.
                answered = None
            elif response.status_code != 200:
                raise await self._prompt_refused(response)
            else:
                try:
                    queued = json_object(response, self.name, "/prompt")
                except EngineError as exc:
                    # A 200: queued (under the id we chose, on a server of 2025 on). Failed here, it
                    # rendered for nobody; followed, it is collected, or found lost.
                    log.warning("%s; following prompt %s by its id", exc.message, prompt_id)
                    queued = {}
                answered = _prompt_id(queued.get("prompt_id"))
                if _results_refused(queued.get("node_errors"), graph):
                    # Some outputs failed validation and the server queued the rest: what those
                    # render is not the workflow's result (an intermediate save, or no image).
                    await self._drop(answered if isinstance(answered, str) and answered else prompt_id)
                    raise await self._prompt_refused(response)
        except (EngineTimeout, Canceled) as exc:
            # The prompt may be queued or running with nobody left to collect it.
            raise await self._let_go_and_say(exc, prompt_id, cancel) from None
        if isinstance(answered, str) and answered and answered != prompt_id:
            # Servers before client-chosen ids (2025) queue the prompt under one of their own.
            prompt_id = answered
            follower.rename(prompt_id)
            progress.provider_request(prompt_id, {"seed": seed})
        progress.state("queued", prompt_id=prompt_id)
        entry = await self._follow(prompt_id, deadline, cancel)
        if entry is None:
            # A server restarted mid-job forgets its queue: waiting would last the whole deadline.
            raise EngineError(f"comfyui: the server no longer knows prompt {prompt_id} (restarted?); "
                              "nothing of it will come back", details={"engine": self.name, "prompt_id": prompt_id},
                              retryable=True, charged="no")
        return prompt_id, self._outputs(entry, prompt_id, graph)

    async def _queue_prompt(self, body: dict[str, Any], deadline: float, cancel: CancelToken) -> httpx.Response:
        """`POST /prompt`. A cancel while it is out waits for its answer (`CLEANUP_TIMEOUT` at
        most) before raising: the server queues the prompt only once it has validated it, whether
        or not we are still connected, so a delete sent at once could come first and leave the
        prompt to render for nobody. Nothing is sent again after the cancel."""
        cancel.raise_if_cancelled(charged="no")  # nothing is sent for a job already canceled
        kept = KeptOut()
        sending = asyncio.create_task(self.http.request("POST", "/prompt", deadline=deadline, cancel=kept, json=body))
        try:
            return await cancel.race(asyncio.shield(sending), charged="no")
        except Canceled:
            kept.cancel(abandon=cancel.abandoned)
            if kept.out and not cancel.abandoned:
                await asyncio.wait({sending}, timeout=CLEANUP_TIMEOUT)
            answered = _queued_as(sending)
            if answered is not None and answered != body["prompt_id"] and not cancel.abandoned:
                await self._drop(answered)  # a server that queued it under an id of its own
            raise
        finally:
            if not sending.done():
                sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)

    async def _listen(self, url: str, follower: _Follower) -> None:
        """Hand the websocket's frames to `follower` until the render ends (this task is then
        cancelled, which closes the socket). Any failure to connect, or a drop, is logged once and
        ends only the listening: there is no reconnecting, as polling carries the job anyway."""
        try:
            async with _Connect(url, additional_headers=self._ws_headers, open_timeout=self._connect_timeout,
                                close_timeout=WS_CLOSE_TIMEOUT,
                                max_size=WS_MAX_FRAME, max_queue=WS_MAX_QUEUE,
                                # Previews are compressed already, and a small message inflated is a
                                # larger one to hold.
                                compression=None) as socket:
                try:
                    async for message in socket:
                        if isinstance(message, str):
                            follower.text(message)
                        else:
                            follower.binary(message)
                finally:
                    # Also when the render ends (this task is cancelled): left to the context
                    # manager, that close would tell the server 1011, an error on our side.
                    await socket.close()
        except Exception as exc:  # whatever it was, the job must not notice
            level = logging.DEBUG if self._told_no_websocket else logging.INFO
            self._told_no_websocket = True
            log.log(level, "comfyui: no step progress from the server's websocket (%s); jobs follow "
                    "/history only", _why(exc))

    async def _follow(self, prompt_id: str, deadline: float, cancel: CancelToken) -> dict[str, Any] | None:
        """The prompt's history entry once it has one; None if the server no longer has it. On
        cancel or timeout, the prompt is taken off the server's queue (or its GPU)."""
        try:
            return await self._wait(prompt_id, deadline, cancel)
        except (Canceled, EngineTimeout) as exc:
            raise await self._let_go_and_say(exc, prompt_id, cancel) from None
        except EngineError:
            # Its history could not be read (a 5xx until the deadline, a proxy's page): the job ends
            # or moves on, and the prompt would go on rendering on the shared GPU for nobody.
            await self._let_go(prompt_id, cancel)
            raise

    async def _let_go_and_say(self, exc: Canceled | EngineTimeout, prompt_id: str,
                              cancel: CancelToken) -> EngineError:
        """The error a cancel or a timeout while a prompt is out ends its job with, the prompt let go
        of first (`_let_go`): it names the prompt, and a timeout says whether the server was asked
        to drop it or it was left to the job's next attempt. Charged nothing (the server is the
        studio's own). One place for sending the prompt and following it, which end alike."""
        dropped = await self._let_go(prompt_id, cancel)
        if isinstance(exc, Canceled):
            return Canceled("comfyui: the job was canceled",
                            details={"engine": self.name, "prompt_id": prompt_id}, charged="no")
        told = "asked the server to drop" if dropped else "left to the job's next attempt"
        return EngineTimeout(f"{exc.message} ({told} prompt {prompt_id})",
                             details={**exc.details, "prompt_id": prompt_id}, charged="no")

    async def _let_go(self, prompt_id: str, cancel: CancelToken) -> bool:
        """A canceled (or timed out, or failed) job's prompt is taken off the server; an abandoned
        one (this process stops, or another took the job over) is left to run: the job's next
        attempt collects it from the history instead of rendering it again. True when dropped."""
        if await _abandoned(cancel):
            return False
        await self._drop(prompt_id)
        return True

    async def _let_go_of(self, handles: list[dict[str, Any]], cancel: CancelToken, *,
                         skip: frozenset[str] | set[str] = frozenset()) -> None:
        """A resumed job that ends (canceled, or failed) before it read all the earlier attempt's
        prompts takes them off the server, each once and best effort (ids in `skip` are not);
        an abandoned one leaves them to the job's next attempt, as `_let_go` does."""
        if await _abandoned(cancel):
            return
        done = set(skip)
        for handle in handles:
            prompt_id = _prompt_id(handle.get("id"))
            if prompt_id is not None and prompt_id not in done:
                done.add(prompt_id)
                await self._drop(prompt_id)

    async def _wait(self, prompt_id: str, deadline: float, cancel: CancelToken) -> dict[str, Any] | None:
        """Poll the history; None once the server's queue shows it does not have the prompt."""
        polls = 0
        while True:
            entry = await self._history(prompt_id, deadline, cancel)
            if entry is not None:
                return entry
            polls += 1
            if polls % QUEUE_CHECK_POLLS == 0 and await self._lost(prompt_id, cancel):
                # The history is read once more, as the prompt may have finished between the two looks.
                return await self._history(prompt_id, deadline, cancel)
            if self.http.clock() >= deadline:
                raise EngineTimeout(f"comfyui: prompt {prompt_id} did not finish before the deadline "
                                    "(ORCH_REMOTE_DEADLINE)", details={"engine": self.name})
            await cancel.sleep(self.poll_interval)

    async def _history(self, prompt_id: str, deadline: float, cancel: CancelToken) -> dict[str, Any] | None:
        response = await cancel.race(
            self.http.request("GET", f"/history/{prompt_id}", idempotent=True, deadline=deadline),
            charged="no",
        )
        if response.status_code != 200:
            raise self.http.fail(response)
        entry = (await _parsed(cancel, json_object, response, self.name, "/history")).get(prompt_id)
        return entry if isinstance(entry, dict) and entry else None

    async def _lost(self, prompt_id: str, cancel: CancelToken) -> bool:
        """Whether the server's queue, read successfully, holds the prompt neither running nor
        pending. Anything unreadable counts as not lost: the deadline still ends the wait. A cancel
        does not wait for the answer (`CLEANUP_TIMEOUT` of a server slow to give it)."""
        try:
            response = await cancel.race(self._cleanup("GET", "/queue"), charged="no")
            body = await _parsed(cancel, answer_json, response) if response.status_code == 200 else None
        except Canceled:
            raise
        except (EngineError, httpx.HTTPError, ValueError):
            return False
        if not isinstance(body, dict):
            return False
        running, pending = body.get("queue_running"), body.get("queue_pending")
        if not isinstance(running, list) or not isinstance(pending, list):
            return False
        return not any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id
                       for item in [*running, *pending])

    def _outputs(self, entry: dict[str, Any], prompt_id: str, graph: Mapping[str, Any]) -> list[dict[str, str]]:
        """The images the prompt made, in the graph's node order (the history's is the order the
        nodes ran in, which a server may change); only the marked nodes' when some are."""
        status: dict[str, Any] = entry["status"] if isinstance(entry.get("status"), dict) else {}
        if status.get("status_str") == "error":
            said = self._execution_error(status)
            error = EngineError(f"comfyui: the workflow failed: {self.http.scrub(said)[:1000]}",
                                details={"engine": self.name, "prompt_id": prompt_id})
            error.engine_fault = not says_out_of_memory(said)  # the request's size (see a1111)
            raise error
        refs: list[dict[str, str]] = []
        found = entry.get("outputs")
        outputs: dict[str, Any] = found if isinstance(found, dict) else {}
        marked = output_nodes(graph)
        # Nodes the graph does not name (a custom node's expansion) come after its own.
        order = marked or [*(node_id for node_id in graph if node_id in outputs),
                           *(node_id for node_id in outputs if node_id not in graph)]
        for node in (outputs.get(node_id) for node_id in order):
            # Another shape than a list (a number) says no image: iterated, it failed the job as an engine bug.
            images = node.get("images") if isinstance(node, dict) else None
            for image in images if isinstance(images, list) else []:
                # "temp" images come from PreviewImage nodes: intermediate, not results.
                if isinstance(image, dict) and image.get("type") == "output" and image.get("filename"):
                    refs.append({"filename": str(image["filename"]),
                                 "subfolder": str(image.get("subfolder") or ""), "type": "output"})
        if not refs and marked:
            raise EngineError(
                f"comfyui: the workflow's nodes titled '{OUTPUT_TITLE}' ({', '.join(marked)}) saved no images "
                "(are they SaveImage nodes?)", details={"engine": self.name, "prompt_id": prompt_id},
            )
        if not refs:
            raise EngineError(
                "comfyui: the workflow finished without output images (does it end in a SaveImage node?)",
                details={"engine": self.name, "prompt_id": prompt_id},
            )
        return refs

    @staticmethod
    def _execution_error(status: Mapping[str, Any]) -> str:
        messages = status.get("messages")
        for message in messages if isinstance(messages, list) else []:
            if not (isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict)):
                continue
            kind, data = message
            if kind == "execution_error":
                node = f"node {data.get('node_id')} ({data.get('node_type')})"
                exc_type = str(data.get("exception_type") or "error")
                return f"{node}: {exc_type}: {data.get('exception_message', '')}".strip()
            if kind == "execution_interrupted":
                return "interrupted on the server"
        return "status error without details"

    async def _download(self, ref: Mapping[str, str], prompt_id: str, deadline: float, cancel: CancelToken) -> Any:
        """One image prompt `prompt_id` made. Its failure is not retryable: the history says the
        server made the image, and the job's next engine (a paid one, maybe) would make it again."""
        try:
            response = await cancel.race(
                self.http.request("GET", "/view", idempotent=True, deadline=deadline, params=dict(ref)),
                charged="no",
            )
            if response.status_code != 200:
                raise EngineError(f"comfyui: could not fetch {ref['filename']} (HTTP {response.status_code})",
                                  details={"engine": self.name, "status": response.status_code})
            return await _parsed(cancel, decode_image, response.content, self.name)
        except Canceled:
            raise
        except EngineError as exc:
            # Still charged "no" (the server bills nobody); the operator is told where the image is.
            exc.retryable = False
            exc.message = (f"{exc.message} (prompt {prompt_id} made the image: it stays on the server "
                           f"as {ref['filename']})")
            exc.details = {**exc.details, "prompt_id": prompt_id}
            raise

    async def forget(self, handles: list[dict[str, Any]]) -> None:
        """After a crash, before the job runs again: the prompts the dead attempt queued leave
        the server's queue (or its GPU), so it does not render the job twice."""
        for handle in handles:
            if (prompt_id := _prompt_id(handle.get("id"))) is not None:
                await self._drop(prompt_id)

    async def _drop(self, prompt_id: str) -> None:
        """Best effort: remove the prompt if pending, interrupt it if running.

        Delete first: a pending prompt could start between the look at the queue and an interrupt.
        The interrupt is sent only when the queue shows our prompt running: servers that predate
        targeted interrupts ignore `prompt_id` and stop whatever is running.
        """
        # Each step whatever the one before did: a delete a proxy refused (a 502 for the whole
        # cleanup, a 403 for that route) sent no interrupt, and the prompt rendered on for nobody.
        deleted = False
        with contextlib.suppress(EngineError, httpx.HTTPError):
            deleted = (await self._cleanup("POST", "/queue", json={"delete": [prompt_id]})).status_code == 200
        with contextlib.suppress(EngineError, httpx.HTTPError):
            queue = await self._cleanup("GET", "/queue")
            try:
                # Bounded as the cleanup's requests are: the cancel that drops the prompt waits for
                # this parse (seconds for a queue of megabytes), which held it however long.
                body = (await asyncio.wait_for(asyncio.to_thread(answer_json, queue), CLEANUP_TIMEOUT)
                        if queue.status_code == 200 else None)
            except ValueError:  # a proxy's page: interrupt nothing
                body = None
            except TimeoutError:
                # Not parsed by then: the prompt was left rendering for nobody. Deleted from the
                # pending list just before, a prompt the queue still names is the one running, which
                # a search of the raw bytes finds in milliseconds where the parse took seconds. Only
                # an id as long as a uuid (ours, ComfyUI's): a short one ("9") may be a node's. The
                # queue is read again for it: the answer above is CLEANUP_TIMEOUT old, and the prompt
                # may have ended since and another's begun, which a server that predates targeted
                # interrupts (it ignores `prompt_id`) stopped instead.
                if deleted and len(prompt_id) >= UUID_HEX:
                    now = await self._cleanup("GET", "/queue")
                    if now.status_code == 200 and f'"{prompt_id}"'.encode() in now.content:
                        await self._cleanup("POST", "/interrupt", json={"prompt_id": prompt_id})
                return
            running = body.get("queue_running") if isinstance(body, dict) else None
            if isinstance(running, list) and any(
                    isinstance(item, list) and len(item) > 1 and item[1] == prompt_id for item in running):
                await self._cleanup("POST", "/interrupt", json={"prompt_id": prompt_id})

    async def _cleanup(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return await self.http.request(method, url, idempotent=True, timeout=CLEANUP_TIMEOUT,
                                       deadline=self.http.clock() + CLEANUP_TIMEOUT, **kwargs)

    async def _prompt_refused(self, response: httpx.Response) -> EngineError:
        if response.status_code == 404:
            return self._refused(response, "/prompt")
        try:
            # In a worker thread: a body of megabytes held the event loop. Read whole all the same,
            # not cut at `error_json`'s bound: a value_not_in_list names every value its input
            # offers (a LoadImage's: each file in the server's input folder), megabytes on a
            # server that kept its drafts, and its type says the server lacks what the workflow names.
            body = await asyncio.to_thread(answer_json, response)
        except ValueError:
            return self.http.fail(response)
        if not isinstance(body, dict):
            return self.http.fail(response)
        parts: list[str] = []
        error = body.get("error")
        if isinstance(error, dict):
            parts.append(": ".join(str(x) for x in (error.get("message"), error.get("details")) if x))
        elif error:
            parts.append(str(error))
        node_errors = body.get("node_errors")
        nodes: list[str] = []
        if isinstance(node_errors, dict):
            for node_id, info in node_errors.items():
                info = info if isinstance(info, dict) else {}
                reasons = "; ".join(
                    ": ".join(str(x) for x in (e.get("message"), e.get("details")) if x)
                    for e in _errors_of(info)
                )
                nodes.append(str(node_id))
                parts.append(f"node {node_id} ({info.get('class_type', '?')}): {reasons or 'invalid'}")
        told = without_credentials(" | ".join(p for p in parts if p), response)[:1000] or None
        types = {str(error.get("type"))} if isinstance(error, dict) else set()
        if isinstance(node_errors, dict):
            types |= {str(e.get("type")) for info in node_errors.values() for e in _errors_of(info)}
        # A 200 with node errors: the server queued the outputs that passed (and we dropped them).
        status = f"HTTP {response.status_code}" if response.status_code != 200 else "some of its outputs"
        if types & SETUP_ERRORS:
            # The server lacks what the workflow names (a custom node, a checkpoint): no request
            # of ours can pass, and another engine may take it.
            return EngineUnavailable(
                f"comfyui: the server cannot run the workflow ({status}): {told}; "
                f"install what it lacks there, or change {WORKFLOW_SETTING}",
                details={"engine": self.name, "status": response.status_code, "nodes": nodes})
        if response.status_code == 200:
            return BadEngineInput(f"comfyui: the server refused some of the workflow's outputs: {told}",
                                  details={"engine": self.name, "status": 200, "nodes": nodes})
        exc = self.http.fail(response, told)
        exc.details["nodes"] = nodes
        return exc

    def _refused(self, response: httpx.Response, path: str) -> EngineError:
        if response.status_code == 404:
            return EngineUnavailable(f"comfyui: the server has no {path} (HTTP 404): check {URL_SETTING}",
                                     details={"engine": self.name, "status": 404})
        return self.http.fail(response, error_text(response))


async def _parsed(cancel: CancelToken, parse: Callable[..., T], *args: Any) -> T:
    """`parse(*args)` in a worker thread, as each answer read whole is: a history of many outputs,
    or a queue of many workflows (each whole), is megabytes, which held the event loop, and a large
    image takes a while to decode. Raced against the job's cancel, as the request before it is:
    such a parse takes seconds, which a cancel waited out. The server bills nobody (charged "no");
    the thread runs to its end, its answer dropped."""
    return await cancel.race(asyncio.to_thread(parse, *args), charged="no")


async def _abandoned(cancel: CancelToken) -> bool:
    """Whether the job's work is left to another attempt: this process let go of the job, or
    was stopped past its lease and another took it over (its token not yet told)."""
    return cancel.abandoned or not await still_holds_the_job()


def _results_refused(node_errors: Any, graph: Mapping[str, Any]) -> bool:
    """Whether a `/prompt` answer's `node_errors` (listed with a 200 when other outputs passed,
    and those queued) reach an output the job's result comes from: a node titled `orchestrator
    output`, or when none is, any output but a preview. An unconnected PreviewImage left in the
    workflow is not the job's concern."""
    if not isinstance(node_errors, dict) or not node_errors:
        return False
    marked = set(output_nodes(graph))
    for info in node_errors.values():
        outputs = info.get("dependent_outputs") if isinstance(info, dict) else None
        if not isinstance(outputs, list):
            return True  # not told which outputs it stops: taken as the result's
        for output in map(str, outputs):
            node = graph.get(output)
            kind = node.get("class_type") if isinstance(node, dict) else None
            preview = isinstance(kind, str) and kind.startswith("Preview")
            if (output in marked) if marked else not preview:
                return True
    return False


def _prompt_id(value: object) -> str | None:
    """`value` as a prompt id requests may be built from (`/history/{id}`), or None. ComfyUI makes
    uuid4s, as we do: an answer naming `../../admin/reset` had each poll sent to that path of the
    host (a studio's gateway, with the URL's credentials), and saved it for the next attempt."""
    return path_id(value)


def _queued_as(sending: asyncio.Task[httpx.Response]) -> str | None:
    """The prompt id a finished `POST /prompt` was queued under, if it was."""
    if not sending.done() or sending.cancelled() or sending.exception() is not None:
        return None
    response = sending.result()
    try:
        body = answer_json(response) if response.status_code == 200 else None
    except ValueError:
        return None
    return _prompt_id(body.get("prompt_id")) if isinstance(body, dict) else None


def websocket_url(base: str, client_id: str) -> str:
    """ComfyUI's websocket under `base` (ORCH_COMFYUI_URL): the same host, port, base path and
    any credentials, ws:// for http:// and wss:// for https://. The engine passes its URL without
    credentials and sends those as a header (`_ws_headers`), as httpx sends them."""
    url = httpx.URL(base)
    return str(url.copy_with(scheme="wss" if url.scheme == "https" else "ws", path=url.path.rstrip("/") + "/ws",
                             params={"clientId": client_id}, fragment=None))


def _basic(username: str, password: str) -> str:
    """An `Authorization` header's value for HTTP Basic auth, encoded as httpx encodes its own."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class _Connect(connect):
    """websockets' `connect` without redirects (it follows them by default, to other hosts too):
    the socket goes to the configured host or nowhere."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


def _why(exc: Exception) -> str:
    """A failed websocket told without its URL, which may hold credentials."""
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, TimeoutError):
        return "no answer within ORCH_REMOTE_CONNECT_TIMEOUT"
    if isinstance(exc, (OSError, ConnectionClosed)):
        return str(exc) or type(exc).__name__
    return type(exc).__name__


class _Steps:
    """A job's progress on one scale that only moves forward: n images of `unit` steps each.

    The unit is 1 (images made of n: all that polling can tell) until the server reports a
    sampler's steps; the first such frame makes it that sampler's step count, and later counts are
    scaled to it. A workflow's next sampler (a refiner, a hires pass) starts again from 0: its steps
    show only where they pass those already told. An image's last step is told when the image is
    downloaded, not when its sampler ends."""

    def __init__(self, progress: Progress, n: int) -> None:
        self._progress = progress
        self._n = max(n, 1)
        self._unit: int | None = None
        self._figure = 0

    def _total(self) -> int:
        return self._n * (self._unit or 1)

    def images(self, made: int) -> None:
        self._figure = made * (self._unit or 1)
        self._progress.step(self._figure, self._total())

    def sampled(self, image: int, value: int, maximum: int) -> bool:
        """Image `image` (0-based) is at step `value` of `maximum`; whether that was told (it moved
        the figure forward)."""
        if self._unit is None:
            self._unit = min(maximum, MAX_UNIT)
            self._figure *= self._unit
        unit = self._unit
        figure = min(max(image, 0), self._n - 1) * unit + min(value * unit // maximum, unit - 1)
        if figure <= self._figure:
            return False
        self._figure = figure
        self._progress.step(figure, self._total())
        return True

    def preview(self, image: Image.Image) -> None:
        self._progress.step(self._figure, self._total(), preview=image)


class _Follower:
    """What a render's websocket listens for: the progress frames of the prompt it follows (none
    between prompts), and the preview sent after each step told."""

    def __init__(self, steps: _Steps, quiet: frozenset[str] = frozenset()) -> None:
        # A client id per render: ComfyUI sends a client's messages to the websocket opened last
        # with its id, so jobs sharing one would take each other's.
        self.client_id = uuid.uuid4().hex
        self.steps = steps
        self._quiet = quiet  # nodes whose frames are not steps (see `not_samplers`)
        self._prompt_id: str | None = None
        self._image = 0
        self._preview_due = False

    def follow(self, prompt_id: str | None, *, image: int = 0) -> None:
        """Count the frames of `prompt_id`, which makes image `image` (0-based) of the job."""
        self._prompt_id, self._image, self._preview_due = prompt_id, image, False

    def rename(self, prompt_id: str) -> None:
        """The server queued the prompt under an id of its own."""
        self._prompt_id = prompt_id

    def text(self, message: str) -> None:
        try:
            frame = json.loads(message)
        except (ValueError, RecursionError):
            return
        data = frame.get("data") if isinstance(frame, dict) and frame.get("type") == "progress" else None
        if not isinstance(data, dict) or self._prompt_id is None or data.get("prompt_id") != self._prompt_id:
            return
        if str(data.get("node")) in self._quiet:
            return
        value, maximum = data.get("value"), data.get("max")
        if _count(value) and _count(maximum) and 0 <= value <= maximum and maximum > 0:
            self._preview_due = self.steps.sampled(self._image, value, maximum)

    def binary(self, message: bytes) -> None:
        # ComfyUI sends a step's preview right after its progress frame: one preview per step told,
        # and none for a prompt not followed (it names no prompt).
        if not self._preview_due:
            return
        self._preview_due = False
        image = _preview(message)
        if image is not None:
            self.steps.preview(image)


def not_samplers(graph: Mapping[str, Any]) -> frozenset[str]:
    """The nodes of a workflow whose progress frames are not a sampler's steps. ComfyUI reports
    the progress of any node that has a bar (a model upscaler's tiles, a tiled VAE): one that ran
    before the sampler set the scale to its own count, and the sampler's steps then never moved it.
    Empty when no node's class names a sampler (a custom node that samples): every frame counts.
    Nodes the graph does not name (expanded at run time) count."""
    kinds = {str(node_id): node.get("class_type") for node_id, node in graph.items() if isinstance(node, dict)}
    samplers = {node_id for node_id, kind in kinds.items() if isinstance(kind, str) and "sampler" in kind.lower()}
    return frozenset(kinds) - samplers if samplers else frozenset()


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _preview(frame: bytes) -> Image.Image | None:
    """The image of a preview frame; None for any other frame, and for an image past the limits."""
    if not 8 < len(frame) <= 8 + PREVIEW_MAX_BYTES or int.from_bytes(frame[:4], "big") != PREVIEW_IMAGE:
        return None
    fmt = PREVIEW_FORMATS.get(int.from_bytes(frame[4:8], "big"))
    if fmt is None:
        return None
    data = frame[8:]
    try:
        # The header first: a small file can declare more pixels than are worth decoding.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=(fmt,)) as header:
                width, height = header.size
        if width * height > PREVIEW_MAX_PIXELS:
            return None
        return decode_image(data, "comfyui")
    except Exception:  # the server's bytes: Pillow's readers raise more kinds than OSError
        return None


def _seed(handle: Mapping[str, Any]) -> int | None:
    seed = handle.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_RANGE else None


def factory(ctx: EngineContext) -> ComfyUIEngine:
    return ComfyUIEngine(ctx)
