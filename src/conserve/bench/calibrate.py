"""Machine-calibrated online load (`conserve bench coserve --load-fraction F`): a burst of the workload's
online requests, all sent at once to the online-only system, measures how many requests per second this
machine serves; every system then runs at F times that. A fixed --request-rate is light on a big server
and overload on a laptop; a fraction of the measured capacity is the same relative load on both."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from conserve.bench.compare import SystemResult
from conserve.bench.config import BenchConfig
from conserve.bench.systems import CoserveWorkload, System
from conserve.errors import ConserveError

DEFAULT_LOAD_FRACTION = 0.5
# 3x the 16 requests in flight that keep the default model's batches full on 2 CPU cores: the burst
# outlasts its own ramp-up and drain, so throughput is measured at saturation
DEFAULT_BURST = 48
CALIBRATION_SYSTEM = "online-only"


class CalibrationError(ConserveError):
    """The capacity could not be measured: no rate to run the systems at."""


@dataclass
class Calibration:
    load_fraction: float
    burst_requests: int
    capacity_req_s: float  # completed burst requests per second
    request_rate: float  # load_fraction x capacity_req_s: what every system gets
    failed: int = 0  # burst requests that failed (not counted in the capacity)
    system: str = CALIBRATION_SYSTEM
    log_file: str | None = None
    elapsed_s: float = 0.0

    def describe(self) -> str:
        return (f"online load {self.request_rate:.3f} req/s = {self.load_fraction:g} x measured capacity "
                f"{self.capacity_req_s:.3f} req/s ({self.system}, burst of {self.burst_requests} online requests"
                + (f", {self.failed} failed" if self.failed else "") + ")")


def burst_config(workload: CoserveWorkload, system: System, base_url: str, tokenizer_json: str | None,
                 burst: int) -> BenchConfig:
    """The workload's own online shapes and seed, all at once (rate None) and without offline load."""
    return dataclasses.replace(workload.bench_config(system, base_url, tokenizer_json), num_prompts=burst,
                               request_rate=None, offline_concurrency=0)


def calibration_from(result: SystemResult, load_fraction: float, burst: int) -> Calibration:
    """The capacity is the burst's achieved request throughput; CalibrationError if nothing completed."""
    if not result.ok:
        raise CalibrationError(f"could not measure the online capacity: {CALIBRATION_SYSTEM} {result.status}: "
                               f"{result.error}")
    capacity = result.summary["request_throughput"]
    if not capacity > 0:
        raise CalibrationError("could not measure the online capacity: no burst request completed")
    return Calibration(load_fraction, burst, capacity, load_fraction * capacity, result.summary.get("failed", 0),
                       log_file=result.log_path, elapsed_s=result.elapsed_s)
