"""LLM: the offline Python API, shaped like vLLM's `LLM` so users' habits carry over."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from conserve.config import EngineConfig
from conserve.engine import Engine
from conserve.errors import RequestError
from conserve.outputs import RequestOutput
from conserve.request import RequestClass
from conserve.sampling_params import SamplingParams
from conserve.sched.latency_model import LatencyModel

Prompt = str | dict[str, Any]
Message = dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", **kwargs: Any) -> None:
        # latency_model may be a fitted LatencyModel (handed to the scheduler) or a JSON path (config).
        fitted = kwargs.pop("latency_model") if isinstance(kwargs.get("latency_model"), LatencyModel) else None
        self.engine = Engine(EngineConfig(model=model, dtype=dtype, **kwargs), latency_model=fitted)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, request_class: RequestClass = RequestClass.ONLINE) -> list[RequestOutput]:
        """Each prompt is a string (tokenised without added special tokens unless the tokenizer's own
        config adds them), or {"prompt_token_ids": [...]}, or {"prompt": "..."}."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return self._run([self._prompt(p) for p in prompts], sampling_params, use_tqdm, request_class)

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, chat_template: str | None = None,
             request_class: RequestClass = RequestClass.ONLINE) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = []
        for conversation in conversations:
            text = tok.apply_chat_template(list(conversation), add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template)
            # The template already holds any BOS it wants: do not add special tokens again.
            prompts.append((text, tok.encode(text, add_special_tokens=False)))
        return self._run(prompts, sampling_params, use_tqdm, request_class)

    def _prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return None, list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.engine.tokenizer.encode(prompt["prompt"])
        raise RequestError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}")

    def _run(self, prompts: list[tuple[str | None, list[int]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None, use_tqdm: bool,
             request_class: RequestClass) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise RequestError(f"{len(params)} sampling params for {len(prompts)} prompts")
        engine = self.engine
        ids: list[str] = []
        try:
            for (_, token_ids), p in zip(prompts, params):
                ids.append(engine.next_request_id())
                engine.add_request(ids[-1], token_ids, p, request_class)
        except Exception:
            for request_id in ids:  # all or nothing: one bad prompt rejects the call
                engine.abort_request(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        progress = _Progress(len(ids), enabled=use_tqdm and sys.stderr.isatty())
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out
                    progress.update(out)
        progress.close()
        for (text, _), request_id in zip(prompts, ids):
            results[request_id].prompt = text
        return [results[i] for i in ids]


class _Progress:
    """A one-line progress display on stderr: requests done and generated tokens per second."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.tokens = total, enabled, 0, 0
        self.start = time.perf_counter()

    def update(self, out: RequestOutput) -> None:
        self.done += 1
        self.tokens += sum(len(o.token_ids) for o in out.outputs)
        if self.enabled:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            sys.stderr.write(f"\rrequests {self.done}/{self.total}, {rate:.1f} generated tok/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
