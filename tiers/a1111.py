"""A self-hosted AUTOMATIC1111 / Forge server through its `/sdapi/v1/img2img` API.

The call is synchronous: the POST answers only when every image is made, after any wait in the
server's queue, so its read may take until `ORCH_REMOTE_DEADLINE` (not the read timeout). The job is
sent under a task id of ours (`force_task_id`). While the server runs that task (its UI's
`/internal/progress` tells, which `--nowebui` servers lack; a fork whose `/sdapi/v1/progress` names
the task as a `current_task` string is believed too: A1111's and Forge's response model drops that
field), the progress it reports is ours; on a cancel or a timeout the engine asks it to
`/interrupt` only then, since that endpoint stops whatever the server runs (another client's job,
or another of ours queued on the same server). A job still waiting in the server's queue cannot be
taken out of it: it runs there, and its images are dropped. A server that can tell neither (A1111
or Forge started with `--nowebui`) shows no progress and is never interrupted, and neither is one
whose progress polls have gone unanswered when the job ends: the polls are raced with the render
and the cancel, so a server slow to answer them holds up neither.

Another client's interrupt ends our render early with a 200 and unfinished images, which the
answer does not tell from a finished one: such an image is stored. A 500 (out of memory, NaN in
the VAE; in the webui's error shape, or Forge's bare "Internal Server Error", its API having no
exception handler) is final: re-sending it would re-run the same failure on a shared GPU.

The server is shared, and its loaded checkpoint is whichever a client chose last: with
`ORCH_A1111_CHECKPOINT` set, each render asks for that one (`override_settings`, restored after).
A checkpoint the server does not know is dropped there and the loaded one renders, so the result
names the checkpoint the server reports it rendered with (`sd_model_name`), not the one asked for.
`ORCH_A1111_UPSCALER` is asked for the same way: the webui's "Upscaler for img2img", which enlarges
the draft to a polish's larger size before it is denoised (else a Lanczos resize).

Self-hosted, so it costs no credits; `leaves_machine` is still True: `ORCH_A1111_URL` may point at
any host, and the prompt and pixels go there. Optional HTTP Basic auth (`--api-auth`) comes from
`ORCH_A1111_AUTH` as "user:password".
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from orchestrator.errors import BadEngineInput, Canceled, EngineError, EngineTimeout, EngineUnavailable, NoImage
from tiers._http import (
    GATEWAY_STATUSES,
    RemoteClient,
    SelfHostedEngine,
    answer_json,
    basic_auth_in,
    error_text,
    text_json,
    without_credentials,
)
from tiers._images import b64decode_tolerant, b64encode, decode_image, encode_image
from tiers.base import (
    MAX_MODEL_CHARS,
    MAX_UPSCALER_CHARS,
    CancelToken,
    Capabilities,
    EngineContext,
    Progress,
    RenderedImage,
    RenderRequest,
    RenderResult,
    provider_seed,
    says_out_of_memory,
)

IMG2IMG = "/sdapi/v1/img2img"
UPSCALERS = "/sdapi/v1/upscalers"
# How long the server's list of upscalers is believed: an operator may add one to a running server.
UPSCALERS_SECONDS = 300.0
PROGRESS = "/sdapi/v1/progress"
TASK_PROGRESS = "/internal/progress"
DEFAULT_STEPS = 30
DEFAULT_CFG = 7.0
SAMPLER = "Euler a"
URL_SETTING = "ORCH_A1111_URL"
AUTH_SETTING = "ORCH_A1111_AUTH"
# Progress polls and the interrupt are side calls: they must never hold the job up for long.
SIDE_CALL_TIMEOUT = 5.0
# How long a poll's word on whether the server runs our task is believed: a few polls' worth (one
# a second). Older, the polls since have gone unanswered.
VERDICT_SECONDS = 3.0
# The longest sampler name kept from the server's answer (A1111's are under 30).
MAX_SAMPLER_CHARS = 100


def _json_body(response: httpx.Response) -> Any:
    """The answer's JSON, or None when it is none."""
    try:
        return answer_json(response)
    except ValueError:
        return None


def _json_dict(response: httpx.Response) -> dict[str, Any] | None:
    body = _json_body(response)
    return body if isinstance(body, dict) else None


def _finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number; JSON's NaN and Infinity, a bool and an
    integer past a float's range are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def webui_error(response: httpx.Response) -> bool:
    """Whether the body is the webui's own error shape (`{"error","detail","body","errors"}`, from
    its API's exception handler), not a bare framework's or a proxy's answer."""
    body = _json_dict(response)
    return body is not None and "error" in body and "errors" in body


