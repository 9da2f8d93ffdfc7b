"""`conserve serve --replicas N` / `--ray-address ADDR`: start (or join) Ray, deploy the application,
serve until SIGINT or SIGTERM, then take it down (and the Ray instance, when this process started it)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from conserve.errors import ConserveError

log = logging.getLogger(__name__)

NEEDS_RAY = 'more than one replica, or --ray-address, runs on Ray Serve: pip install "conserve[ray]"'


def serve_on_ray(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConserveError(NEEDS_RAY) from None
    from conserve.cluster.deploy import APP_NAME, build_application, configs_from_args
    from conserve.server.store import Store

    cluster, server, config = configs_from_args(args)  # bad flags fail here, before Ray starts
    if config.model is not None and not Path(config.model).exists():
        raise ConserveError(f"no model at {config.model}")
    start_local = cluster.ray_address in (None, "local")
    if start_local:  # the ingress runs on this machine: a data dir another server holds fails now
        Store(server.data_dir).close()
    threads = cluster.threads()
    cpus = max(os.cpu_count() or 1, cluster.replicas * threads) if start_local else None
    if start_local and cluster.replicas * threads > (os.cpu_count() or 1):
        log.warning("%d replicas x %d threads oversubscribe this machine's %d CPUs", cluster.replicas, threads,
                    os.cpu_count() or 1)
    if start_local:
        # Ray starts its workers at niceness 15, as background work; an engine replica is the serving
        # path: there every other process on the machine would preempt its OpenMP threads.
        os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local" if start_local else cluster.ray_address, num_cpus=cpus, include_dashboard=False,
             logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": server.host, "port": server.port})
        serve.run(build_application(cluster, server, config), name=APP_NAME, route_prefix="/")
        print(f"conserve: serving {cluster.replicas} replica(s) on http://{server.host}:{server.port} "
              f"(Ray {'local' if start_local else cluster.ray_address})", flush=True)
        stop.wait()
    finally:
        if start_local:
            serve.shutdown()
            ray.shutdown()
        else:  # a shared cluster: take down this application only
            serve.delete(APP_NAME)
    return 0
