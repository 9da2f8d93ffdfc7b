"""conserve as a Ray Serve application: N engine replicas, each its own deployment (engine-0, engine-1,
...) so that the ingress can send each request to the one replica the router picks, and one ingress
deployment serving HTTP. Ray Serve restarts a replica whose process dies; the ingress's router sees it
gone at the first failed call or stats poll, and back at its first report.

The ingress is placed on the head node (Ray's `node:__internal_head__` resource): the durable store of
files and batches is its data dir there. `serve run conserve.deploy:app replicas=2 model=PATH ...` takes
the `conserve serve` flags as key=value arguments (see app()); `conserve serve --replicas N` builds the
same application (launch.py).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from conserve.cluster.config import ClusterConfig
from conserve.cluster.dispatch import Dispatcher, ReplicaLost
from conserve.cluster.ingress_app import build_ingress_app
from conserve.cluster.metrics import ClusterMetrics
from conserve.config import EngineConfig
from conserve.server.config import ServerConfig
from conserve.server.store import Store

APP_NAME = "conserve"
HEAD_NODE = {"node:__internal_head__": 0.001}  # a sliver of the resource only the head node has
MAX_ONGOING = 100_000  # Ray Serve's per-replica cap; each replica has its own admission control
# A replica that fails Ray Serve's health check (its engine gave up restarting, or it hangs) is
# replaced; generous timeouts, as a busy 2-core machine can stall a check for seconds.
HEALTH_CHECK_PERIOD_S, HEALTH_CHECK_TIMEOUT_S = 5.0, 60.0
MAX_CONSTRUCTOR_RETRIES = 3  # a replica that cannot load its model fails the deployment soon, not after 20 loads
QUIET = {"enable_access_log": False}  # no log line per call: the ingress polls each replica 5 times a second
_LOST = (RayError, RayServeException)  # a call's replica died, or Serve could not reach it


class RayReplica:
    """An EngineReplica deployment seen through its handle, Ray's failures turned into ReplicaLost."""

    def __init__(self, handle: DeploymentHandle, name: str) -> None:
        self.handle, self.name = handle, name

    async def request(self, endpoint: str, body: dict) -> AsyncIterator:
        answer = self.handle.options(stream=True).request.remote(endpoint, body)
        finished = False
        try:
            async for item in answer:
                yield item
            finished = True
        except _LOST as e:
            raise ReplicaLost(f"replica {self.name}: {type(e).__name__}") from e
        finally:
            if not finished:
                answer.cancel()  # the client left (or the replica died): stop the request there too

    async def execute(self, endpoint: str, body: dict, deadline: float | None):
        return await self._call("execute", endpoint, body, deadline)

    async def stats(self):
        return await self._call("stats")

    async def metrics_text(self) -> bytes:
        return await self._call("metrics_text")

    async def info(self) -> dict:
        return await self._call("info")

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.handle, method).remote(*args)
        except _LOST as e:
            raise ReplicaLost(f"replica {self.name}: {type(e).__name__}") from e


@serve.ingress()
class Ingress:
    async def __init__(self, server: ServerConfig, replicas: dict[str, DeploymentHandle]) -> None:
        clients = {name: RayReplica(handle, name) for name, handle in replicas.items()}
        info = await _first_info(list(clients.values()))
        metrics = ClusterMetrics()
        dispatcher = Dispatcher(clients, metrics, max_waiting_flex=server.flex_waiting_limit)
        self._app = build_ingress_app(dispatcher, Store(server.data_dir), server,
                                      server.served_model_name or info["model"], info["max_model_len"], metrics)

    def __serve_build_asgi_app__(self):
        return self._app


async def _first_info(clients: list[RayReplica]) -> dict:
    """The model's name and length from whichever replica answers first (each waits for its model to
    load; one may be down while the ingress restarts)."""
    pending = {asyncio.ensure_future(c.info()) for c in clients}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    return task.result()
        raise RuntimeError(f"no replica could be asked for the model: {next(iter(done)).exception()}")
    finally:
        for task in pending:
            task.cancel()


def build_application(cluster: ClusterConfig, server: ServerConfig, config: EngineConfig) -> serve.Application:
    from conserve.cluster.replica import EngineReplica

    threads, gpus = cluster.threads(), cluster.gpus(config.device)
    engine = serve.deployment(EngineReplica, num_replicas=1, max_ongoing_requests=MAX_ONGOING,
                              ray_actor_options={"num_cpus": threads, "num_gpus": gpus},
                              health_check_period_s=HEALTH_CHECK_PERIOD_S,
                              health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
                              max_constructor_retry_count=MAX_CONSTRUCTOR_RETRIES, logging_config=QUIET)
    names = [f"engine-{i}" for i in range(cluster.replicas)]
    replicas = {n: engine.options(name=n).bind(n, config, server, threads) for n in names}
    ingress = serve.deployment(Ingress, name="ingress", num_replicas=1, max_ongoing_requests=MAX_ONGOING,
                               ray_actor_options={"num_cpus": 0, "resources": HEAD_NODE}, logging_config=QUIET)
    return ingress.bind(server, replicas)


def configs_from_args(args: argparse.Namespace) -> tuple[ClusterConfig, ServerConfig, EngineConfig]:
    return ClusterConfig.from_flags(args), ServerConfig.from_flags(args), EngineConfig.from_flags(args)


def app(args: dict[str, str]) -> serve.Application:
    """The builder `serve run conserve.deploy:app` calls with its key=value arguments."""
    return build_application(*configs_from_serve_args(args))


def configs_from_serve_args(args: dict[str, str]) -> tuple[ClusterConfig, ServerConfig, EngineConfig]:
    """`serve run` key=value arguments as the `conserve serve` flags they name, without dashes
    (`replicas=2 slo-tbt-ms=50 batch-deadlines=false`). --host and --port are Ray Serve's HTTP options
    there, not these."""
    from conserve.server.serve import add_serve_flags

    parser = argparse.ArgumentParser(prog="serve run conserve.deploy:app", exit_on_error=False)
    add_serve_flags(parser)
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if _is_switch(parser, flag):
            argv.append(flag if str(value).lower() in ("true", "on", "yes", "1") else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    try:
        parsed, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(f"conserve.deploy:app: {e}") from None
    if unknown:
        raise ValueError(f"conserve.deploy:app: unknown argument(s) {' '.join(unknown)} (the conserve serve flags)")
    return configs_from_args(parsed)


def _is_switch(parser: argparse.ArgumentParser, flag: str) -> bool:
    action = next((a for a in parser._actions if flag in a.option_strings), None)
    return isinstance(action, argparse.BooleanOptionalAction)
