"""Every use of Ray's private APIs, in one module (written against Ray 2.60).

Public Ray APIs are used everywhere else; what Ray offers no public way to do lives here, each with a
contract test in tests/test_ray_compat.py that fails, naming the installed Ray version, when an upgrade
moves it. Where the feature is cosmetic, a fallback keeps the service running without it:

================================  =============================================  ============================
function                          uses                                           when Ray moves it
================================  =============================================  ============================
``late_bound_ingress``            ``serve.ingress()`` + ``__serve_build_asgi_    fails loudly (the HTTP API)
                                  app__`` (documented in serve.ingress's
                                  docstring; Serve's public builder takes no
                                  arguments, so it cannot see the handles)
``deploy_config``                 ``serve.start`` (public), then the             fails loudly (rag serve)
                                  controller client's ``deploy_apps``: what
                                  ``serve run CONFIG.yaml`` does
``shutdown_serve``                the controller client's ``shutdown(timeout)``  public ``serve.shutdown()``
                                  (a bounded wait)                               (waits up to 30 s)
``routable_replicas``             a handle's router's replica set                None: no verdict (breakers
                                                                                 then wait for the
                                                                                 controller)
``multiplexed_models``           a handle's router's replicas' multiplexed      None: /info shows the
                                  model ids (what each replica reported to the   answering replica's models
                                  controller it holds)                           only
``token_auth_enabled``            ``ray._raylet`` authentication mode            None: "unknown" in a banner
``counter_add_zero``              ``Counter._record``                            series appear at first count
================================  =============================================  ============================
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import ray

__all__ = [
    "RAY_VERSION",
    "counter_add_zero",
    "deploy_config",
    "late_bound_ingress",
    "multiplexed_models",
    "routable_replicas",
    "shutdown_serve",
    "token_auth_enabled",
]

log = logging.getLogger("ray.serve")

RAY_VERSION = ray.__version__
BUILD_ASGI_APP = (
    "__serve_build_asgi_app__"  # Ray 2.60: ray.serve._private.replica.SERVE_BUILD_ASGI_APP_METHOD
)
T = TypeVar("T", bound=type)
_warned: set[str] = set()


def _moved(feature: str, err: BaseException) -> None:
    if feature not in _warned:
        _warned.add(feature)
        log.warning("Ray %s: %s is unavailable (%s); running without it", RAY_VERSION, feature, err)


def late_bound_ingress(cls: T) -> T:
    """``serve.ingress()`` for a class whose ``build_asgi_app(self)`` makes its FastAPI app once the
    constructor ran (it needs the handles the class was bound with)."""
    from ray import serve

    build: Any = cls
    setattr(cls, BUILD_ASGI_APP, build.build_asgi_app)
    wrapped: T = serve.ingress()(cls)
    return wrapped


def deploy_config(config: dict[str, Any], *, host: str | None = None, port: int | None = None) -> list[str]:
    """Deploy a Serve config (the dict of a serve_config.yaml) on the connected cluster, as ``serve run``
    does; returns the application names. ``host``/``port`` override its ``http_options``."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    http = schema.http_options.model_dump()
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    serve.start(http_options=http, proxy_location=schema.proxy_location)
    try:
        from ray.serve.context import _get_global_client

        client: Any = _get_global_client()
        deploy = client.deploy_apps
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            f"Ray {RAY_VERSION} has no Serve controller client's deploy_apps (used as of Ray 2.60 to deploy "
            "a config file): update deployments/_ray_compat.deploy_config, or run `serve run CONFIG`"
        ) from e
    deploy(schema)
    return [a.name for a in schema.applications]


def shutdown_serve(grace_s: float) -> None:
    """Stop Serve, giving replicas at most ``grace_s`` seconds (public ``serve.shutdown()`` waits up to 30 s
    for a controller that may already be gone when the whole process group got a signal)."""
    try:
        from ray.serve.context import _cached_client_from_current_session, _global_client

        if _cached_client_from_current_session() and _global_client is not None:
            _global_client.shutdown(timeout_s=grace_s)
        return
    except (ImportError, AttributeError, TypeError) as e:
        _moved("a bounded Serve shutdown", e)
    from ray import serve

    serve.shutdown()


def routable_replicas(handle: object) -> int | None:
    """Replicas ``handle``'s router would send a request to now; None where that is unknown.

    Unknown: a fake handle, a router not started or not yet told its replicas by the controller, or a Ray
    whose router is laid out differently (this reads Ray 2.60's ``AsyncioRouter._request_router``, never
    creating it)."""
    h: Any = handle
    try:
        router = h._router._asyncio_router
        if not router.running_replicas_populated():
            return None
        request_router = router._request_router
        return None if request_router is None else len(request_router.curr_replicas)
    except Exception:  # any other layout: no verdict
        return None


def multiplexed_models(handle: object) -> dict[str, list[str]] | None:
    """Replica id -> the multiplexed model ids it holds, as ``handle``'s router knows them (each replica
    reports its loaded models to the controller, which tells the routers: Ray 2.60's ``RunningReplica
    .multiplexed_model_ids``); None where that is unknown (a fake handle, a router not started yet)."""
    h: Any = handle
    try:
        router = h._router._asyncio_router
        if not router.running_replicas_populated() or router._request_router is None:
            return None
        replicas = router._request_router.curr_replicas
        return {rid.unique_id: sorted(r.multiplexed_model_ids) for rid, r in replicas.items()}
    except Exception:  # any other layout: unknown
        return None


def token_auth_enabled() -> bool | None:
    """Whether Ray's control plane requires its token (Ray 2.52+, on by default for a local cluster since
    2.59); None where this Ray does not say."""
    try:
        import importlib

        raylet: Any = importlib.import_module("ray._raylet")  # compiled: no types to check against
        return bool(raylet.get_authentication_mode() == raylet.AuthenticationMode.TOKEN)
    except (ImportError, AttributeError) as e:
        _moved("the authentication mode", e)
        return None


def counter_add_zero(counter: Any, tags: dict[str, str]) -> bool:
    """Create ``counter``'s series for ``tags`` at 0 (``Counter.inc`` refuses 0; Ray 2.60's ``inc`` ends in
    ``_record``, and an add of 0 creates the series without changing a count). False where unavailable."""
    try:
        counter._record(0, tags=tags)
        return True
    except (AttributeError, TypeError) as e:
        _moved("creating counters at 0", e)
        return False
