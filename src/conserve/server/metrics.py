"""Prometheus metrics: request counts, latency histograms and tokens by request class, queue depths
and KV cache use. Each app gets its own registry so several servers can live in one process (tests).
`/metrics` renders the registry in Prometheus' text format, `/metrics.json` (to_json) the same samples
as JSON for the dashboard: one set of metrics, two renderings."""

from __future__ import annotations

import math
import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from conserve.engine import Engine
from conserve.request import RequestClass

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        cls = ["request_class"]
        self.requests = Counter("conserve_requests", "Finished requests", cls + ["finish_reason"], registry=r)
        self.ttft = Histogram("conserve_time_to_first_token_seconds", "Arrival to first token", cls,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tbt = Histogram("conserve_inter_token_latency_seconds", "Time between tokens of a request", cls,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("conserve_e2e_request_latency_seconds", "Arrival to last token", cls,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("conserve_prompt_tokens", "Prompt tokens of finished requests", cls,
                                     registry=r)
        self.generation_tokens = Counter("conserve_generation_tokens", "Generated tokens", cls, registry=r)
        self.running = Gauge("conserve_num_requests_running", "Requests in the running batch", cls, registry=r)
        self.waiting = Gauge("conserve_num_requests_waiting", "Requests waiting to run", cls, registry=r)
        self.kv_used = Gauge("conserve_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("conserve_kv_blocks_total", "KV cache blocks in all", registry=r)
        self.iteration = Histogram("conserve_iteration_seconds", "Time of one engine step",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.http_errors = Counter("conserve_http_errors", "Error responses", ["status"], registry=r)
        self.rejected = Counter("conserve_rejected_requests", "Requests turned away before reaching the engine: "
                                "reason queue_full or predicted_ttft (429), engine_restarting or engine_dead (503)",
                                cls + ["reason"], registry=r)
        self.engine_restarts = Counter("conserve_engine_restarts", "Engines rebuilt after a fault", registry=r)
        # Preemption and the host KV tier.
        self.preemptions = Counter("conserve_preemptions", "Preemptions: 'memory' (an offline request's KV "
                                   "blocks taken back) or 'layer' (an iteration stopped at a safepoint)",
                                   ["cause"], registry=r)
        self.preemption_latency = Histogram("conserve_preemption_latency_seconds",
                                            "Online arrival to the safepoint that stopped an offline iteration",
                                            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
                                            registry=r)
        self.checkpointed = Counter("conserve_kv_checkpointed_bytes", "KV bytes copied to the host tier", registry=r)
        self.prefetched = Counter("conserve_kv_prefetched_bytes", "KV bytes copied back from the host tier",
                                  registry=r)
        self.recomputed = Counter("conserve_recomputed_tokens", "Committed tokens lost at preemption and "
                                  "computed again", registry=r)
        self.host_kv_used = Gauge("conserve_host_kv_blocks_used", "Host KV tier blocks in use", registry=r)
        self.host_kv_total = Gauge("conserve_host_kv_blocks_total", "Host KV tier blocks in all", registry=r)
        # The harvest: what offline work gets of the machine (engine.stats).
        self.computed_tokens = Counter("conserve_computed_tokens", "Token positions computed (prompt and "
                                       "generated) by committed iterations", cls, registry=r)
        self.harvest_rate = Gauge("conserve_offline_tokens_per_second", "Offline tokens computed per second "
                                  "over the last 10 s (the harvest)", registry=r)
        self.model_seconds = Counter("conserve_model_seconds", "Time in model runs by request class (an "
                                     "iteration's time split by its tokens)", cls, registry=r)
        self.offline_time = Gauge("conserve_offline_time_fraction", "Share of model time spent on offline "
                                  "work since start", registry=r)
        self.resumed = Counter("conserve_resumed_iterations", "Offline iterations stopped between layers "
                               "that resumed where they stopped", registry=r)
        self.fill_limit = Gauge("conserve_tbt_fill_limit_seconds", "Predicted time offline work may raise an "
                                "iteration with online work to (the TBT objective over the measured error tail, "
                                "--tbt-quantile)", registry=r)
        self._seen: dict[str, int] = {}
        self._engine = None  # weak reference: the engine whose running totals _seen mirrors

    def on_step(self, engine: Engine, outputs: list, seconds: float | None) -> None:
        """Called on the engine thread after each step, and with seconds=None when requests came or went."""
        if self._engine is None or self._engine() is not engine:  # a rebuilt engine counts from zero
            if self._engine is not None:
                self.engine_restarts.inc()
            self._engine = weakref.ref(engine)
            self._seen.clear()
        if seconds is not None:
            self.iteration.observe(seconds)
        sched = engine.scheduler
        for c in RequestClass:
            self.running.labels(c.value).set(sum(1 for r in sched.running if r.request_class is c))
            self.waiting.labels(c.value).set(sum(1 for r in sched.waiting if r.request_class is c))
        pool = engine.kv_manager.pool
        self.kv_used.set(pool.num_used)
        self.kv_total.set(pool.num_blocks)
        self._count(self.preemptions.labels("memory"), "memory", sched.num_preemptions)
        self._count(self.preemptions.labels("layer"), "layer", engine.preemption.num_preemptions)
        self._count(self.recomputed, "recomputed", sched.num_tokens_recomputed)
        stats = engine.stats
        self._count(self.computed_tokens.labels(RequestClass.ONLINE.value), "online_tokens", stats.online_tokens)
        self._count(self.computed_tokens.labels(RequestClass.OFFLINE.value), "offline_tokens", stats.offline_tokens)
        self._count(self.resumed, "resumed", stats.resumed)
        self._count(self.model_seconds.labels(RequestClass.ONLINE.value), "online_s",
                    stats.busy_s - stats.offline_busy_s)
        self._count(self.model_seconds.labels(RequestClass.OFFLINE.value), "offline_s", stats.offline_busy_s)
        self.harvest_rate.set(stats.offline_tokens_per_s())
        self.offline_time.set(stats.offline_time_fraction)
        if sched.config.policy == "conserve":
            self.fill_limit.set(sched.tbt_fill_limit_s())
        while engine.preemption.latencies:
            self.preemption_latency.observe(engine.preemption.latencies.popleft())
        if engine.offload is not None:
            self._count(self.checkpointed, "checkpointed", engine.offload.stats.bytes_checkpointed)
            self._count(self.prefetched, "prefetched", engine.offload.stats.bytes_prefetched)
            self.host_kv_used.set(engine.offload.host.pool.num_used)
            self.host_kv_total.set(engine.offload.host.pool.num_blocks)

    def _count(self, counter, key: str, total: int) -> None:
        """Counters mirror the engine's running totals: add what is new since the last step."""
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._seen[key] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def to_json(self) -> dict:
        """The registry's samples as {name: {"type", "help", "samples": [...]}}: counters and gauges as
        {"labels", "value"}, histograms as {"labels", "buckets": [[upper bound, cumulative count], ...],
        "count", "sum"} (the last bound, +Inf, is null). Names are the families' (no _total suffix)."""
        out: dict[str, dict] = {}
        for family in self.registry.collect():
            samples: dict[tuple, dict] = {}
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                entry = samples.setdefault(tuple(sorted(labels.items())), {"labels": labels})
                if family.type != "histogram":
                    entry["value"] = s.value
                elif s.name.endswith("_bucket"):
                    bound = float(s.labels["le"])
                    entry.setdefault("buckets", []).append([bound if math.isfinite(bound) else None, s.value])
                else:
                    entry[s.name.rsplit("_", 1)[1]] = s.value  # count, sum
            out[family.name] = {"type": family.type, "help": family.documentation,
                                "samples": list(samples.values())}
        return out
