"""`conserve bench serve`: arrival process, trace replay, prompts, metrics, and whole runs against a fake
OpenAI-compatible server (FastAPI on a loopback port) that streams with known delays."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from conserve.bench import BenchConfig, run_benchmark
from conserve.bench.arrivals import arrival_offsets, inter_arrival_gaps
from conserve.bench.client import RequestResult
from conserve.bench.metrics import parse_goodput, percentile, summarize, timeline
from conserve.bench.prompts import WORDS, PromptBuilder, sample_lengths
from conserve.bench.trace import load_trace, parse_timestamp
from conserve.cli import main

FIRST_S = 0.05  # fake server: delay before the first token
STEP_S = 0.005  # and between tokens
FAIL_EVERY = 5  # every 5th online request gets HTTP 500
LINE_S = 0.01  # fake batch: one line completes every 10 ms


# ---------------------------------------------------------------- arrivals


def _cv2(xs: list[float]) -> float:
    return statistics.pvariance(xs) / statistics.fmean(xs) ** 2


def test_poisson_gaps_have_mean_one_over_rate():
    gaps = inter_arrival_gaps(20000, rate=10.0, burstiness=1.0, seed=1)
    assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.03)
    assert _cv2(gaps) == pytest.approx(1.0, rel=0.1)  # exponential gaps


def test_burstiness_changes_variance_not_mean():
    bursty = inter_arrival_gaps(20000, rate=10.0, burstiness=0.25, seed=2)
    steady = inter_arrival_gaps(20000, rate=10.0, burstiness=4.0, seed=2)
    assert statistics.fmean(bursty) == pytest.approx(0.1, rel=0.05)
    assert statistics.fmean(steady) == pytest.approx(0.1, rel=0.03)
    assert _cv2(bursty) == pytest.approx(4.0, rel=0.15)  # Gamma: CV^2 = 1 / shape
    assert _cv2(steady) == pytest.approx(0.25, rel=0.1)


def test_arrivals_are_seeded_cumulative_and_inf_is_all_at_once():
    a = arrival_offsets(50, 5.0, 1.0, seed=7)
    assert a == arrival_offsets(50, 5.0, 1.0, seed=7)
    assert a != arrival_offsets(50, 5.0, 1.0, seed=8)
    assert a[0] == 0.0 and len(a) == 50 and all(x < y for x, y in itertools.pairwise(a))
    assert arrival_offsets(4, math.inf) == [0.0] * 4
    with pytest.raises(ValueError):
        inter_arrival_gaps(3, 0.0)
    with pytest.raises(ValueError):
        inter_arrival_gaps(3, 1.0, burstiness=0.0)


# ---------------------------------------------------------------- trace


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_trace_datetime_timestamps_and_rate_scale(tmp_path):
    path = _write(tmp_path, "azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                  "2023-11-16 18:15:47.1805900,200,20\n"  # out of order on purpose
                  "2023-11-16 18:15:46.6805900,100,10\n"
                  "2023-11-16 18:15:49.6805900,300,30\n")
    rows = load_trace(path)
    assert [r.arrival_s for r in rows] == pytest.approx([0.0, 0.5, 3.0], abs=1e-6)
    assert [(r.input_len, r.output_len) for r in rows] == [(100, 10), (200, 20), (300, 30)]
    fast = load_trace(path, rate_scale=2.0, limit=2, max_input_len=150, max_output_len=15)
    assert [r.arrival_s for r in fast] == pytest.approx([0.0, 0.25], abs=1e-6)
    assert [(r.input_len, r.output_len) for r in fast] == [(100, 10), (150, 15)]


def test_trace_numeric_and_zoned_timestamps(tmp_path):
    path = _write(tmp_path, "num.csv", "timestamp,contexttokens,generatedtokens\n0,5,1\n1.5,6,0\n4,7,2\n")
    rows = load_trace(path, rate_scale=0.5)
    assert [r.arrival_s for r in rows] == pytest.approx([0.0, 3.0, 8.0])
    assert rows[1].output_len == 1  # clipped to at least one token
    assert parse_timestamp("2024-05-10 00:00:01.5+00:00") - parse_timestamp("2024-05-10 00:00:00.009930+00:00") \
        == pytest.approx(1.49007, abs=1e-6)
    assert parse_timestamp("2024-05-10 02:00:00+02:00") == parse_timestamp("2024-05-10 00:00:00")


def test_trace_errors(tmp_path):
    with pytest.raises(ValueError, match="GeneratedTokens"):
        load_trace(_write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens\n0,1\n"))
    with pytest.raises(ValueError, match="line 3"):
        load_trace(_write(tmp_path, "b.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\nyesterday,1,1\n"))
    with pytest.raises(ValueError, match="no rows"):
        load_trace(_write(tmp_path, "c.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"))


# ---------------------------------------------------------------- metrics


def _result(start, chunks, end, prompt, completion, error=None):
    return RequestResult(start=start, end=end, chunk_times=list(chunks), prompt_tokens=prompt,
                         completion_tokens=completion, error=error)


def _hand_made():
    return [_result(0.0, [0.1, 0.2, 0.4], 0.5, 10, 3),  # ttft 100, itl 100 200, tpot 200, e2el 500
            _result(1.0, [1.3, 1.35], 1.4, 20, 2),  # ttft 300, itl 50, tpot 100, e2el 400
            _result(1.5, [], 1.6, None, None, error="HTTP 500: boom"),
            _result(2.0, [2.2], 2.2, 5, 1)]  # ttft 200, no tpot, e2el 200


def test_percentile_is_linear_interpolation():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 100) == 4
    assert percentile([100, 200, 300], 90) == pytest.approx(280)
    assert percentile([], 99) == 0.0


def test_summary_of_hand_made_records():
    s = summarize(_hand_made(), duration_s=4.0, percentiles=[50, 99.9])
    assert (s["completed"], s["failed"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (35, 6)
    assert s["request_throughput"] == 0.75
    assert s["output_throughput"] == 1.5 and s["total_token_throughput"] == 41 / 4
    assert s["online_throughput_tok_s"] == s["total_token_throughput"]
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["std_ttft_ms"] == pytest.approx(statistics.pstdev([100, 200, 300]))
    assert s["p90_ttft_ms"] == pytest.approx(280) and s["p99_ttft_ms"] == pytest.approx(298)
    assert s["p50_ttft_ms"] == pytest.approx(200) and s["p99.9_ttft_ms"] == pytest.approx(299.8)
    assert s["mean_tpot_ms"] == pytest.approx(150) and s["median_tpot_ms"] == pytest.approx(150)
    assert s["mean_itl_ms"] == pytest.approx(350 / 3) and s["median_itl_ms"] == pytest.approx(100)
    assert s["p99_itl_ms"] == pytest.approx(198)
    assert s["mean_e2el_ms"] == pytest.approx(1100 / 3) and s["median_e2el_ms"] == pytest.approx(400)
    assert s["goodput"] is None


def test_goodput_counts_requests_meeting_every_objective():
    records = _hand_made()
    assert summarize(records, 4.0, goodput={"ttft": 250})["goodput"] == 0.5  # ttft 100 and 200
    # the one-token request has no TPOT, which counts as meeting it (as vLLM's 0)
    assert summarize(records, 4.0, goodput={"ttft": 250, "tpot": 150})["goodput"] == 0.25
    assert summarize(records, 4.0, goodput={"e2el": 450})["goodput"] == 0.5
    assert parse_goodput(["ttft:200", "TPOT:50.5", "e2el:0"]) == {"ttft": 200.0, "tpot": 50.5, "e2el": 0.0}
    for bad in ("ttft", "foo:1", "ttft:-1", "ttft:abc"):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput([bad])


def test_timeline_buckets_tokens_per_second():
    records = _hand_made()
    tl = timeline(records[:2], records[3:], t0=0.0, duration_s=2.5, batch_samples=[(0.5, 2), (1.5, 5)],
                  tokens_per_batch_line=10)
    assert [b["t_s"] for b in tl] == [0, 1, 2]
    assert [b["online_tok_s"] for b in tl] == pytest.approx([13, 22, 0])
    assert [b["offline_tok_s"] for b in tl] == pytest.approx([20, 30, 6])


# ---------------------------------------------------------------- prompts


def _tokenizer_file(tmp_path, chars: bool) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    if chars:  # every letter a token: cuts fall inside words
        letters = sorted({c for w in WORDS for c in w})
        tok = Tokenizer(models.BPE({c: i for i, c in enumerate(["[UNK]", *letters])}, [], unk_token="[UNK]"))
    else:
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / ("chars.json" if chars else "words.json")
    tok.save(str(path))
    return str(path)


def test_prompt_without_tokenizer_is_one_word_per_token():
    builder = PromptBuilder()
    text = builder.build(50, random.Random(0))
    words = text.split()
    assert len(words) == 50 and builder.count(text) == 50 and set(words) <= set(WORDS)
    assert text == PromptBuilder().build(50, random.Random(0))
    assert text != builder.build(50, random.Random(1))


@pytest.mark.parametrize("chars", [False, True])
def test_prompt_with_tokenizer_has_exact_length(tmp_path, chars):
    from tokenizers import Tokenizer

    path = _tokenizer_file(tmp_path, chars)
    builder = PromptBuilder(path)
    tok = Tokenizer.from_file(path)
    rng = random.Random(3)
    for n in (1, 7, 37, 200):
        text = builder.build(n, rng)
        assert len(tok.encode(text, add_special_tokens=False).ids) == n
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        PromptBuilder(_write(tmp_path, "bad.json", "{not json"))


def test_length_range_ratio():
    rng = random.Random(0)
    assert sample_lengths(5, 100, 0.0, rng) == [100] * 5
    lengths = sample_lengths(500, 100, 0.5, rng)
    assert min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 20


def test_config_mistakes_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="no such trace"):
        BenchConfig(trace=str(tmp_path / "none.csv")).validate()
    trace = _write(tmp_path, "t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n")
    with pytest.raises(ValueError, match="trace-rate-scale"):
        BenchConfig(trace=trace, request_rate=2.0).validate()
    with pytest.raises(ValueError, match="input-len-range-ratio"):
        BenchConfig(input_len_range_ratio=1.0).validate()
    with pytest.raises(ValueError, match="base-url"):
        BenchConfig(base_url="localhost:8000").validate()


# ---------------------------------------------------------------- fake server


@dataclass
class FakeState:
    bodies: list[dict] = field(default_factory=list)
    online_seen: int = 0
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # id -> (purpose, content)
    batches: dict[str, dict] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)


def _batch_view(b: dict) -> dict:
    done = b["frozen"] if b["frozen"] is not None else min(b["total"], int((time.monotonic() - b["t"]) / LINE_S))
    status = "cancelled" if b["frozen"] is not None else "completed" if done == b["total"] else "in_progress"
    return {"id": b["id"], "object": "batch", "status": status,
            "request_counts": {"total": b["total"], "completed": done, "failed": 0}}


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def generate(request: Request, chat: bool):
        body = await request.json()
        state.bodies.append(body)
        if body.get("model") != "fake-model":
            return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
        if body.get("service_tier") != "flex":
            state.online_seen += 1
            if state.online_seen % FAIL_EVERY == 0:
                return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        n = body["max_tokens"]
        prompt = body["messages"][0]["content"] if chat else body["prompt"]

        def event(choices, usage=None):
            return f"data: {json.dumps({'choices': choices, 'usage': usage})}\n\n"

        async def events():
            await asyncio.sleep(FIRST_S)
            if chat:  # a role-only chunk first, as OpenAI sends: it carries no token
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
            for i in range(n):
                if i:
                    await asyncio.sleep(STEP_S)
                yield event([{"index": 0, "delta": {"content": "tok "}} if chat else {"index": 0, "text": "tok "}])
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n}
            yield event([], usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/files")
    async def upload(request: Request):
        form = await request.form()
        fid = f"file-{len(state.files)}"
        state.files[fid] = (form["purpose"], await form["file"].read())
        return {"id": fid, "object": "file", "purpose": form["purpose"]}

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        body = await request.json()
        bid = f"batch-{len(state.batches)}"
        lines = state.files[body["input_file_id"]][1].decode().splitlines()
        state.batches[bid] = {"id": bid, "t": time.monotonic(), "total": len(lines), "frozen": None,
                              "endpoint": body["endpoint"], "window": body["completion_window"]}
        return _batch_view(state.batches[bid])

    @app.get("/v1/batches/{bid}")
    async def get_batch(bid: str):
        return _batch_view(state.batches[bid])

    @app.post("/v1/batches/{bid}/cancel")
    async def cancel_batch(bid: str):
        b = state.batches[bid]
        b["frozen"] = _batch_view(b)["request_counts"]["completed"]
        state.cancelled.append(bid)
        return _batch_view(b)

    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_server():
    state = FakeState()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def fake(fake_server):
    url, state = fake_server
    state.__init__()  # a fresh request count per test keeps the failure count exact
    return url, state


def _bench(url, tmp_path, *flags):
    out = tmp_path / "report.json"
    rc = main(["bench", "serve", "--base-url", url, "--output", str(out), *flags])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


# ---------------------------------------------------------------- whole runs


def test_online_with_flex_offline_load(fake, tmp_path, capsys):
    url, state = fake
    rc, rep = _bench(url, tmp_path, "--num-prompts", "10", "--request-rate", "100", "--input-len", "8",
                     "--output-len", "6", "--offline-concurrency", "2", "--offline-input-len", "4",
                     "--offline-output-len", "3", "--goodput", "ttft:100000")
    assert rc == 0
    captured = capsys.readouterr()
    assert "Serving Benchmark Result" in captured.out and "Mean TTFT (ms):" in captured.out
    assert "10/10 online" in captured.err and "injected failure" in captured.err  # progress, first errors
    assert (rep["completed"], rep["failed"], len(rep["requests"])) == (8, 2, 10)
    assert rep["model"] == "fake-model"
    ok = [r for r in rep["requests"] if r["error"] is None]
    assert len(ok) == 8
    for r in ok:
        assert r["ttft_ms"] >= FIRST_S * 1e3 * 0.9
        # The fake sends the last token no earlier than FIRST_S + 5 steps after the request; measured from the
        # client's first token the gap can look shorter (a late first read, then a burst of tokens).
        assert r["e2el_ms"] >= (FIRST_S + 5 * STEP_S) * 1e3 * 0.9 and r["e2el_ms"] > r["ttft_ms"]
        assert r["output_tokens"] == 6 and r["prompt_tokens"] == 8  # 8 words, counted by the fake
        assert len(r["itls_ms"]) == 5 and all(x > 0 for x in r["itls_ms"]) and r["tpot_ms"] > 0
    assert all("injected failure" in r["error"] for r in rep["requests"] if r["error"])
    assert rep["mean_ttft_ms"] >= FIRST_S * 1e3 * 0.9 and rep["p99_e2el_ms"] >= rep["median_e2el_ms"]
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "std_ttft_ms",
                "p90_itl_ms", "p90_tpot_ms", "median_itl_ms", "p99_e2el_ms", "duration_s"):
        assert rep[key] > 0, key
    assert rep["goodput"] == pytest.approx(8 / rep["duration_s"])
    assert rep["total_output_tokens"] == 48 and rep["total_input_tokens"] == 64
    assert rep["online_throughput_tok_s"] == pytest.approx(112 / rep["duration_s"])
    # offline: flex requests kept in flight, counted from their usage (4 prompt + 3 generated tokens)
    flex = [b for b in state.bodies if b.get("service_tier") == "flex"]
    assert rep["offline_mode"] == "flex" and rep["offline_completed"] >= 1 and len(flex) >= rep["offline_completed"]
    assert all(b["max_tokens"] == 3 and len(b["prompt"].split()) == 4 for b in flex)
    # ... plus what the ones still running at the end got done: each its prompt and the tokens streamed
    assert rep["offline_partial_tokens"] in (0, 5, 6, 7, 10, 11, 12, 13, 14)  # 0-2 requests, 4 + 1-3 each
    assert rep["offline_throughput_tok_s"] == pytest.approx((rep["offline_completed"] * 7 + rep["offline_partial_tokens"])
                                                            / rep["duration_s"])
    assert rep["total_throughput_tok_s"] == pytest.approx(rep["online_throughput_tok_s"]
                                                          + rep["offline_throughput_tok_s"])
    online = [b for b in state.bodies if "service_tier" not in b]
    assert len(online) == 10
    assert all(b["ignore_eos"] is True and b["stream"] is True and b["stream_options"] == {"include_usage": True}
               and b["max_tokens"] == 6 for b in online)
    assert len({b["prompt"] for b in online}) == 10  # distinct prompts
    tl = rep["timeline"]
    assert len(tl) == math.ceil(rep["duration_s"])
    assert sum(b["online_tok_s"] for b in tl) == pytest.approx(112)
    assert sum(b["offline_tok_s"] for b in tl) == pytest.approx(rep["offline_completed"] * 7)


def test_offline_requests_cut_off_by_the_end_count_the_work_they_got_done(fake, tmp_path):
    """Flex requests far longer than the online run: none completes, yet the prompt and the streamed
    tokens of each one that had started generating count as offline throughput."""
    url, state = fake
    rc, rep = _bench(url, tmp_path, "--num-prompts", "4", "--request-rate", "100", "--input-len", "8",
                     "--output-len", "40", "--offline-concurrency", "2", "--offline-input-len", "4",
                     "--offline-output-len", "1000")
    assert rc == 0
    assert rep["offline_completed"] == 0 and rep["offline_failed"] == 0  # cancelled is not failed
    # The online run lasts >= FIRST_S + 39 steps: both flex streams had their first token and more.
    assert rep["offline_partial_tokens"] >= 2 * (4 + 2)
    assert rep["offline_partial_tokens"] <= 2 * (4 + 1000)
    assert rep["offline_throughput_tok_s"] == pytest.approx(rep["offline_partial_tokens"] / rep["duration_s"])


def test_chat_endpoint_through_python_api(fake):
    url, state = fake
    config = BenchConfig(base_url=url, model="fake-model", endpoint="chat", num_prompts=6, input_len=5,
                         output_len=4, quiet=True)
    rep = asyncio.run(run_benchmark(config))
    assert (rep["completed"], rep["failed"]) == (5, 1)
    assert all("messages" in b and "prompt" not in b for b in state.bodies)
    for r in rep["requests"]:
        if r["error"] is None:  # the role-only chunk is not a token
            assert r["output_tokens"] == 4 and len(r["itls_ms"]) == 3 and r["ttft_ms"] >= FIRST_S * 1e3 * 0.9


def test_offline_batch_mode(fake, tmp_path):
    url, state = fake
    rc, rep = _bench(url, tmp_path, "--num-prompts", "8", "--request-rate", "100", "--input-len", "6",
                     "--output-len", "5", "--offline-batch", "--offline-batch-size", "500", "--offline-input-len",
                     "12", "--offline-output-len", "7", "--offline-batch-poll", "0.02", "--percentiles", "50,99.9",
                     "--quiet")
    assert rc == 0 and rep["p50_ttft_ms"] > 0 and rep["p99.9_e2el_ms"] >= rep["p99_e2el_ms"] > 0
    assert (rep["completed"], rep["failed"]) == (7, 1)
    (purpose, content), = state.files.values()
    assert purpose == "batch"
    lines = [json.loads(x) for x in content.decode().splitlines()]
    assert len(lines) == 500 and len({x["custom_id"] for x in lines}) == 500
    assert all(x["url"] == "/v1/completions" and x["body"]["max_tokens"] == 7 and "stream" not in x["body"]
               and len(x["body"]["prompt"].split()) == 12 for x in lines)
    (batch,) = state.batches.values()
    assert batch["endpoint"] == "/v1/completions" and batch["window"] == "24h"
    assert state.cancelled == [batch["id"]] and rep["offline_batch_id"] == batch["id"]
    assert rep["offline_mode"] == "batch" and 1 <= rep["offline_completed"] <= batch["frozen"]
    assert rep["offline_throughput_tok_s"] == pytest.approx(rep["offline_completed"] * 19 / rep["duration_s"])
    assert sum(b["offline_tok_s"] for b in rep["timeline"]) == pytest.approx(rep["offline_completed"] * 19)
    assert not [b for b in state.bodies if b.get("service_tier") == "flex"]


def test_trace_replay(fake, tmp_path):
    url, _ = fake
    trace = _write(tmp_path, "trace.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                   "0,5,4\n0.2,7,9\n0.4,3,2\n0.6,20,3\n")
    rc, rep = _bench(url, tmp_path, "--trace", trace, "--trace-rate-scale", "2", "--max-output-len", "5",
                     "--max-input-len", "10", "--quiet")
    assert rc == 0 and (rep["completed"], rep["failed"]) == (4, 0)
    assert [r["output_tokens"] for r in rep["requests"]] == [4, 5, 2, 3]
    assert [r["prompt_tokens"] for r in rep["requests"]] == [5, 7, 3, 10]
    planned = [0.0, 0.1, 0.2, 0.3]  # gaps divided by the scale
    assert all(r["arrival_s"] >= p - 0.005 for r, p in zip(rep["requests"], planned))
    assert rep["duration_s"] >= 0.3


def test_every_request_failing_is_reported_not_raised(fake, tmp_path, capsys):
    url, _ = fake
    rc, rep = _bench(url, tmp_path, "--model", "other-model", "--num-prompts", "3", "--input-len", "2",
                     "--output-len", "2", "--quiet")
    assert rc == 1 and (rep["completed"], rep["failed"]) == (0, 3)
    assert rep["errors"] == ["HTTP 404: no such model"]
    assert "no such model" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--goodput", "ttft=5"], "bad --goodput"),
    (["--trace", "/nonexistent/trace.csv"], "no such trace file"),
    (["--request-rate", "0"], "--request-rate must be > 0"),
])
def test_bad_input_is_one_line_exit_2(fake, tmp_path, capsys, flags, message):
    url, state = fake
    rc, rep = _bench(url, tmp_path, "--quiet", *flags)
    assert rc == 2 and rep is None and not state.bodies
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unreachable_server_is_one_line_exit_2(tmp_path, capsys):
    rc, rep = _bench(f"http://127.0.0.1:{_free_port()}", tmp_path, "--num-prompts", "2", "--quiet")
    assert rc == 2 and rep is None
    err = capsys.readouterr().err
    assert "cannot reach" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
