"""Run the Serve app locally: ``serve(settings, config)`` is what ``rag serve`` calls.

It starts a single-node Ray (no dashboard; metrics exported on ``settings.metrics_port``), the embedded
PostgreSQL when ``RAG_DATABASE_URL`` is unset, deploys the app from a Serve config file exactly as
``serve run CONFIG`` would (the file's deployment options, ``user_config`` and autoscaling included), prints
where everything is, and keeps running until Ctrl-C, which shuts Serve and Ray down.

Settings flow one way: the config's ``args:`` are the defaults; Settings fields that were set explicitly
(RAG_* variables, CLI flags) override them; the database URL and an absolute ``data_dir`` are always added.
"""

from __future__ import annotations

import copy
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deployments._args import AppArgs
from deployments._ray_compat import deploy_config, shutdown_serve, token_auth_enabled
from rag.errors import ConfigError
from rag.settings import Settings

__all__ = [
    "CPU_CONFIG",
    "GPU_CONFIG",
    "Running",
    "apply_settings",
    "check_collections",
    "default_config",
    "deploy",
    "serve",
    "wait_running",
]

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIG = REPO / "serve_config.yaml"
SHUTDOWN_GRACE_S = 3.0  # Serve's share of a SIGTERM: all stopped within a 15 s grace period
CPU_CONFIG = REPO / "serve_config.cpu.yaml"


def default_config() -> Path:
    """serve_config.yaml with a CUDA GPU, else serve_config.cpu.yaml."""
    import torch

    return GPU_CONFIG if torch.cuda.is_available() else CPU_CONFIG


