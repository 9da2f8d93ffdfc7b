"""`conserve bench coserve`: target checks on hand-made numbers, the systems' command lines, server
start/stop, and whole runs over fake OpenAI-compatible servers (tests/fake_openai_server.py, loopback)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conserve.bench import coserve as coserve_mod
from conserve.bench.calibrate import CalibrationError, burst_config, calibration_from
from conserve.bench.compare import SystemResult, check_targets, format_comparison, format_targets
from conserve.bench.config import BenchConfig
from conserve.bench.coserve import options_from_args, run_coserve
from conserve.bench.coserve_options import CoserveOptions
from conserve.bench.offline import offline_body
from conserve.bench.prompts import PromptBuilder
from conserve.bench.servers import ServerError, ServerProcess, ServerSpec, free_port
from conserve.bench.sweep import SWEEP_SYSTEMS, expand_sweep, parse_number_list, variant
from conserve.bench.systems import (
    SYSTEMS,
    CoserveWorkload,
    LaunchContext,
    NotRunnable,
    System,
    conserve_launch,
    select_systems,
    vllm_launch,
)
from conserve.bench.tradeoff import format_tradeoff, tradeoff_points
from conserve.bench.workload import build_workload
from conserve.cli import build_parser, main
from conserve.machine import machine_info

FAKE = str(Path(__file__).with_name("fake_openai_server.py"))
VLLM_KEYS = ("p99_ttft_ms", "p99_tpot_ms", "p99_itl_ms", "mean_ttft_ms", "median_ttft_ms", "median_itl_ms",
             "mean_tpot_ms", "p90_e2el_ms", "request_throughput", "output_throughput", "total_token_throughput",
             "completed", "failed", "offline_throughput_tok_s", "total_throughput_tok_s", "online_throughput_tok_s")


# ---------------------------------------------------------------- targets on hand-made numbers


def _s(ttft=100.0, itl=20.0, tpot=25.0, online=100.0, offline=0.0) -> dict:
    return {"p99_ttft_ms": ttft, "p99_itl_ms": itl, "p99_tpot_ms": tpot, "mean_ttft_ms": ttft / 2,
            "online_throughput_tok_s": online, "offline_throughput_tok_s": offline,
            "total_throughput_tok_s": online + offline, "failed": 0}


def _all_pass() -> dict[str, dict]:
    return {"online-only": _s(100, 20, 25, 100), "non-preemptive": _s(900, 90, 90, 90, 480),
            "conserve": _s(110, 22, 40, 100, 400), "vllm-priority": _s(400, 30, 30, 100, 350)}


def _status(targets) -> dict[str, str]:
    return {t.key: t.status for t in targets}


def test_targets_all_pass_with_ratios():
    targets = check_targets(_all_pass())
    assert _status(targets) == {"latency": "PASS", "offline": "PASS", "total": "PASS", "vs-vllm": "PASS"}
    by = {t.key: t for t in targets}
    assert by["latency"].values["ttft_ratio"] == pytest.approx(1.1)
    assert by["latency"].values["tpot_ratio"] == pytest.approx(1.6)  # TPOT is shown, not required
    assert by["offline"].values["ratio"] == pytest.approx(400 / 480)
    assert by["total"].values["ratio"] == pytest.approx(5.0)
    assert by["vs-vllm"].values["ttft_gain"] == pytest.approx(400 / 110)
    text = format_targets(targets)
    assert text.count("PASS") == 4 and "110.0 vs 100.0 ms (1.10x)" in text and "400.0 vs 480.0 tok/s (83%)" in text


@pytest.mark.parametrize("system,change,missed", [
    ("conserve", {"p99_ttft_ms": 121.0}, "latency"),  # 1.21x TTFT
    ("conserve", {"p99_itl_ms": 24.5}, "latency"),  # 1.225x ITL
    ("conserve", {"offline_throughput_tok_s": 383.0, "total_throughput_tok_s": 483.0}, "offline"),  # 79.8%
    ("online-only", {"total_throughput_tok_s": 251.0}, "total"),  # conserve 500 < 2 x 251
    ("vllm-priority", {"p99_ttft_ms": 320.0}, "vs-vllm"),  # only 2.9x lower
    ("vllm-priority", {"total_throughput_tok_s": 501.0}, "vs-vllm"),  # 3.6x lower but less throughput
])
def test_each_target_can_miss(system, change, missed):
    summaries = _all_pass()
    summaries[system] = summaries[system] | change
    statuses = _status(check_targets(summaries))
    assert statuses[missed] == "MISS"
    assert [k for k, v in statuses.items() if v != "PASS"] == [missed]


def test_targets_at_their_exact_limits_pass():
    s = _all_pass()
    s["conserve"] = _s(120, 24, 99, 200, 384)  # 1.2x, 1.2x, 80%, total 584 >= 2 x 100
    s["vllm-priority"] = _s(360, 1, 1, 484, 100)  # 3x, total 584 == 584
    assert set(_status(check_targets(s)).values()) == {"PASS"}


def test_targets_not_evaluated_without_their_systems_or_samples():
    targets = check_targets({"conserve": _s(), "online-only": _s()})
    assert _status(targets) == {"latency": "PASS", "offline": "not evaluated", "total": "MISS",
                                "vs-vllm": "not evaluated"}
    assert "no results for non-preemptive" in targets[1].detail
    assert set(_status(check_targets({})).values()) == {"not evaluated"}
    assert "conserve, online-only" in check_targets({})[0].detail
    zero = _all_pass()
    zero["online-only"] = _s(0, 0, 0, 0)
    zero["non-preemptive"] = _s(offline=0)
    assert _status(check_targets(zero)) == {"latency": "not evaluated", "offline": "not evaluated",
                                            "total": "not evaluated", "vs-vllm": "PASS"}


def test_comparison_table_rows():
    ok = SystemResult("conserve", "d", "ok", summary=_s(110.26, 22, 40, 100, 400) | {"failed": 2, "offline_failed": 1})
    out = format_comparison([ok, SystemResult("vllm-priority", "d", "not run", "no vLLM at x\nmore"),
                             SystemResult("crash", "d", "failed", "server exited with code 3")])
    lines = out.splitlines()
    assert "p99 TTFT ms" in lines[0] and "total tok/s" in lines[0] and "failed" in lines[0]
    assert lines[2].split()[:2] == ["conserve", "110.3"] and lines[2].split()[-1] == "2+1off"
    assert "500.0" in lines[2]
    assert lines[3].split(None, 1) == ["vllm-priority", "not run: no vLLM at x"]
    assert "failed: server exited with code 3" in lines[4]


def test_bench_imports_neither_torch_nor_matplotlib():
    code = ("import sys, conserve.cli, conserve.bench.coserve, conserve.bench.plots; "
            "print(sorted({'torch', 'matplotlib'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- systems and workload


def _ctx(tmp_path, **kw) -> LaunchContext:
    return LaunchContext(port=1234, data_dir=str(tmp_path / "d"), log_path=str(tmp_path / "l.log"), **kw)


def test_system_selection():
    assert [s.name for s in select_systems(None)] == list(SYSTEMS)
    assert list(SYSTEMS)[:3] == ["online-only", "non-preemptive", "conserve"] and len(SYSTEMS) == 14
    assert [s.name for s in select_systems("conserve, online-only,conserve")] == ["conserve", "online-only"]
    with pytest.raises(ValueError, match="unknown system.*nope"):
        select_systems("conserve,nope")


def test_conserve_command_lines(tmp_path):
    spec = conserve_launch(SYSTEMS["non-preemptive"], _ctx(tmp_path, conserve_args=["--latency-model", "m.json"]))
    assert spec.argv[:4] == [sys.executable, "-m", "conserve.cli", "serve"]
    assert spec.argv[4:] == ["--host", "127.0.0.1", "--port", "1234", "--data-dir", str(tmp_path / "d"),
                             "--scheduler", "priority", "--preemption", "iteration", "--offline-kv", "recompute",
                             "--max-num-batched-tokens", "4096", "--latency-model", "m.json"]
    assert spec.ready_timeout_s == 300 and spec.base_url == "http://127.0.0.1:1234"
    expected = {"online-only": [], "conserve": [], "fcfs": ["--scheduler", "fcfs"],
                "priority": ["--scheduler", "priority"], "sarathi": ["--scheduler", "sarathi"],
                "iteration-preemption": ["--preemption", "iteration"], "recompute": ["--offline-kv", "recompute"],
                "layer-restart": ["--preemption", "layer-restart"], "fixed-margin": ["--tbt-quantile", "off"]}
    for name, args in expected.items():
        assert conserve_launch(SYSTEMS[name], _ctx(tmp_path, server_timeout_s=5)).argv[10:] == args, name
    assert [n for n, s in SYSTEMS.items() if not s.offline] == ["online-only", "vllm-online-only"]


def test_vllm_command_lines_and_missing_pieces(tmp_path):
    with pytest.raises(NotRunnable, match="no vLLM at .*setup_vllm_venv.sh"):
        vllm_launch(SYSTEMS["vllm-priority"], _ctx(tmp_path, vllm_venv=str(tmp_path / "venv")))
    exe = tmp_path / "venv" / "bin" / "vllm"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    hf = tmp_path / "SmolLM2"
    ctx = _ctx(tmp_path, vllm_venv=str(tmp_path / "venv"), hf_dir=str(hf))
    with pytest.raises(NotRunnable, match="no HF model directory.*export_hf_dir.py"):
        vllm_launch(SYSTEMS["vllm-priority"], ctx)
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    spec = vllm_launch(SYSTEMS["vllm-priority"], ctx)
    assert spec.argv == [str(exe), "serve", str(hf), "--host", "127.0.0.1", "--port", "1234", "--dtype", "bfloat16",
                         "--served-model-name", "SmolLM2", "--scheduling-policy", "priority"]
    assert spec.env == {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                        "VLLM_TARGET_DEVICE": "cpu", "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    assert spec.ready_timeout_s == 600
    assert "--scheduling-policy" not in vllm_launch(SYSTEMS["vllm-online-only"], ctx).argv


def test_same_workload_for_every_system_and_offline_marking():
    wl = CoserveWorkload()
    assert wl.num_prompts == 72
    configs = {n: wl.bench_config(s, "http://h:1", None) for n, s in SYSTEMS.items()}
    first = build_workload(configs["conserve"], PromptBuilder())
    for name, cfg in configs.items():
        assert build_workload(cfg, PromptBuilder()) == first, name
        assert cfg.offline_concurrency == (0 if name.endswith("online-only") else 16), name
    vp = configs["vllm-priority"]
    body = offline_body(vp, "m", "a b c")
    assert body["priority"] == 10 and "service_tier" not in body and body["max_tokens"] == 128
    body = offline_body(configs["conserve"], "m", "a b c")
    assert body["service_tier"] == "flex" and "priority" not in body
    assert "service_tier" not in offline_body(BenchConfig(), "m", "x", stream=False)  # batch lines, as before


def _opts(*argv: str) -> CoserveOptions:
    return options_from_args(build_parser().parse_args(["bench", "coserve", *argv]))


def test_options_quick_and_overrides():
    default = _opts()
    assert (default.workload.duration_s, default.workload.offline_concurrency) == (120, 16)
    assert default.output_dir == "results" and default.server_timeout_s is None
    quick = _opts("--quick")
    assert (quick.workload.duration_s, quick.workload.offline_concurrency, quick.workload.num_prompts) == (40, 8, 24)
    mixed = _opts("--quick", "--duration", "10", "--conserve-arg=--latency-model /tmp/m.json",
                  "--conserve-arg=--kv-cache-gb=2")
    assert (mixed.workload.duration_s, mixed.workload.offline_concurrency) == (10, 8)
    assert mixed.conserve_args == ["--latency-model", "/tmp/m.json", "--kv-cache-gb=2"]


# ---------------------------------------------------------------- servers


def _spec(tmp_path, argv, timeout=20.0) -> ServerSpec:
    port = free_port()
    return ServerSpec([a.replace("{port}", str(port)) for a in argv], port, str(tmp_path / "s.log"), timeout)


def test_server_exits_before_ready(tmp_path):
    server = ServerProcess(_spec(tmp_path, [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]))
    with pytest.raises(ServerError, match="(?s)exited with code 3.*boom"):
        server.wait_ready()
    server.stop()


def test_server_ready_timeout_and_sigkill(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('stubborn', flush=True); " \
           "time.sleep(60)"
    server = ServerProcess(_spec(tmp_path, [sys.executable, "-c", code], timeout=1.0))
    with pytest.raises(ServerError, match="(?s)not ready after 1 s.*stubborn"):
        server.wait_ready()
    server.stop(grace_s=0.5)  # SIGTERM is ignored: SIGKILL
    assert server.proc.returncode == -9


def test_fake_server_ready_and_stopped(tmp_path):
    server = ServerProcess(_spec(tmp_path, [sys.executable, FAKE, "--port", "{port}"]))
    try:
        assert server.wait_ready() < 20
        assert httpx.get(f"{server.spec.base_url}/v1/models").json()["data"][0]["id"] == "fake-model"
    finally:
        server.stop()
    assert server.proc.returncode is not None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server.spec.base_url}/health", timeout=1)


# ---------------------------------------------------------------- whole runs over fake servers


def _fake(record_dir: Path, *flags: str):
    def launch(system: System, ctx: LaunchContext) -> ServerSpec:
        argv = [sys.executable, FAKE, "--port", str(ctx.port), "--record", str(record_dir / f"{system.name}.jsonl"),
                *flags]
        return ServerSpec(argv, ctx.port, ctx.log_path, ctx.server_timeout_s or 20.0)
    return launch


def _crash(system: System, ctx: LaunchContext) -> ServerSpec:
    argv = [sys.executable, "-c", "print('boom: no model'); raise SystemExit(3)"]
    return ServerSpec(argv, ctx.port, ctx.log_path, 20.0)


def _bodies(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


RUN_FLAGS = ("--duration", "3", "--request-rate", "4", "--input-len", "8", "--input-len-range-ratio", "0.5",
             "--output-len", "4", "--offline-concurrency", "2", "--offline-input-len", "16",
             "--offline-output-len", "8")


def test_coserve_over_fake_servers(tmp_path, capsys):
    out = tmp_path / "results"
    opts = _opts("--output-dir", str(out), "--vllm-venv", str(tmp_path / "no-venv"), "--hf-dir",
                 str(tmp_path / "no-hf"), *RUN_FLAGS)
    fast, slow = _fake(tmp_path), _fake(tmp_path, "--slow-offline")
    systems = [dataclasses.replace(SYSTEMS["online-only"], launch=fast),
               dataclasses.replace(SYSTEMS["non-preemptive"], launch=fast),
               dataclasses.replace(SYSTEMS["conserve"], launch=slow),  # offline 20x slower: misses its target
               System("crash", "exits at once", _crash),
               SYSTEMS["vllm-online-only"],  # the real launcher: no venv here
               dataclasses.replace(SYSTEMS["vllm-priority"], launch=fast)]
    assert run_coserve(opts, systems) == 0
    captured = capsys.readouterr()
    assert "p99 TTFT ms" in captured.out and "Targets:" in captured.out
    assert "[3/6] conserve: starting" in captured.err and "[6/6] vllm-priority: done, ok" in captured.err
    lines = captured.out.splitlines()
    assert lines[0].startswith("Machine: ") and lines[1] == "Online load 4 req/s (fixed: --request-rate)"
    table = {line.split()[0]: line for line in lines[4:10]}
    assert "failed: server exited with code 3" in table["crash"]
    assert "not run: no vLLM at" in table["vllm-online-only"]

    rep = json.loads((out / "coserve.json").read_text())
    names = [s.name for s in systems]
    assert list(rep["systems"]) == names
    ran = ["online-only", "non-preemptive", "conserve", "vllm-priority"]
    assert [n for n, s in rep["systems"].items() if s["status"] == "ok"] == ran
    for name in ran:
        s = rep["systems"][name]
        for key in VLLM_KEYS:
            assert isinstance(s[key], (int, float)), (name, key)
        assert s["completed"] == 12 and s["failed"] == 0 and s["p99_ttft_ms"] >= 20
        assert s["server_command"][:2] == [sys.executable, FAKE]
        assert s["report_file"] == str(out / f"coserve_{name}.json")
    assert rep["systems"]["online-only"]["offline_throughput_tok_s"] == 0
    assert rep["systems"]["non-preemptive"]["offline_throughput_tok_s"] > 0
    crash = rep["systems"]["crash"]
    assert crash["status"] == "failed" and "exited with code 3" in crash["error"] and "boom: no model" in crash["error"]
    assert crash["log_file"] == str(out / "logs" / "coserve_crash.log")
    assert Path(crash["log_file"]).read_text().startswith("boom")
    vo = rep["systems"]["vllm-online-only"]
    assert vo["status"] == "not run" and "setup_vllm_venv.sh" in vo["error"] and "p99_ttft_ms" not in vo

    # the targets in the file are the ones computed from the summaries in the file
    ok = {n: s for n, s in rep["systems"].items() if s["status"] == "ok"}
    assert rep["targets"] == [dataclasses.asdict(t) for t in check_targets(ok)]
    by = {t["key"]: t for t in rep["targets"]}
    assert by["offline"]["status"] == "MISS" and by["offline"]["values"]["ratio"] < 0.6
    assert by["vs-vllm"]["status"] in ("PASS", "MISS") and by["latency"]["status"] in ("PASS", "MISS")
    assert f"{by['offline']['status']:<13} {by['offline']['title']}" in captured.out
    assert rep["machine"]["cpu_count"] == os.cpu_count() and rep["machine"]["platform"]
    assert rep["workload"]["num_prompts"] == 12 and rep["workload"]["duration_s"] == 3
    assert rep["command_line"] and isinstance(rep["argv"], list)

    # full reports: the same prompts (lengths counted by the fake) for every system
    reports = {n: json.loads((out / f"coserve_{n}.json").read_text()) for n in ran}
    lengths = {n: [r["prompt_tokens"] for r in rep_["requests"]] for n, rep_ in reports.items()}
    assert len(set(map(tuple, lengths.values()))) == 1 and len(set(lengths["conserve"])) > 1
    assert reports["conserve"]["timeline"] and reports["conserve"]["offline_completed"] > 0
    # offline requests are marked for each server: flex for conserve, priority 10 (no tier) for vLLM
    conserve_off = [b for b in _bodies(tmp_path / "conserve.jsonl") if b.get("service_tier") == "flex"]
    assert conserve_off and all("priority" not in b for b in conserve_off)
    vllm_bodies = _bodies(tmp_path / "vllm-priority.jsonl")
    vllm_off = [b for b in vllm_bodies if b.get("priority") == 10]
    assert vllm_off and all("service_tier" not in b for b in vllm_bodies)
    assert len(vllm_bodies) - len(vllm_off) == 12 + 2  # online requests + the two warm-up ones
    assert not any(b.get("service_tier") for b in _bodies(tmp_path / "online-only.jsonl"))

    pngs = [out / f"coserve_{p}.png" for p in ("latency_cdf", "throughput", "timeline")]
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in captured.err
    else:
        assert rep["plots"] == [str(p) for p in pngs]
        for p in pngs:
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10000


def test_cli_vllm_rows_not_run_without_venv(tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["bench", "coserve", "--systems", "vllm-online-only,vllm-priority", "--vllm-venv",
               str(tmp_path / "none"), "--output-dir", str(out), "--duration", "3"])
    assert rc == 1  # nothing ran
    captured = capsys.readouterr()
    assert captured.out.count("not run: no vLLM at") == 2 and "no system ran: no plots" in captured.err
    rep = json.loads((out / "coserve.json").read_text())
    assert {n: s["status"] for n, s in rep["systems"].items()} == {"vllm-online-only": "not run",
                                                                    "vllm-priority": "not run"}
    assert {t["status"] for t in rep["targets"]} == {"not evaluated"}
    assert rep["argv"] == sys.argv and not list(out.glob("*.png"))
    assert main(["bench", "coserve", "--systems", "nope", "--output-dir", str(out)]) == 2
    assert "unknown system" in capsys.readouterr().err


def test_ctrl_c_stops_the_server_and_keeps_results(tmp_path, monkeypatch, capsys):
    urls = []

    async def interrupted(config):
        urls.append(config.base_url)
        raise KeyboardInterrupt

    monkeypatch.setattr(coserve_mod, "run_benchmark", interrupted)
    systems = [dataclasses.replace(SYSTEMS["conserve"], launch=_fake(tmp_path)), SYSTEMS["online-only"]]
    out = tmp_path / "r"
    assert run_coserve(_opts("--output-dir", str(out), *RUN_FLAGS), systems) == 130
    with pytest.raises(httpx.HTTPError):  # the fake server is gone
        httpx.get(f"{urls[0]}/health", timeout=1)
    rep = json.loads((out / "coserve.json").read_text())
    assert rep["systems"]["conserve"]["status"] == "interrupted"
    assert rep["systems"]["online-only"] == rep["systems"]["online-only"] | {"status": "not run",
                                                                              "error": "interrupted"}
    assert "interrupted" in capsys.readouterr().err


# ---------------------------------------------------------------- machine-calibrated load


def test_calibration_rate_is_the_fraction_of_the_burst_throughput():
    res = SystemResult("calibration", "d", "ok", summary={"request_throughput": 2.5, "failed": 1}, log_path="c.log")
    cal = calibration_from(res, 0.4, 48)
    assert (cal.capacity_req_s, cal.request_rate, cal.burst_requests, cal.failed) == (2.5, 1.0, 48, 1)
    assert cal.describe() == ("online load 1.000 req/s = 0.4 x measured capacity 2.500 req/s (online-only, burst of "
                              "48 online requests, 1 failed)")
    with pytest.raises(CalibrationError, match="online capacity: online-only failed: boom"):
        calibration_from(SystemResult("calibration", "d", "failed", "boom"), 0.5, 48)


def test_burst_has_the_workload_shapes_all_at_once_without_offline_load():
    wl = CoserveWorkload(input_len=100, output_len=7, input_len_range_ratio=0.3, seed=5)
    cfg = burst_config(wl, SYSTEMS["conserve"], "http://h:1", None, 30)
    assert (cfg.num_prompts, cfg.request_rate, cfg.offline_concurrency) == (30, None, 0)
    assert (cfg.input_len, cfg.output_len, cfg.input_len_range_ratio, cfg.seed) == (100, 7, 0.3, 5)
    assert {r.arrival_s for r in build_workload(cfg, PromptBuilder())} == {0.0}


def test_load_fraction_options():
    assert _opts().load_fraction is None and _opts().workload.request_rate == 0.6
    assert _opts("--load-fraction").load_fraction == 0.5  # the flag alone: half the capacity
    assert _opts("--load-fraction", "0.7", "--calibration-requests", "9").load_fraction == 0.7
    assert _opts("--calibration-requests", "9").calibration_requests == 9
    explicit = _opts("--load-fraction", "0.7", "--request-rate", "1.5")  # an explicit rate wins
    assert explicit.load_fraction is None and explicit.workload.request_rate == 1.5
    with pytest.raises(ValueError, match="--load-fraction must be > 0"):
        run_coserve(_opts("--load-fraction", "0"), [SYSTEMS["conserve"]])


CALIBRATED_FLAGS = ("--duration", "2", "--input-len", "8", "--output-len", "4", "--offline-concurrency", "2",
                    "--offline-input-len", "16", "--offline-output-len", "8", "--calibration-requests", "6")


def test_calibrated_run_uses_the_fraction_of_measured_capacity(tmp_path, capsys):
    out = tmp_path / "r"
    opts = _opts("--output-dir", str(out), "--load-fraction", "0.05", *CALIBRATED_FLAGS)
    slow = _fake(tmp_path, "--first-token-ms", "100")  # 6 requests at once take >= 0.1 s: <= 60 req/s
    systems = [dataclasses.replace(SYSTEMS["online-only"], launch=slow),
               dataclasses.replace(SYSTEMS["conserve"], launch=slow)]
    assert run_coserve(opts, systems) == 0
    captured = capsys.readouterr()
    rep = json.loads((out / "coserve.json").read_text())
    cal = rep["machine"]["calibration"]
    assert 0 < cal["capacity_req_s"] <= 60 and cal["burst_requests"] == 6 and cal["load_fraction"] == 0.05
    assert cal["request_rate"] == pytest.approx(0.05 * cal["capacity_req_s"])
    assert cal["log_file"] == str(out / "logs" / "coserve_calibration.log")
    # the burst: 6 online requests of the workload's output length, after the 2 warm-up ones
    burst = _bodies(tmp_path / "calibration.jsonl")[2:]
    assert len(burst) == 6 and {b["max_tokens"] for b in burst} == {4} and not any(b.get("service_tier") for b in burst)
    # every system ran at the calibrated rate
    assert rep["workload"]["request_rate"] == cal["request_rate"]
    for name in ("online-only", "conserve"):
        report = json.loads((out / f"coserve_{name}.json").read_text())
        assert report["config"]["request_rate"] == cal["request_rate"]
        assert report["num_prompts"] == max(1, round(cal["request_rate"] * 2))
    # the machine is named in the JSON and above the table
    info = machine_info()
    assert {k: rep["machine"][k] for k in ("cpu", "isa", "cpus", "key")} == {k: info[k] for k in ("cpu", "isa", "cpus",
                                                                                                  "key")}
    lines = captured.out.splitlines()
    assert lines[0].startswith(f"Machine: {info['cpu']}, ISA {info['isa']}")
    assert lines[1].startswith(f"Online load {cal['request_rate']:.3f} req/s = 0.05 x measured capacity "
                               f"{cal['capacity_req_s']:.3f} req/s")


def test_failed_calibration_runs_nothing(tmp_path, capsys):
    launched = []

    def never(system, ctx):
        launched.append(system.name)
        raise AssertionError("no system runs without a measured capacity")

    systems = [dataclasses.replace(SYSTEMS["online-only"], launch=_crash),
               dataclasses.replace(SYSTEMS["conserve"], launch=never)]
    assert run_coserve(_opts("--output-dir", str(tmp_path / "r"), "--load-fraction", *CALIBRATED_FLAGS), systems) == 1
    assert not launched and not (tmp_path / "r" / "coserve.json").exists()
    assert "could not measure the online capacity: online-only failed" in capsys.readouterr().err


# ---------------------------------------------------------------- trade-off sweep


def test_sweep_variants_and_their_flags(tmp_path):
    assert parse_number_list("--sweep-slo-tbt-ms", "50, 100,200,50") == [50.0, 100.0, 200.0]
    for bad in ("", "50,x", "0,100", "-5"):
        with pytest.raises(ValueError, match="bad --sweep-slo-tbt-ms"):
            parse_number_list("--sweep-slo-tbt-ms", bad)
    opts = _opts("--sweep-slo-tbt-ms", "50,100,200")
    assert opts.sweeping and opts.sweep_slo_tbt_ms == [50, 100, 200] and opts.sweep_token_budgets == [128, 256, 512]
    assert not _opts().sweeping
    expanded = expand_sweep(select_systems(",".join(SWEEP_SYSTEMS)), [50.0, 62.5], [128])
    assert [s.name for s in expanded] == ["online-only", "non-preemptive", "conserve-tbt50", "conserve-tbt62.5",
                                          "conserve-slowdown-x1.2", "sarathi-budget128", "priority",
                                          "vllm-online-only", "vllm-non-preemptive", "vllm-priority"]
    tbt = expanded[3]
    assert (tbt.family_name, tbt.knob) == ("conserve", "--slo-tbt-ms 62.5")
    assert conserve_launch(tbt, _ctx(tmp_path)).argv[10:] == ["--slo-tbt-ms", "62.5"]
    slow = expand_sweep([SYSTEMS["conserve-slowdown"]], [50.0], [128], [1.1, 1.5])
    assert [(s.family_name, s.knob) for s in slow] == [("conserve-slowdown", "--max-online-slowdown 1.1"),
                                                      ("conserve-slowdown", "--max-online-slowdown 1.5")]
    assert conserve_launch(slow[1], _ctx(tmp_path)).argv[-2:] == ["--max-online-slowdown", "1.5"]
    assert conserve_launch(expanded[5], _ctx(tmp_path)).argv[10:] == ["--scheduler", "sarathi", "--token-budget", "128"]
    assert (expanded[6].family_name, expanded[6].knob) == ("priority", "")


def _run(name: str, summary: dict | None, status: str = "ok") -> tuple[System, SystemResult]:
    base, _, value = name.partition("-tbt")
    system = variant(SYSTEMS[base], float(value)) if value else SYSTEMS[name]
    return system, SystemResult(system.name, "d", status, summary=summary or {})


def test_tradeoff_points_from_given_numbers():
    runs = [_run("online-only", _s(100, 20, 25, 100)), _run("non-preemptive", _s(900, 90, 90, 90, 500)),
            _run("conserve-tbt50", _s(110, 30, 30, 100, 400)), _run("conserve-tbt200", _s(300, 25, 30, 100, 500)),
            _run("priority", _s(90, 10, 10, 100, 0)), _run("vllm-online-only", _s(200, 40, 40, 100)),
            _run("vllm-priority", _s(400, 50, 50, 100, 250)), _run("fcfs", None, "failed")]
    points = {p.system: p for p in tradeoff_points(runs)}
    # with vLLM's own FCFS run, vLLM's offline fraction is over vLLM's bound
    own = {p.system: p for p in tradeoff_points(runs + [_run("vllm-non-preemptive", _s(900, 90, 90, 90, 1000))])}
    assert list(own) == list(points)  # a reference, not a point
    assert (own["vllm-priority"].bound_reference, own["vllm-priority"].offline_fraction) == (
        "vllm-non-preemptive", pytest.approx(0.25))
    assert (own["conserve-tbt50"].bound_reference, own["conserve-tbt50"].offline_fraction) == (
        "non-preemptive", pytest.approx(0.8))
    assert list(points) == ["conserve-tbt50", "conserve-tbt200", "priority", "vllm-priority", "fcfs"]
    c50 = points["conserve-tbt50"]
    assert (c50.family, c50.knob, c50.latency_reference) == ("conserve", "--slo-tbt-ms 50", "online-only")
    assert (c50.ttft_ratio, c50.itl_ratio) == (pytest.approx(1.1), pytest.approx(1.5))
    assert c50.online_p99_ratio == pytest.approx(1.5) and c50.offline_fraction == pytest.approx(0.8)
    assert c50.total_tok_s == 500
    assert points["conserve-tbt200"].online_p99_ratio == pytest.approx(3.0)  # TTFT is the worse one here
    assert points["priority"].online_p99_ratio == pytest.approx(0.9) and points["priority"].offline_fraction == 0
    vp = points["vllm-priority"]  # measured against vLLM without offline load
    assert (vp.latency_reference, vp.ttft_ratio, vp.itl_ratio, vp.offline_fraction) == (
        "vllm-online-only", pytest.approx(2.0), pytest.approx(1.25), pytest.approx(0.5))
    assert points["fcfs"].status == "failed" and points["fcfs"].online_p99_ratio is None
    # without vLLM's own reference, conserve's online-only is used; without the bound, no y
    alone = tradeoff_points([r for r in runs if r[0].name not in ("vllm-online-only", "non-preemptive")])
    vp = next(p for p in alone if p.system == "vllm-priority")
    assert (vp.latency_reference, vp.online_p99_ratio, vp.offline_fraction) == ("online-only", pytest.approx(4.0), None)

    table = format_tradeoff(list(points.values())).splitlines()
    assert table[0] == ("| system | knob | P99 TTFT ratio | P99 ITL ratio | offline fraction of bound | "
                        "total tok/s |")
    assert table[2] == "| conserve | --slo-tbt-ms 50 | 1.10x | 1.50x | 80% | 500.0 |"
    assert table[4] == "| priority | (defaults) | 0.90x | 0.50x | 0% | 100.0 |"
    assert table[6] == "| fcfs | (defaults) | failed | | | |"


def test_sweep_over_fake_servers(tmp_path, capsys):
    launched: dict[str, tuple[str, ...]] = {}
    fast = _fake(tmp_path)

    def recording(system, ctx):
        launched[system.name] = system.server_args
        return fast(system, ctx)

    out = tmp_path / "r"
    opts = _opts("--output-dir", str(out), "--vllm-venv", str(tmp_path / "no-venv"), "--sweep-slo-tbt-ms",
                 "50,100,200", "--sweep-token-budgets", "64,128", "--duration", "0.5", "--request-rate", "8",
                 "--input-len", "8", "--output-len", "4", "--offline-concurrency", "2", "--offline-input-len", "16",
                 "--offline-output-len", "8")
    systems = [s if s.name.startswith("vllm-") else dataclasses.replace(s, launch=recording)
               for s in select_systems(",".join(SWEEP_SYSTEMS))]
    assert run_coserve(opts, systems) == 0
    assert launched == {"online-only": (), "non-preemptive": SYSTEMS["non-preemptive"].server_args,
                        "conserve-tbt50": ("--slo-tbt-ms", "50"), "conserve-tbt100": ("--slo-tbt-ms", "100"),
                        "conserve-tbt200": ("--slo-tbt-ms", "200"),
                        "conserve-slowdown-x1.2": ("--max-online-slowdown", "1.2"),
                        "sarathi-budget64": ("--scheduler", "sarathi", "--token-budget", "64"),
                        "sarathi-budget128": ("--scheduler", "sarathi", "--token-budget", "128"),
                        "priority": ("--scheduler", "priority")}
    captured = capsys.readouterr()
    rep = json.loads((out / "coserve.json").read_text())
    assert rep["systems"]["vllm-priority"]["status"] == "not run"
    points = rep["tradeoff"]["points"]
    assert [p["system"] for p in points] == ["conserve-tbt50", "conserve-tbt100", "conserve-tbt200",
                                             "conserve-slowdown-x1.2", "sarathi-budget64", "sarathi-budget128", "priority", "vllm-priority"]
    # the points in the file are the ones computed from the summaries in the file
    s = rep["systems"]
    for p in points[:-1]:
        ref = s["online-only"]
        assert p["ttft_ratio"] == pytest.approx(s[p["system"]]["p99_ttft_ms"] / ref["p99_ttft_ms"])
        assert p["online_p99_ratio"] == max(p["ttft_ratio"], p["itl_ratio"])
        assert p["offline_fraction"] == pytest.approx(s[p["system"]]["offline_throughput_tok_s"]
                                                      / s["non-preemptive"]["offline_throughput_tok_s"])
    assert points[-1]["status"] == "not run" and points[-1]["online_p99_ratio"] is None

    md = (out / "coserve_tradeoff.md").read_text()
    assert rep["tradeoff"]["table_file"] == str(out / "coserve_tradeoff.md")
    assert md.startswith("# Co-serving trade-off\n\nMachine: ") and "Online load 8 req/s" in md
    assert "| conserve | --slo-tbt-ms 200 |" in md and "| sarathi | --token-budget 64 |" in md
    assert "| vllm-priority | (defaults) | not run |" in md and "| sarathi | --token-budget 64 |" in captured.out
    png = out / "coserve_tradeoff.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert rep["tradeoff"]["plot_file"] is None
    else:
        assert rep["tradeoff"]["plot_file"] == str(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000
