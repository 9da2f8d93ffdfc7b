"""The `conserve` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from conserve.batch_client import add_batch_command
from conserve.bench.serve_bench import add_bench_command
from conserve.config import EngineConfig
from conserve.errors import ConserveError
from conserve.profile_cli import add_profile_command
from conserve.server.serve import add_serve_command


def cmd_generate(args: argparse.Namespace) -> int:
    from conserve.config import EngineConfig
    from conserve.engine import Engine
    from conserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop or [],
                            ignore_eos=args.ignore_eos)
    engine = Engine(EngineConfig.from_flags(args, seed=args.seed or 0))
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
    EngineConfig.add_flags(gen)
    gen.set_defaults(func=cmd_generate)
    add_serve_command(sub, [common])
    add_profile_command(sub, [common])
    add_batch_command(sub)
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
