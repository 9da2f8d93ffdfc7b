"""ClusterConfig: the flags of `conserve serve` that spread it over engine replicas on Ray Serve."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from conserve.flags import Flagged, flag


@dataclass
class ClusterConfig(Flagged):
    FLAG_GROUPS: ClassVar[dict[str, str]] = {"cluster": "replicas on Ray Serve"}

    replicas: int = flag(1, "engine replicas. More than 1 runs each as a Ray Serve deployment behind one "
                         "OpenAI-compatible ingress that routes online requests to the lowest predicted TTFT and "
                         "offline work to the most harvestable capacity (needs `pip install \"conserve[ray]\"`); "
                         "1: the single-process server", group="cluster", metavar="N")
    ray_address: str | None = flag(None, "deploy on this Ray cluster (`auto`, `HOST:6379`), even with one replica "
                                   "(where Ray Serve already runs, its HTTP host and port stay); `local` starts a "
                                   "fresh local Ray instance. Unset: `--replicas` above 1 starts a local one", group="cluster", type=str,
                                   metavar="ADDR")
    replica_threads: int | None = flag(None, "torch CPU threads of each replica (and the CPUs Ray reserves for "
                                       "it)", group="cluster", type=int, metavar="T",
                                       shown_default="the CPU cores shared out among the replicas")
    replica_gpus: float | None = flag(None, "GPUs Ray reserves for each replica", group="cluster", type=float,
                                      shown_default="1 with `--device cuda`, else 0")

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.replica_threads is not None and self.replica_threads < 1:
            raise ValueError(f"replica_threads must be >= 1, got {self.replica_threads}")
        if self.replica_gpus is not None and self.replica_gpus < 0:
            raise ValueError(f"replica_gpus must be >= 0, got {self.replica_gpus}")

    @property
    def uses_ray(self) -> bool:
        return self.replicas > 1 or self.ray_address is not None

    def threads(self) -> int:
        return self.replica_threads or max(1, (os.cpu_count() or 1) // self.replicas)

    def gpus(self, device: str) -> float:
        if self.replica_gpus is not None:
            return self.replica_gpus
        return 1.0 if device.startswith("cuda") else 0.0
