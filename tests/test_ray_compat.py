"""Contract tests of every Ray private API the project uses (deployments/_ray_compat.py): each fails, naming
the installed Ray version, when a Ray upgrade moves what it relies on. No cluster needed."""

from __future__ import annotations

import inspect

import ray

from deployments import _ray_compat as compat

MOVED = f"Ray {ray.__version__} moved it: update deployments/_ray_compat.py"


def test_late_bound_ingress_hook():
    from ray.serve._private import replica

    assert getattr(replica, "SERVE_BUILD_ASGI_APP_METHOD", None) == compat.BUILD_ASGI_APP, MOVED

    class Probe:
        def build_asgi_app(self) -> object:
            return object()

    wrapped = compat.late_bound_ingress(Probe)  # serve.ingress() accepts the late-bound class
    assert getattr(wrapped, compat.BUILD_ASGI_APP) is Probe.build_asgi_app, MOVED


def test_deploy_config_uses_the_controller_clients_deploy_apps():
    from ray.serve._private.client import ServeControllerClient
    from ray.serve.context import _get_global_client  # noqa: F401  (what deploy_config imports)

    params = inspect.signature(ServeControllerClient.deploy_apps).parameters
    assert "config" in params, MOVED


def test_bounded_shutdown_reads_the_cached_client():
    from ray.serve._private.client import ServeControllerClient
    from ray.serve.context import _cached_client_from_current_session, _global_client  # noqa: F401

    assert "timeout_s" in inspect.signature(ServeControllerClient.shutdown).parameters, MOVED


def test_routable_replicas_reads_the_routers_replica_set():
    """What routable_replicas reads (tests/test_chaos.py reads it on a live handle too)."""
    from ray.serve._private.request_router.request_router import RequestRouter
    from ray.serve._private.router import AsyncioRouter

    assert hasattr(AsyncioRouter, "running_replicas_populated"), MOVED
    assert "self._request_router" in inspect.getsource(AsyncioRouter.__init__), MOVED
    assert isinstance(inspect.getattr_static(RequestRouter, "curr_replicas"), property), MOVED
    assert compat.routable_replicas(object()) is None  # anything else: no verdict, never "no replica"


def test_multiplexed_models_reads_the_routers_replicas():
    """What multiplexed_models reads (tests/test_multimodel.py reads it through /info on a live app)."""
    from ray.serve._private.request_router.replica_wrapper import RunningReplica

    assert isinstance(inspect.getattr_static(RunningReplica, "multiplexed_model_ids"), property), MOVED
    assert compat.multiplexed_models(object()) is None


def test_token_auth_mode_is_readable():
    from ray._raylet import AuthenticationMode, get_authentication_mode  # noqa: F401

    assert compat.token_auth_enabled() in (True, False), MOVED


def test_counters_can_be_created_at_zero():
    from ray.util.metrics import Counter

    assert callable(getattr(Counter, "_record", None)), MOVED
    counter = Counter("rag_compat_probe_total", description="contract test", tag_keys=("k",))
    assert compat.counter_add_zero(counter, {"k": "v"}) is True, MOVED


def test_a_moved_cosmetic_api_degrades_instead_of_failing():
    class NoRecord:
        pass

    assert compat.counter_add_zero(NoRecord(), {}) is False