def processing_failed(response: httpx.Response) -> bool:
    """A 500 to the render: it raised on the server. The webui's API answers its own error body
    then, Forge (whose API installs no exception handler) a bare "Internal Server Error"; either
    way the server ran the render, and sent again, it runs the same failure again. (A side call's
    500, a progress poll's, is retried as ever.)"""
    return response.status_code == 500 and response.request.url.path.endswith(IMG2IMG)


def not_sent_again(response: httpx.Response) -> bool:
    """Answers after which the render is not sent again: the webui's own failure, and a gateway's
    timeout (`GATEWAY_STATUSES`: a reverse proxy whose read timeout is shorter than the render): the webui may still
    be rendering it, and each copy sent would be rendered too."""
    return response.status_code in GATEWAY_STATUSES or processing_failed(response)


def _json_list(response: httpx.Response | None) -> list[Any] | None:
    """A side call's JSON array, or None (no answer, an error, a proxy's page)."""
    body = _json_body(response) if response is not None and response.status_code == 200 else None
    return body if isinstance(body, list) else None


def _json_object(response: httpx.Response | None) -> dict[str, Any] | None:
    """A side call's JSON object, or None (no answer, an error, a proxy's page)."""
    return _json_dict(response) if response is not None and response.status_code == 200 else None


@dataclass
class _Verdict:
    """What one render's progress polls last said: whether the server ran our task (None: no poll
    has answered yet) and when; `asked`: whether a poll was sent at all."""

    ours: bool | None = None
    at: float = 0.0
    asked: bool = False


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise ValueError(f"{AUTH_SETTING} must be 'user:password'")
    return user, password


