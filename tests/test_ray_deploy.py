"""`serve run conserve.deploy:app key=value ...`: the arguments are the `conserve serve` flags."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from conserve.cluster.deploy import configs_from_serve_args  # noqa: E402


def test_serve_run_arguments_are_the_serve_flags():
    cluster, server, config = configs_from_serve_args({
        "replicas": "3", "replica_threads": "1", "slo-tbt-ms": "80", "batch-deadlines": "false",
        "trust-request-chat-template": "true", "compile": "on", "kv-cache-gb": "0.5"})
    assert (cluster.replicas, cluster.replica_threads, cluster.ray_address) == (3, 1, None)
    assert (config.slo_tbt_ms, config.compile, config.kv_cache_gb) == (80.0, "on", 0.5)
    assert server.batch_deadlines is False and server.trust_request_chat_template is True


def test_unknown_or_bad_serve_run_arguments_are_errors():
    with pytest.raises(ValueError, match="no-such-flag"):
        configs_from_serve_args({"no-such-flag": "1"})
    with pytest.raises(ValueError, match="slo-tbt-ms"):
        configs_from_serve_args({"slo-tbt-ms": "fast"})
    with pytest.raises(ValueError, match="replicas"):
        configs_from_serve_args({"replicas": "0"})