def load_config(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Serve config {path} not found: pass --config FILE (see serve_config.cpu.yaml)")
    with path.open(encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict) or not cfg.get("applications"):
        raise ConfigError(f"{path} is not a Serve config: it needs an 'applications:' list")
    return cfg


def apply_settings(config: dict[str, Any], settings: Settings, database_url: str) -> dict[str, Any]:
    """A copy of ``config``: app args + explicitly set Settings, the database URL and data_dir.

    Secrets are never written into the config (Ray logs it): build_app's Settings reads them from the
    environment, which Ray's processes inherit from this one. The embedded database's URL (a local socket,
    no password) is the exception: it is not in the environment, so it goes into ``args``."""
    cfg = copy.deepcopy(config)
    explicit = AppArgs.from_settings(settings).explicit()
    for app in cfg["applications"]:
        args = dict(app.get("args") or {})
        args.update(explicit)
        if not Settings.in_environment("database_url"):
            args["database_url"] = database_url
        args["data_dir"] = str(Path(settings.data_dir).expanduser().resolve())
        if settings.offline:
            args["offline"] = True
            env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
            env["HF_HUB_OFFLINE"] = "1"
        app["args"] = args
    return cfg


def deploy(
    config: dict[str, Any],
    *,
    host: str | None = None,
    port: int | None = None,
    wait: bool = True,
    timeout_s: float = 900.0,
) -> None:
    """Deploy a Serve config (dict) on the connected Ray cluster, like ``serve run``; wait until RUNNING."""
    names = deploy_config(config, host=host, port=port)
    if wait:
        wait_running(names, timeout_s=timeout_s)


def wait_running(app_names: list[str], *, timeout_s: float = 900.0, poll_s: float = 1.0) -> None:
    """Block until every app is RUNNING; raise with Serve's message if one fails to deploy."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in app_names}
        if all(s == "RUNNING" for s in states.values()):
            return
        for n in app_names:
            if states[n] == "DEPLOY_FAILED":
                detail = [apps[n].message] + [
                    f"{d}: {st.message}" for d, st in apps[n].deployments.items() if st.message
                ]
                raise RuntimeError(f"Serve app {n!r} failed to deploy: " + " | ".join(x for x in detail if x))
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve apps not RUNNING after {timeout_s:.0f}s: {states}")
        time.sleep(poll_s)


@dataclass
class Running:
    url: str
    metrics_url: str
    config: Path

    def shutdown(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop Serve (replicas get ``grace_s`` to finish; 0: skip), then Ray's processes.

        Bounded: Ray's own ``serve.shutdown()`` waits 30 s for a controller that is already gone when the
        whole process group got the signal."""
        import ray

        if not ray.is_initialized():
            return
        try:
            if grace_s > 0:
                shutdown_serve(grace_s)
        except Exception as e:  # shutting down anyway
            print(f"Serve did not shut down cleanly ({type(e).__name__}: {e}); stopping Ray", flush=True)
        finally:
            ray.shutdown()


def serve(settings: Settings, config: Path | None, *, blocking: bool = True) -> Running:
    """Start Ray + the embedded database (if no URL) + the app from ``config``; block until Ctrl-C."""
    import ray

    from rag.db import database_url

    config = Path(config) if config is not None else default_config()
    url = database_url(settings)
    for warning in check_collections(settings, url):  # a bad attached table fails here, in one line
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    cfg = apply_settings(load_config(config), settings, url)
    ray.init(
        address="local",  # never attach to someone else's cluster
        namespace="serve",
        include_dashboard=False,
        _metrics_export_port=settings.metrics_port,
    )
    running = Running(
        url=f"http://{settings.serve_host}:{settings.serve_port}",
        metrics_url=f"http://127.0.0.1:{settings.metrics_port}/metrics",
        config=config,
    )
    try:
        deploy(cfg, host=settings.serve_host, port=settings.serve_port)
    except BaseException:
        running.shutdown()
        raise
    _banner(running, settings)
    if not blocking:
        return running
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and `kill` both stop cleanly, even where SIGINT was ignored (a background job of a script).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
    grace_s = SHUTDOWN_GRACE_S
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt as stop:
        # SIGTERM goes to the whole process group (supervisors, Kubernetes): Ray's processes are stopping
        # already, so waiting for Serve's graceful path only delays the exit. Ctrl-C keeps it (Ray's
        # processes ignore SIGINT).
        if getattr(stop, "signum", None) == signal.SIGTERM:
            grace_s = 0.0
        print("\nshutting down Serve and Ray ...", flush=True)
    finally:
        running.shutdown(grace_s)
    return running


def check_collections(settings: Settings, url: str) -> list[str]:
    """Validate every attached table before serving it: ConfigError naming the fix, or the warnings."""
    from rag.models import embedding_dimension
    from rag.store import Store

    dim = embedding_dimension(settings.embedding_model, offline=settings.offline)
    if dim is None:
        return [f"could not read {settings.embedding_model!r}'s dimension: attached tables not checked"]
    with Store(url, min_size=0, max_size=1, timeout_s=settings.connect_timeout_s) as store:
        return store.validate_attached(dim)


def ray_network_line(metrics_port: int) -> str:
    """What Ray exposes beyond the API: its control plane's token auth and the metrics port's reach."""
    token = token_auth_enabled()
    plane = "token auth ON" if token else "token auth OFF (set RAY_AUTH_MODE=token)"
    if token is None:
        plane = "token auth: unknown on this Ray"
    return (
        f"ray       control plane {plane}; metrics :{metrics_port} listen on every interface "
        "(Ray has no bind address for them): firewall that port where untrusted hosts reach this machine"
    )


class _Stop(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise _Stop(signum)


def _banner(r: Running, settings: Settings) -> None:
    from deployments.api.auth import auth_line

    print(
        f"\nrag-serve is up ({r.config.name}, collection {settings.collection!r})\n"
        f"  API       {r.url}   (OpenAPI: {r.url}/docs)\n"
        f"  try       curl -s {r.url}/search -H 'content-type: application/json' "
        '-d \'{"query": "how do I parse a date?", "top_k": 3}\'\n'
        f"  ready     curl -s {r.url}/readyz\n"
        f"  metrics   {r.metrics_url}  (Prometheus; ours are ray_rag_*, Serve's ray_serve_*)\n"
        f"  {auth_line(settings.slice('search'))}\n"
        f"  {ray_network_line(settings.metrics_port)}\n"
        "  Ctrl-C stops everything.\n",
        flush=True,
    )
