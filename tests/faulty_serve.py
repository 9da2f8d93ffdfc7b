"""Test-only `conserve serve` whose engines fail on chosen steps: fault injection over real HTTP.

CONSERVE_TEST_FAULTS names the serving steps that raise, numbered from 1 across every engine this
process builds (warm-up steps are not counted): "3" or "3,9" for those steps, "2+" for every step
from the second on. Usage: python faulty_serve.py serve [conserve serve flags].
"""

from __future__ import annotations

import itertools
import logging
import os
import sys

from conserve.cli import build_parser
from conserve.server.serve import cmd_serve


def faulty(spec: str):
    if spec.endswith("+"):
        first = int(spec[:-1])

        def fails(n: int) -> bool:
            return n >= first
    else:
        fails = {int(s) for s in spec.split(",")}.__contains__
    calls = itertools.count(1)

    def wrap(engine) -> None:
        step = engine.step

        def step_or_fail(*args, **kwargs):
            n = next(calls)
            if fails(n):
                raise RuntimeError(f"injected fault at serving step {n}")
            return step(*args, **kwargs)

        engine.step = step_or_fail

    return wrap


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(cmd_serve(build_parser().parse_args(sys.argv[1:]), wrap_engine=faulty(os.environ["CONSERVE_TEST_FAULTS"])))