class A1111Engine(SelfHostedEngine):
    name = "a1111"
    # img2img resizes the draft to width x height, so polish can ask for a larger size.
    capabilities = Capabilities(img2img=True, upscale=True, seeds=True, negative_prompt=True,
                                leaves_machine=True, max_width=2048, max_height=2048, size_multiple=8)

    def __init__(self, ctx: EngineContext, client: RemoteClient | None = None) -> None:
        s = ctx.settings
        self._url = s.a1111_url
        self.concurrency = s.self_hosted_concurrency
        # An env file's stray space would name no checkpoint the server has (and it would render
        # with its loaded one): taken as written without it.
        self._checkpoint = (s.a1111_checkpoint or "").strip() or None
        self._upscaler = s.a1111_upscaler
        # When the server last listed its upscalers, and their names (None: it did not say).
        self._upscalers: tuple[float, frozenset[str] | None] | None = None
        self._auth_given = s.a1111_auth is not None
        self._auth_error: str | None = None
        auth: tuple[str, str] | None = None
        try:
            auth = parse_auth(s.a1111_auth.get_secret_value() if s.a1111_auth else None)
        except ValueError as exc:
            self._auth_error = str(exc)
        # `http://user:password@host:7860` is the server's --api-auth as well (settings refuse it
        # beside ORCH_A1111_AUTH): sent as Basic auth, the address kept without it.
        base_url, in_url = basic_auth_in(self._url) if self._url else (None, None)
        # Seconds between progress polls while the POST runs; tests set it to 0.
        self.poll_interval = 1.0
        self.http = self.self_hosted_client(
            s, client, base_url=base_url, auth=auth or in_url,
            key_setting=(f"the user:password in {URL_SETTING} (the server's --api-auth)" if in_url else
                         f"{AUTH_SETTING} ('user:password' of the server's --api-auth)"),
        )
        self.http.final_answer = not_sent_again

    @property
    def model(self) -> str:
        """What the operator configured, not what the server last rendered with: a job names it
        (and GET /v1/engines lists it) before any render, and one taken from a shared server's
        loaded checkpoint would move with another client's choice. A result's `model` names the
        checkpoint that made it."""
        return self._checkpoint or "a1111"

    @property
    def configured(self) -> bool:
        """Whether the operator set it up (a server, or a setting of its own, given): unavailable
        without any is off by choice; `ORCH_A1111_AUTH` set without the URL is a mistake told at start."""
        return bool(self._url or self._auth_given or self._checkpoint or self._upscaler)

    def availability(self) -> tuple[bool, str | None]:
        if not self._url:
            return False, f"no server: set {URL_SETTING}"
        if self._auth_error:
            return False, self._auth_error
        return True, None

    def _body(self, req: RenderRequest, task_id: str) -> dict[str, Any]:
        assert req.init_image is not None
        # Another client of the shared server may have loaded any checkpoint: ask for ours, and
        # have the server put its own back after (the other clients' renders expect theirs).
        # The upscaler is the webui's "Upscaler for img2img": what enlarges the draft to the size
        # asked before it is denoised (unset on the server, a plain Lanczos resize).
        overrides = {key: value for key, value in (("sd_model_checkpoint", self._checkpoint),
                                                   ("upscaler_for_img2img", self._upscaler)) if value is not None}
        pinned: dict[str, Any] = {"override_settings": overrides,
                                  "override_settings_restore_afterwards": True} if overrides else {}
        return {
            "force_task_id": task_id,
            "init_images": [b64encode(encode_image(req.init_image, fmt="PNG"))],
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "denoising_strength": req.creativity if req.stage == "polish" else req.strength,
            "steps": req.steps or DEFAULT_STEPS,
            # 0 is a guidance scale the API takes (turbo checkpoints): only None means the default.
            "cfg_scale": DEFAULT_CFG if req.guidance_scale is None else req.guidance_scale,
            "width": req.width,
            "height": req.height,
            "seed": req.seed if req.seed is not None else -1,
            "sampler_name": SAMPLER,
            # One image per iteration keeps VRAM at a single image's worth.
            "n_iter": req.n,
            "batch_size": 1,
            # Saving would also make the server prepend a grid image to the answer.
            "save_images": False,
            **pinned,
        }

    async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        ok, reason = self.availability()
        if not ok:
            raise EngineUnavailable(f"a1111: {reason}", details={"engine": self.name})
        if req.init_image is None:
            raise BadEngineInput(f"a1111: the {req.stage} stage needs a draft image",
                                 details={"engine": self.name})
        cancel.raise_if_cancelled(charged="no")
        await self._refuse_unknown_upscaler(req, cancel)
        task_id = f"orch-{uuid.uuid4().hex}"
        body = await asyncio.to_thread(self._body, req, task_id)  # the draft's PNG, off the event loop
        cancel.raise_if_cancelled(charged="no")
        deadline = self.http.new_deadline()
        # Before sending: should this process die mid-render, the next attempt can stop this task.
        progress.provider_request(task_id)
        progress.state("submitted", task_id=task_id)
        post: asyncio.Future[httpx.Response] = asyncio.ensure_future(self.http.request(
            "POST", IMG2IMG, json=body, deadline=deadline,
            timeout=httpx.Timeout(max(deadline - self.http.clock(), 1.0), connect=self.http.client.timeout.connect),
        ))
        verdict = _Verdict()
        try:
            await self._watch(post, task_id, progress, cancel, verdict)
        except Canceled:
            await self._interrupt(task_id, verdict)
            raise Canceled("a1111: the job was canceled", details={"engine": self.name, "task_id": task_id},
                           charged="no") from None
        finally:
            if not post.done():
                post.cancel()
            # Retrieve the outcome so an abandoned request leaves no "never retrieved" warning.
            await asyncio.gather(post, return_exceptions=True)
        try:
            response = post.result()
        except EngineTimeout as exc:
            await self._interrupt(task_id, verdict)
            # Free, so nothing was billed whatever the HTTP layer says of paid providers.
            timed_out = (isinstance(exc.__cause__, httpx.TimeoutException) or "ORCH_REMOTE_DEADLINE" in exc.message
                         or self.http.clock() >= deadline)
            cause = ("the server did not answer before the deadline (ORCH_REMOTE_DEADLINE)" if timed_out
                     else "the connection to the server ended before its answer")
            raise EngineTimeout(
                f"a1111: {cause}; the render is not sent again (its task is stopped if the server still runs it)",
                details={**exc.details, "task_id": task_id}, charged="no",
            ) from None
        if response.status_code in GATEWAY_STATUSES:
            await self._interrupt(task_id, verdict)
        # Decoding, off the event loop, raced against a cancel as the render was: n large images
        # take seconds, which a cancel waited out. The render is over: nothing to interrupt.
        return await cancel.race(asyncio.to_thread(self._result, req, response), charged="no")

    async def _watch(self, post: asyncio.Future[httpx.Response], task_id: str, progress: Progress,
                     cancel: CancelToken, verdict: _Verdict) -> None:
        """Report progress until `post` is done; raise `Canceled` as soon as the token is set.
        What the polls say of our task is kept in `verdict`. Each poll is raced with the render
        and the cancel: one the server is slow to answer (or a proxy holds) is dropped as soon as
        either comes, as awaited it held a cancel up to two side calls' timeouts."""
        while not post.done():
            nap: asyncio.Future[Any] = asyncio.ensure_future(cancel.sleep(self.poll_interval))
            try:
                await asyncio.wait([post, nap], return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not nap.done():
                    nap.cancel()
                await asyncio.gather(nap, return_exceptions=True)
            if not nap.cancelled() and nap.exception() is not None:
                raise Canceled("a1111: the job was canceled", charged="no")
            if post.done():
                break
            verdict.asked = True
            check: asyncio.Future[dict[str, Any] | None] = asyncio.ensure_future(self._running_ours(task_id))
            either: list[asyncio.Future[Any]] = [post, check]
            try:
                await cancel.race(asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED), charged="no")
            finally:
                if not check.done():
                    check.cancel()
                await asyncio.gather(check, return_exceptions=True)
            if check.cancelled():  # the render answered first
                break
            state = check.result()
            verdict.ours, verdict.at = state is not None, self.http.clock()
            if state is not None:
                self._report(progress, state)

    async def _running_ours(self, task_id: str) -> dict[str, Any] | None:
        """The server's progress state while it runs our task; None while it runs something else,
        or when it cannot say which task it runs."""
        body = _json_object(await self._side_call("GET", PROGRESS, params={"skip_current_image": "true"}))
        if body is None:
            return None
        state = body.get("state") if isinstance(body.get("state"), dict) else {}
        current = body.get("current_task")
        if isinstance(current, str):
            return state if current == task_id else None
        # A1111's and Forge's answer has no `current_task` (their response model drops it): their
        # UI's own endpoint knows the task (not under --nowebui).
        task = _json_object(await self._side_call(
            "POST", TASK_PROGRESS, idempotent=True,  # a read, though a POST
            json={"id_task": task_id, "id_live_preview": -1, "live_preview": False}))
        return state if task is not None and task.get("active") is True else None

    async def forget(self, handles: list[dict[str, Any]]) -> None:
        """After a crash, before the job runs again: stop the dead attempt's render if the server
        is still on it. (One still waiting for the server's queue cannot be taken off it.)"""
        for handle in handles:
            if isinstance(handle.get("id"), str):
                await self._interrupt(handle["id"])

    async def _interrupt(self, task_id: str, verdict: _Verdict | None = None) -> None:
        """Stop our render, and nothing else the server runs. `verdict`: what the render's polls
        said of it, taken while recent instead of asking again; without one (after a crash, or a
        render that ended before its first poll) the server is asked."""
        if verdict is not None and verdict.ours is not None and self.http.clock() - verdict.at <= VERDICT_SECONDS:
            ours = verdict.ours
        elif verdict is not None and verdict.asked:
            # The polls go unanswered (a server too busy to, a proxy holding them): asked again,
            # the server held the job's end up as long, and then said nothing. Not knowing what it
            # runs, it is not interrupted, as a server that cannot tell is not: our render runs on
            # for nobody, where /interrupt could stop another client's.
            return
        else:
            ours = await self._running_ours(task_id) is not None
        if ours:
            # Sent as a request that bills nothing (it stops a render): after a cancel, the
            # runner's hook refuses every billable send, and the render went on for nobody.
            await self._side_call("POST", "/sdapi/v1/interrupt", idempotent=True)

    @staticmethod
    def _report(progress: Progress, state: dict[str, Any]) -> None:
        try:
            step, steps = int(state.get("sampling_step", 0)), int(state.get("sampling_steps", 0))
            job_no, job_count = int(state.get("job_no", 0)), int(state.get("job_count", 0))
        except (ValueError, TypeError, OverflowError):  # a fork's null, text or Infinity
            return
        if steps <= 0:
            return
        # With n_iter > 1 the server counts steps per image; report them over the whole job.
        jobs = max(job_count, 1)
        total = steps * jobs
        progress.step(min(min(max(job_no, 0), jobs - 1) * steps + step, total), total)

    async def _refuse_unknown_upscaler(self, req: RenderRequest, cancel: CancelToken) -> None:
        """Raise `EngineUnavailable` when a draft is to be enlarged with `ORCH_A1111_UPSCALER` and
        the server lists no upscaler of that name: the webui falls back to its first one (a plain
        resize) with a line on its own console, and the image's record would name one never used.
        A server that answers without a list (an older fork's 404) is believed to have it."""
        assert req.init_image is not None
        if self._upscaler is None or not self._enlarges(req):
            return
        now = self.http.clock()
        if self._upscalers is None or now - self._upscalers[0] >= UPSCALERS_SECONDS:
            response = await self._side_call("GET", UPSCALERS)
            if response is None or response.status_code not in (200, 404):
                # Down or restarting (a 5xx): asked with the patience the render's request has, as
                # the server it waits for is the one asked. Taken for "no list" and kept 5 minutes,
                # each render meanwhile named an upscaler the webui did not have in its record.
                response = await self.http.request("GET", UPSCALERS, idempotent=True, starts_work=True,
                                                   cancel=cancel, deadline=self.http.new_deadline())
            body = _json_list(response)
            names = None if body is None else frozenset(
                name for item in body if isinstance(item, dict) and isinstance(name := item.get("name"), str)
                and 0 < len(name) <= MAX_UPSCALER_CHARS and name.isprintable())
            if response.status_code not in (200, 404) or (response.status_code == 200 and body is None):
                # A 200 that is no list is a page in front of the server (a proxy's sign-in), not an older fork.
                said = f"HTTP {response.status_code}" + (", not a list" if response.status_code == 200 else "")
                raise EngineUnavailable(
                    f"a1111: the server did not list its upscalers (GET {UPSCALERS}: {said}), "
                    f"so ORCH_A1111_UPSCALER '{self._upscaler}' could not be checked; nothing was sent"[:500],
                    details={"engine": self.name, "status": response.status_code})
            self._upscalers = (now, names or None)
        names = self._upscalers[1]
        if names is not None and self._upscaler not in names:
            listed = ", ".join(sorted(names)[:20])
            error = EngineUnavailable(f"a1111: ORCH_A1111_UPSCALER '{self._upscaler}' is not an upscaler this server "
                                      f"has (it lists: {listed})"[:500],
                                      details={"engine": self.name, "setting": "ORCH_A1111_UPSCALER"})
            # The setting's answer to an enlargement: the server is well for every render that needs
            # none (counted against its circuit, five polishes closed it to every bridge).
            error.engine_fault = False
            raise error

    async def _side_call(self, method: str, url: str, *, idempotent: bool | None = None,
                         **kwargs: Any) -> httpx.Response | None:
        """A best-effort call: its failure must not change the job's outcome."""
        if idempotent is None:
            idempotent = method == "GET"
        try:
            return await self.http.request(method, url, idempotent=idempotent, timeout=SIDE_CALL_TIMEOUT,
                                           deadline=self.http.clock() + SIDE_CALL_TIMEOUT, **kwargs)
        except (EngineError, httpx.HTTPError):
            return None

    def _result(self, req: RenderRequest, response: httpx.Response) -> RenderResult:
        if response.status_code == 404 and webui_error(response):
            # The API answered: something the request names is not on the server (`Sampler not
            # found`). The request's, not the server's: it is not counted against its circuit.
            raise self.http.fail(response, self._error_detail(response))
        if response.status_code == 404:
            # A bare 404 (no API handler answered): the route is not there, the API is off.
            raise EngineUnavailable(
                f"a1111: the server has no {IMG2IMG} (HTTP 404): start it with --api and check {URL_SETTING}",
                details={"engine": self.name, "status": 404},
            )
        if processing_failed(response):
            # A failure of the render on the server, not of our request: another engine may do it.
            detail = self._error_detail(response)
            error = EngineError(f"a1111: the render failed on the server (HTTP 500): {detail}",
                                details={"engine": self.name, "status": 500})
            # Out of memory is the request's size: counted, a project's five large renders would
            # shut the shared server's circuit for every project (and move theirs to paid engines).
            error.engine_fault = not says_out_of_memory(detail)
            raise error
        if response.status_code in GATEWAY_STATUSES:
            raise EngineError(
                f"a1111: a proxy in front of the server answered HTTP {response.status_code} (its timeout shorter "
                "than the render, or the server's answer cut off?); the render is not sent again (its task is "
                "stopped if the server still runs it)", details={"engine": self.name, "status": response.status_code})
        if response.status_code != 200:
            raise self.http.fail(response, self._error_detail(response))
        try:
            body = answer_json(response)
        except ValueError:
            raise EngineError("a1111: the server answered 200 with a body that is not JSON",
                              details={"engine": self.name}) from None
        encoded = body.get("images") if isinstance(body, dict) else None
        if isinstance(encoded, list) and not encoded:  # an empty result, said with a 200 (providers.md)
            raise NoImage("a1111: the server returned no image", details={"engine": self.name})
        if not isinstance(encoded, list):
            raise EngineError("a1111: the server's answer has no list of images", details={"engine": self.name})
        info = self._info(body.get("info"))
        seeds: list[Any] = info["all_seeds"] if isinstance(info.get("all_seeds"), list) else []
        images: list[RenderedImage] = []
        # Extensions (ControlNet) append their maps after the results: keep only the first n.
        for i, data in enumerate(encoded[: req.n]):
            if not isinstance(data, str):
                raise EngineError("a1111: the server returned an image that is not base64 text",
                                  details={"engine": self.name})
            # Some forks answer with a data URI rather than bare base64.
            raw = b64decode_tolerant(data.partition(",")[2] if data.startswith("data:") else data, self.name)
            seed = provider_seed(seeds[i]) if i < len(seeds) else None
            # It renders the size asked: one far larger is not its result (and decoded, a memory bomb).
            images.append(RenderedImage(decode_image(raw, self.name, asked=(req.width, req.height)), seed=seed))
        # What the server says it ran, else what was asked of it: the image's record and its PNG's
        # `parameters` name them, so a value of another kind (text steps, a NaN scale) is not taken.
        steps = info.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            steps = req.steps or DEFAULT_STEPS
        guidance = _finite(info.get("cfg_scale"))
        if guidance is None:
            guidance = DEFAULT_CFG if req.guidance_scale is None else req.guidance_scale
        sampler = self._named(info.get("sampler_name"), MAX_SAMPLER_CHARS, response) or SAMPLER
        # The checkpoint that rendered: a pinned one the server does not have is dropped there
        # (the loaded one renders), and unpinned it is whichever another client loaded last.
        checkpoint = self._named(info.get("sd_model_name"), MAX_MODEL_CHARS, response)
        return RenderResult(
            images=images,
            model=checkpoint or self.model,
            cost_millicredits=0,
            # The denoise sent: a polish's is its creativity (`_body`); img2img has no quality.
            metadata={"checkpoint": checkpoint, "sampler": sampler, "steps": steps, "guidance_scale": guidance,
                      "negative_prompt": req.negative_prompt, "quality": None,
                      "strength": None if req.stage == "polish" else req.strength,
                      "creativity": req.creativity if req.stage == "polish" else None,
                      "upscaler": self._upscaler if self._enlarges(req) else None},
        )

    @staticmethod
    def _enlarges(req: RenderRequest) -> bool:
        """Whether the webui enlarged the draft to the size asked: its img2img upscaler runs only
        then (a smaller or equal size is a plain resize)."""
        assert req.init_image is not None
        return req.width > req.init_image.width or req.height > req.init_image.height

    @staticmethod
    def _named(value: Any, limit: int, response: httpx.Response) -> str | None:
        """A name the server gives (a sampler, a checkpoint) as the image's record and its PNG may
        keep it: text of 1 to `limit` printable characters (what jobs and assets store), with the
        request's credentials taken out as from the server's other text; else None."""
        if not isinstance(value, str):
            return None
        value = without_credentials(value.strip(), response)
        return value if 0 < len(value) <= limit and value.isprintable() else None

    @staticmethod
    def _info(raw: Any) -> dict[str, Any]:
        if isinstance(raw, dict):
            return raw
        try:
            info = text_json(raw) if isinstance(raw, str) else None
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    @staticmethod
    def _error_detail(response: httpx.Response) -> str:
        """`{"error","detail","body","errors"}`: never quote `body`, which echoes our request and
        with it the base64 draft."""
        try:
            body = answer_json(response)
        except ValueError:
            return error_text(response)
        if not isinstance(body, dict):
            return error_text(response)
        detail = body.get("detail") or body.get("errors")
        if detail and not isinstance(detail, str):
            detail = json.dumps(detail)
        error = body.get("error")
        text = ": ".join(str(x) for x in (error if isinstance(error, str) else None, detail) if x)
        return without_credentials(text, response)[:500] or f"HTTP {response.status_code}"


def factory(ctx: EngineContext) -> A1111Engine:
    return A1111Engine(ctx)
