"""The ingress's Prometheus metrics: routing decisions, leases and each replica's last report, labelled by
replica; `/metrics` adds every replica's own metrics (latencies, tokens, KV use) with a `replica` label."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conserve.cluster.router import Router

_TTFT_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class ClusterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        rep = ["replica"]
        self.routed = Counter("conserve_routed_requests", "Requests (kind http) and batch lines (kind batch_line) "
                              "sent to each replica", rep + ["request_class", "kind"], registry=r)
        self.predicted_ttft = Histogram("conserve_routed_predicted_ttft_seconds", "Predicted time to first token "
                                        "at the replica an online request was sent to", rep, buckets=_TTFT_BUCKETS,
                                        registry=r)
        self.offline_held = Counter("conserve_offline_held", "Flex requests and batch lines that waited because no "
                                    "replica could take offline work (all at risk or down)", registry=r)
        self.leased = Gauge("conserve_batch_lines_leased", "Batch lines running on each replica", rep, registry=r)
        self.released = Counter("conserve_batch_lines_released", "Batch lines whose replica was lost under them "
                                "(run again elsewhere)", rep, registry=r)
        self.lost = Counter("conserve_replica_lost", "Calls that found a replica's process gone or its engine failed",
                            rep, registry=r)
        self.restarts = Counter("conserve_replica_restarts", "Replica processes Ray Serve started again", rep,
                                registry=r)
        self.up = Gauge("conserve_replica_up", "1 while the replica takes requests", rep, registry=r)
        self.at_risk = Gauge("conserve_replica_online_at_risk", "1 while the replica's online objectives are at risk "
                             "(it gets no offline work)", rep, registry=r)
        self.queue = Gauge("conserve_replica_online_queue_seconds", "Predicted prefill time of the online requests "
                           "waiting at the replica (its last report)", rep, registry=r)
        self.capacity = Gauge("conserve_replica_harvest_capacity_tokens_per_second", "Offline tokens/s the replica "
                              "could harvest now (its last report)", rep, registry=r)
        self.offline_in_flight = Gauge("conserve_replica_offline_in_flight", "Flex requests and batch lines in "
                                       "flight at the replica", rep, registry=r)
        self.http_errors = Counter("conserve_http_errors", "Error responses", ["status"], registry=r)

    def observe(self, router: Router, name: str) -> None:
        """Mirror the router's view of one replica into the gauges."""
        self.up.labels(name).set(1 if router.is_up(name) else 0)
        self.offline_in_flight.labels(name).set(router.offline_in_flight(name))
        stats = router.stats(name)
        if stats is not None:
            self.at_risk.labels(name).set(1 if stats.at_risk else 0)
            self.queue.labels(name).set(stats.online_queue_s)
            self.capacity.labels(name).set(stats.offline_capacity)

    def render(self, replica_texts: dict[str, bytes]) -> bytes:
        own = {family.name for family in self.registry.collect()}
        return generate_latest(self.registry) + with_replica_label(replica_texts, skip=own)


def with_replica_label(texts: dict[str, bytes], skip: set[str] = frozenset()) -> bytes:
    """Several replicas' Prometheus texts as one, each sample labelled with its replica; families named
    in `skip` are left out (the ingress has its own of that name: a name may appear once)."""
    families: dict[str, object] = {}
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text.decode()):
            if family.name in skip:
                continue
            merged = families.setdefault(family.name, family)
            samples = [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
            if merged is family:
                family.samples = samples
            else:
                merged.samples.extend(samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    """A collector of parsed metric families (what prometheus_client renders a registry from)."""

    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self):
        return self._families
