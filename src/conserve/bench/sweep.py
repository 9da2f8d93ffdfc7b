"""The trade-off sweep of `conserve bench coserve --sweep-slo-tbt-ms`: which systems run, and the variants
of the ones with a latency/throughput knob (conserve's TBT SLO, sarathi's token budget), one run each."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from conserve.bench.systems import System

DEFAULT_TOKEN_BUDGETS = (128, 256, 512)
DEFAULT_SLOWDOWNS = (1.2,)
# the references (online-only, vllm-online-only: latency; non-preemptive, vllm-non-preemptive: offline
# bound) and the co-serving policies that become points
SWEEP_SYSTEMS = ("online-only", "non-preemptive", "conserve", "conserve-slowdown", "sarathi", "priority",
                 "vllm-online-only", "vllm-non-preemptive", "vllm-priority")
# system -> (server flag, short name used in the variant's name)
KNOBS = {"conserve": ("--slo-tbt-ms", "tbt"), "sarathi": ("--token-budget", "budget"),
         "conserve-slowdown": ("--max-online-slowdown", "x")}


def parse_number_list(flag: str, text: str, kind: type = float) -> list:
    """'50,100,200' -> [50.0, 100.0, 200.0]; every value must be > 0."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(v > 0 for v in values):
        raise ValueError(f"bad {flag} {text!r}: expected positive numbers such as 50,100,200")
    return list(dict.fromkeys(values))


def variant(system: System, value: float) -> System:
    """The system with its knob set to value: its own name (files and rows), its family and knob kept."""
    flag, short = KNOBS[system.name]
    shown = f"{value:g}"
    return dataclasses.replace(system, name=f"{system.name}-{short}{shown}",
                               description=f"{system.description}, {flag} {shown}",
                               server_args=(*_without(system.server_args, flag), flag, shown), family=system.name,
                               knob=f"{flag} {shown}")


def expand_sweep(systems: Sequence[System], slo_tbt_ms: Sequence[float], token_budgets: Sequence[int],
                 slowdowns: Sequence[float] = DEFAULT_SLOWDOWNS) -> list[System]:
    """conserve once per TBT SLO, sarathi once per token budget, conserve-slowdown once per slowdown
    bound, every other system once, in order."""
    values = {"conserve": slo_tbt_ms, "sarathi": token_budgets, "conserve-slowdown": slowdowns}
    out: list[System] = []
    for system in systems:
        if system.name in values:
            out += [variant(system, v) for v in values[system.name]]
        else:
            out.append(system)
    return out


def _without(args: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """args less flag and its value, so a variant sets the knob once."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        else:
            out.append(a)
    return tuple(out)
