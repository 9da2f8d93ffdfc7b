"""The OpenAI chat and completions endpoints over the AsyncEngine, streamed or whole."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from conserve.async_engine import AsyncEngine, EngineDeadError, EngineRestartingError
from conserve.deltas import Accumulator
from conserve.errors import RequestError
from conserve.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from conserve.request import RequestClass
from conserve.sampling_params import SamplingParams
from conserve.sched.latency_model import prefill_seconds
from conserve.server.admission import Admission, AdmissionLimits, Rejected, Ticket
from conserve.server.errors import APIError, error_body, validation_message, validation_param
from conserve.server.metrics import Metrics
from conserve.server.protocol import CHAT, COMPLETIONS, ChatCompletionRequest, CompletionRequest
from conserve.server.template_sandbox import TemplateSandbox


@dataclass
class _Job:
    """One request as the engine sees it: a tokenised prompt and its sampling parameters."""

    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str | None
    params: SamplingParams
    request_class: RequestClass
    arrival: float = field(default_factory=time.monotonic)
    ticket: Ticket | None = None  # its place among the waiting requests (HTTP requests only)
    deadline: float | None = None  # batch lines: their batch's expires_at (see Request.deadline)


UNTRUSTED_TEMPLATE = ("this request brings its own chat_template, and a template is code: this server runs "
                      "only the model's own templates (by name, or the default) unless it is started with "
                      "--trust-request-chat-template")


class OpenAIServing:
    """trust_request_chat_template: run chat templates that requests bring (vLLM's flag of that name),
    each in a sandbox process limited to chat_template_timeout_s seconds. admission: limits for HTTP
    requests (None: admit all); batch lines (`execute`) bypass them."""

    def __init__(self, engine: AsyncEngine, model_name: str, metrics: Metrics,
                 trust_request_chat_template: bool = False, chat_template_timeout_s: float = 5.0,
                 admission: AdmissionLimits | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.trust_request_chat_template = trust_request_chat_template
        self.template_sandbox = TemplateSandbox(chat_template_timeout_s) if trust_request_chat_template else None
        # Template rendering and tokenisation run here, not on the event loop: a long prompt takes
        # milliseconds to encode, and the loop must keep answering (and streaming) meanwhile.
        self._prompt_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="conserve-prompt")
        self.max_num_batched_tokens = engine.engine.config.max_num_batched_tokens
        self.admission = Admission(admission, self._predict_prefill) if admission is not None else None

    async def aclose(self) -> None:
        if self.template_sandbox is not None:
            await self.template_sandbox.aclose()
        self._prompt_pool.shutdown(wait=False)

    # -- entry points --------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request | None = None):
        jobs = self._admit(await self._chat_jobs(req))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse(self._stream(jobs, "chat.completion.chunk", include_usage, chat=True, echo=False))
        outs = await self._collect(jobs, raw)
        return self._chat_response(jobs, outs)

    async def completion(self, req: CompletionRequest, raw: Request | None = None):
        jobs = self._admit(await self._completion_jobs(req))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse(self._stream(jobs, "text_completion", include_usage, chat=False, echo=req.echo))
        outs = await self._collect(jobs, raw)
        return self._completion_response(jobs, outs, req.echo)

    async def execute(self, endpoint: str, body: dict, deadline: float | None = None) -> tuple[int, dict]:
        """Run one batch line as an offline, non-streaming request; never raises for bad input.
        Raises EngineDeadError when the engine failed (or is restarting) under the request: that is
        no answer for the line, which the batch runner runs again once the engine is back.
        deadline: when its batch should be done (the scheduler serves the earliest first)."""
        try:
            if endpoint == CHAT:
                req = ChatCompletionRequest.model_validate({**body, "stream": False, "service_tier": "flex"})
                jobs = _with_deadline(await self._chat_jobs(req), deadline)
                return 200, self._chat_response(jobs, await self._collect(jobs, None))
            if endpoint == COMPLETIONS:
                req = CompletionRequest.model_validate({**body, "stream": False, "service_tier": "flex"})
                jobs = _with_deadline(await self._completion_jobs(req), deadline)
                return 200, self._completion_response(jobs, await self._collect(jobs, None), req.echo)
            return 400, error_body(400, f"unsupported endpoint {endpoint!r}")
        except ValidationError as e:
            return 400, error_body(400, validation_message(e.errors()), validation_param(e.errors()))
        except APIError as e:
            if isinstance(e.__cause__, EngineDeadError):
                raise e.__cause__ from None
            return e.status, error_body(e.status, e.message, e.param, e.code)

    def cost(self, endpoint: str, body: dict) -> tuple[int, int]:
        """A batch line's (prompt tokens, most output tokens), for its batch's estimate: the prompt as
        the model will see it (chat template applied), the output at max_tokens or the context left.
        Blocking (tokenises): call from a worker thread. Raises for a line that cannot run."""
        if endpoint == CHAT:
            req = ChatCompletionRequest.model_validate({**body, "stream": False})
            if req.chat_template is not None and req.chat_template not in self.tokenizer.chat_templates:
                text = " ".join(str(m.get("content", "")) for m in req.conversation())  # no sandbox here
                counts = [len(self.tokenizer.encode(text, add_special_tokens=False))]
            else:
                counts = [len(self._render_and_encode(req.conversation(), req.add_generation_prompt,
                                                      req.chat_template))]
            max_tokens, n = req.requested_max_tokens(), req.n or 1
        else:
            req = CompletionRequest.model_validate({**body, "stream": False})
            counts = [len(self.tokenizer.encode(p)) if isinstance(p, str) else len(p) for p in req.prompts()]
            max_tokens, n = req.max_tokens, req.n or 1
        prompt = sum(counts)
        out = sum(max_tokens if max_tokens is not None else self.max_model_len - c for c in counts)
        return prompt * n, out * n

    # -- requests in ---------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    async def _off_loop(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._prompt_pool, fn, *args)

    async def _chat_jobs(self, req: ChatCompletionRequest) -> list[_Job]:
        self._check_model(req.model)
        conversation = req.conversation()
        template = req.chat_template
        try:
            if template is not None and template not in self.tokenizer.chat_templates:  # the template itself
                if self.template_sandbox is None:
                    raise APIError(400, UNTRUSTED_TEMPLATE, "chat_template")
                context = self.tokenizer.chat_template_context(conversation, req.add_generation_prompt)
                text = await self.template_sandbox.render(template, context)
                ids = await self._off_loop(self._encode_chat, text)
            else:  # the model's own template: trusted, rendered in-process
                ids = await self._off_loop(self._render_and_encode, conversation, req.add_generation_prompt,
                                           template)
        except ValueError as e:
            raise APIError(400, f"cannot apply the chat template: {e}",
                           "messages" if template is None else "chat_template") from None
        return [self._job(ids, None, req.requested_max_tokens(), req.to_params, req.request_class)]

    def _render_and_encode(self, conversation: list[dict], add_generation_prompt: bool,
                           template: str | None) -> list[int]:
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  chat_template=template)
        return self._encode_chat(text)

    def _encode_chat(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template wrote the specials

    async def _completion_jobs(self, req: CompletionRequest) -> list[_Job]:
        self._check_model(req.model)
        prompts = req.prompts()
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await self._off_loop(lambda: [self.tokenizer.encode(t) for t in texts]) if texts else ())
        jobs = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids, text = next(encoded), prompt
            else:
                ids, text = list(prompt), None
            jobs.append(self._job(ids, text, req.max_tokens, req.to_params, req.request_class))
        return jobs

    def _job(self, ids: list[int], text: str | None, max_tokens: int | None, to_params, request_class) -> _Job:
        try:
            self.engine.prompt_limits.validate(ids)
        except RequestError as e:
            raise APIError(400, str(e), "messages" if text is None else "prompt", "context_length_exceeded"
                           if "max_model_len" in str(e) else None) from None
        if max_tokens is not None and len(ids) + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                           f"prompt has {len(ids)} tokens and max_tokens asks for {max_tokens} more",
                           "max_tokens", "context_length_exceeded")
        params = to_params(max_tokens)
        return _Job(f"req-{uuid.uuid4().hex}", ids, text, params, request_class)

    # -- admission -----------------------------------------------------------------------------
    def _admit(self, jobs: list[_Job]) -> list[_Job]:
        """Turn the request away (503 while the engine is down, 429 when too much is waiting) or give
        each job its ticket."""
        cls = jobs[0].request_class
        try:
            self.engine.check_serving()
        except EngineRestartingError as e:
            self.metrics.rejected.labels(cls.value, "engine_restarting").inc()
            raise _unavailable(e) from None
        except EngineDeadError as e:
            self.metrics.rejected.labels(cls.value, "engine_dead").inc()
            raise _unavailable(e) from None
        if self.admission is not None:
            try:
                tickets = self.admission.admit(cls, [len(j.prompt_token_ids) for j in jobs])
            except Rejected as r:
                self.metrics.rejected.labels(cls.value, r.reason).inc()
                raise APIError(429, r.message, code=r.reason, headers={"Retry-After": r.retry_after_header}) from None
            for job, ticket in zip(jobs, tickets):
                job.ticket = ticket
        return jobs

    def _predict_prefill(self, prompt_tokens: int) -> float | None:
        """Predicted seconds to prefill a prompt alone, chunk by chunk (None: no latency model)."""
        engine = self.engine.engine
        model = engine.latency_model if engine is not None else None
        if model is None:
            return None
        return prefill_seconds(model, prompt_tokens, self.max_num_batched_tokens)

    # -- running -------------------------------------------------------------------------------
    async def _outputs(self, job: _Job) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one job as deltas (see AsyncEngine.generate), recording latency
        metrics on the way; the job leaves the waiting count at its first token."""
        cls = job.request_class.value
        last_time, count = None, 0
        try:
            async for out in self.engine.generate(job.request_id, job.prompt_token_ids, job.params,
                                                  job.request_class, job.deadline):
                now = time.monotonic()
                new = sum(len(o.token_ids) for o in out.outputs)
                if new:
                    if last_time is None:
                        self.metrics.ttft.labels(cls).observe(now - job.arrival)
                        if job.ticket is not None:
                            job.ticket.release()
                    else:
                        self.metrics.tbt.labels(cls).observe(now - last_time)
                    last_time, count = now, count + new
                for o in out.outputs:
                    if o.finish_reason is not None:
                        self.metrics.requests.labels(cls, o.finish_reason).inc()
                if out.finished:
                    self.metrics.e2e.labels(cls).observe(now - job.arrival)
                    self.metrics.prompt_tokens.labels(cls).inc(len(job.prompt_token_ids))
                    self.metrics.generation_tokens.labels(cls).inc(count)
                yield out
        except RequestError as e:
            raise APIError(400, str(e)) from None
        except EngineDeadError as e:  # the cause stays attached: execute() hands it to the batch runner
            raise _unavailable(e) from e
        finally:
            if job.ticket is not None:
                job.ticket.release()

    async def _collect(self, jobs: list[_Job], raw: Request | None) -> list[RequestOutput]:
        async def last(job: _Job) -> RequestOutput:
            whole = Accumulator()
            async for out in self._outputs(job):
                whole.add(out)
            return whole.build()

        task = asyncio.ensure_future(asyncio.gather(*(last(j) for j in jobs)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                if raw is not None and await raw.is_disconnected():
                    task.cancel()  # aborts every job: their generators' finally blocks run
                    raise APIError(499, "client disconnected")
        finally:
            if not task.done():
                task.cancel()

    # -- responses -----------------------------------------------------------------------------
    def _usage(self, jobs: list[_Job], outs: list[RequestOutput]) -> dict:
        return self._usage_of(jobs, sum(len(o.token_ids) for out in outs for o in out.outputs))

    def _usage_of(self, jobs: list[_Job], completion: int) -> dict:
        prompt = sum(len(j.prompt_token_ids) for j in jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chat_response(self, jobs: list[_Job], outs: list[RequestOutput]) -> dict:
        choices = []
        for o in outs[0].outputs:
            choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text, "refusal": None},
                            "logprobs": self._chat_logprobs(o.logprobs) if o.logprobs is not None else None,
                            "finish_reason": o.finish_reason})
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(jobs, outs),
                "service_tier": "flex" if jobs[0].request_class is RequestClass.OFFLINE else "default"}

    def _completion_response(self, jobs: list[_Job], outs: list[RequestOutput], echo: bool) -> dict:
        choices = []
        for i, (job, out) in enumerate(zip(jobs, outs)):
            prefix = self._prompt_text(job) if echo else ""
            for o in out.outputs:
                choices.append({"index": i * job.params.n + o.index, "text": prefix + o.text,
                                "logprobs": self._completion_logprobs(o.logprobs, len(prefix))
                                if o.logprobs is not None else None,
                                "finish_reason": o.finish_reason})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(jobs, outs)}

    def _prompt_text(self, job: _Job) -> str:
        return job.prompt_text if job.prompt_text is not None else self.tokenizer.decode(job.prompt_token_ids)

    def _token_entry(self, token_id: int, logprob: float) -> dict:
        return {"token": self.tokenizer.token_text(token_id), "logprob": logprob,
                "bytes": list(self.tokenizer.token_bytes(token_id))}

    def _chat_logprobs(self, lps: list[TokenLogprobs]) -> dict:
        return {"content": [{**self._token_entry(lp.token_id, lp.logprob),
                             "top_logprobs": [self._token_entry(t, v) for t, v in lp.top]} for lp in lps],
                "refusal": None}

    def _completion_logprobs(self, lps: list[TokenLogprobs], offset: int) -> dict:
        tokens, offsets = [], []
        for lp in lps:
            offsets.append(offset)
            text = self.tokenizer.token_text(lp.token_id)
            tokens.append(text)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.tokenizer.token_text(t): v for t, v in lp.top} for lp in lps],
                "text_offset": offsets}

    # -- streaming -----------------------------------------------------------------------------
    def _sse(self, events: AsyncIterator[dict]) -> StreamingResponse:
        async def body():
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except APIError as e:  # headers are gone: report the error in-band, as OpenAI does
                yield f"data: {json.dumps(error_body(e.status, e.message, e.param, e.code))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(self, jobs: list[_Job], kind: str, include_usage: bool, chat: bool,
                      echo: bool) -> AsyncIterator[dict]:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            event = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": choices}
            # OpenAI's chunk schema allows `"usage": null` on chat chunks only; completion chunks leave it out.
            if include_usage and (chat or usage is not None):
                event["usage"] = usage
            return event

        merged: asyncio.Queue = asyncio.Queue()
        done: set[int] = set()

        async def pump(i: int, job: _Job) -> None:
            try:
                async for out in self._outputs(job):
                    await merged.put((i, out))
            except BaseException as e:  # noqa: BLE001 - delivered to the consumer, which re-raises
                await merged.put((i, e))

        tasks = [asyncio.ensure_future(pump(i, j)) for i, j in enumerate(jobs)]
        chars: dict[tuple[int, int], int] = {}  # (job, choice) -> characters sent (completions' text_offset)
        completion_tokens = 0
        try:
            if chat:
                yield chunk([{"index": c, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for c in range(jobs[0].params.n)])
            elif echo:
                yield chunk([{"index": i * j.params.n + c, "text": self._prompt_text(j), "logprobs": None,
                              "finish_reason": None} for i, j in enumerate(jobs) for c in range(j.params.n)])
            while len(done) < len(jobs):
                i, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                completion_tokens += sum(len(o.token_ids) for o in item.outputs)
                choices = [self._delta(i, jobs[i], o, chars, chat) for o in item.outputs]
                choices = [c for c in choices if c is not None]
                if choices:
                    yield chunk(choices, None)
                if item.finished:
                    done.add(i)
            if include_usage:
                yield chunk([], self._usage_of(jobs, completion_tokens))
        finally:
            for t in tasks:
                t.cancel()

    def _delta(self, i: int, job: _Job, o: CompletionOutput, chars: dict, chat: bool) -> dict | None:
        """One choice of a stream chunk from a delta output (o holds only what is new)."""
        if not o.text and o.finish_reason is None and not o.logprobs:
            return None
        offset = chars.get((i, o.index), 0)
        chars[(i, o.index)] = offset + len(o.text)
        index = i * job.params.n + o.index
        if chat:  # a chat chunk choice's `logprobs` is an object or absent in OpenAI's schema
            choice = {"index": index, "delta": {"content": o.text} if o.text else {},
                      "finish_reason": o.finish_reason}
            if o.logprobs:
                choice["logprobs"] = self._chat_logprobs(o.logprobs)
            return choice
        return {"index": index, "text": o.text,
                "logprobs": self._completion_logprobs(o.logprobs, offset) if o.logprobs else None,
                "finish_reason": o.finish_reason}


def _with_deadline(jobs: list[_Job], deadline: float | None) -> list[_Job]:
    for job in jobs:
        job.deadline = deadline
    return jobs


def _unavailable(e: EngineDeadError) -> APIError:
    headers = None
    if isinstance(e, EngineRestartingError):
        headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
    return APIError(503, str(e), code="engine_unavailable", headers=headers)
