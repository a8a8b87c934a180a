"""A real multi-node Ray cluster on this machine, shaped like the KubeRay gpu overlay (imported as ``multinode``).

Each node is one ``ray start`` of this venv's CLI, in a session of its own (so the node is one process group
to kill), with its own temp dir, free ports (GCS, dashboard, agents, object manager, node manager, metrics,
a worker-port range) and the resources its KubeRay group advertises (tests/kuberay.py reads them from k8s/):
the head with ``num-cpus 0`` (no replica fits there), ``rag_cpu_worker`` nodes and ``rag_gpu_worker`` nodes
(these declare the group's ``num-gpus 1``: Ray trusts declared resources, so the Reranker's ``num_gpus 0.25``
is scheduled there; it runs on the CPU, ``rerank_device: cpu``).

It never touches another Ray on this machine: nothing uses the default ports, nothing calls ``ray stop``;
:meth:`Cluster.close` SIGKILLs its own nodes' process groups, then any process still carrying this cluster's
marker variable, and removes its temp dirs. Like the RayService (``authOptions: token``), the control plane
requires a token; it lives in the nodes' and CLIs' environment only, never in this process's.

Serve's proxies (``proxy_location: EveryNode``) would all bind one port on one machine, so each worker node
gets its own (``RAY_SERVE_WORKER_PROXY_HTTP_PORT``, Ray's knob for colocated proxies); the head's proxy
keeps ``http_options.port``. Callers use worker proxies, as the RayService's Serve Service does
(``excludeHeadPodFromServeSvc``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from kuberay import gpu_overlay_groups

BIN = Path(sys.executable).parent
MARKER = "RAG_MULTINODE_NODE"  # every process of a node inherits "<cluster id>/<node name>"
START_TIMEOUT_S = 300.0  # one `ray start` on a loaded 2-core machine
WORKER_PORTS = 64  # worker processes per node: replicas, proxy, controller, build tasks
OBJECT_STORE_BYTES = 96 * 2**20  # no large objects here; Ray's default (30% of RAM per node) is too much

__all__ = ["Cluster", "Node"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _free_range(n: int, lo: int = 20000, hi: int = 32000) -> int:
    """The first port of ``n`` consecutive free ones, below the kernel's ephemeral range and above Ray's
    default worker ports (10002-19999, which other clusters on this machine use)."""
    for _ in range(200):
        start = random.randrange(lo, hi - n)
        socks = []
        try:
            for p in range(start, start + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("", p))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports in {lo}-{hi}")


@dataclass
class Node:
    name: str  # "head", "cpu-workers-1", "gpu-workers-2"
    group: str  # the KubeRay group: "head", "cpu-workers", "gpu-workers"
    resources: dict[str, float]
    temp_dir: Path
    proxy_port: int  # its Serve proxy's HTTP port
    pgid: int = 0  # the process group (and session) of its `ray start`
    killed_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.killed_at is None


@dataclass
class Cluster:
    """Start with :meth:`start`; always :meth:`close` (a context manager does)."""

    groups: dict[str, dict[str, float]] = field(default_factory=gpu_overlay_groups)
    keep_logs: Path | None = None  # where close() copies each node's Serve and raylet logs
    nodes: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.id = secrets.token_hex(4)
        self.root = Path(tempfile.mkdtemp(prefix=f"rag-mn-{self.id}-"))  # short: Ray's socket paths
        self.token = secrets.token_hex(16)
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.serve_port = _free_port()  # http_options.port: the head's proxy

    # ----------------------------------------------------------------------------------------------
    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, node: str | None = None) -> dict[str, str]:
        """The environment of this cluster's processes and CLIs (the auth token is only ever here)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAG_MULTINODE"))}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            # how long a raylet waits for its agents (their imports take ~20 s of CPU on a busy 2-core
            # machine); a raylet that gives up anyway is retried by _wait
            RAY_agent_register_timeout_ms="180000",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
        )
        if node is not None:
            env[MARKER] = f"{self.id}/{node}"
            n = self.nodes[node]
            if n.group != "head":
                env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(n.proxy_port)
        return env

    def _args(self, node: Node) -> list[str]:
        res = node.resources
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        first = _free_range(WORKER_PORTS)
        args = [
            str(BIN / "ray"),
            "start",
            "--disable-usage-stats",
            f"--temp-dir={node.temp_dir}",
            f"--num-cpus={int(res['CPU'])}",
            f"--num-gpus={int(res['GPU'])}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--object-manager-port={_free_port()}",
            f"--node-manager-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--min-worker-port={first}",
            f"--max-worker-port={first + WORKER_PORTS - 1}",
            "--include-log-monitor=false",
        ]
        if custom:
            args.append("--resources=" + json.dumps(custom))
        if node.group == "head":
            args += [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={_free_port()}",
            ]
        else:
            args.append(f"--address=127.0.0.1:{self.gcs_port}")
        return args

    def _spawn(self, name: str, group: str) -> subprocess.Popen:
        node = Node(
            name,
            group,
            dict(self.groups[group]),
            self.root / name,
            self.serve_port if group == "head" else _free_port(),
        )
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        self.nodes[name] = node
        log = (self.root / f"{name}.start.log").open("w")
        p = subprocess.Popen(
            self._args(node),
            env=self.env(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session and process group: the node, to kill as one
        )
        node.pgid = p.pid
        return p

    def _wait(self, name: str, p: subprocess.Popen, retries: int = 1) -> None:
        """Until ``ray start`` of ``name`` returned; a failed start (a raylet that gave up on its agents on a
        busy machine) is killed and started again ``retries`` times."""
        try:
            rc = p.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        if rc == 0:
            return
        tail = (self.root / f"{name}.start.log").read_text()[-3000:]
        if retries <= 0:
            raise RuntimeError(f"`ray start` of {name} failed (exit {rc}):\n{tail}")
        self.kill(name)
        (self.root / f"{name}.start.log").rename(self.root / f"{name}.start.failed.log")
        self._wait(name, self._spawn(name, self.nodes[name].group), retries - 1)

    def start(self, workers: dict[str, int]) -> Cluster:
        """The head, then ``workers`` ({group: nodes}) in parallel; returns when every node is registered."""
        t0 = time.monotonic()
        atexit.register(self.close)  # also if pytest dies before the fixture's teardown
        self._wait("head", self._spawn("head", "head"))
        started = [
            (name, self._spawn(name, group))
            for group, n in workers.items()
            for name in (f"{group}-{i}" for i in range(1, n + 1))
        ]
        for name, p in started:
            self._wait(name, p)
        self.started_in_s = time.monotonic() - t0
        return self

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(self.keep_logs)

    # ----------------------------------------------------------------------------------------------
    def kill(self, name: str) -> float:
        """SIGKILL every process of node ``name`` (raylet, agents, workers, replicas): the node is gone, as
        when its pod is deleted. Returns the time of the kill (``time.monotonic()``)."""
        node = self.nodes[name]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.pgid, signal.SIGKILL)
        self._sweep(f"{self.id}/{name}")
        node.killed_at = time.monotonic()
        return node.killed_at

    def _sweep(self, marker: str) -> None:
        """SIGKILL any process still carrying ``marker`` (``<id>/<node>`` or ``<id>/``: the whole cluster),
        e.g. one that moved to a process group of its own."""
        needle = f"{MARKER}={marker}".encode()
        for pid in self._pids():
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{pid}/environ").read_bytes()
                if any(v.startswith(needle) for v in env.split(b"\0")):
                    os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _pids() -> list[int]:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]

    def node_of_pid(self, pid: int) -> str | None:
        """Which of this cluster's nodes runs process ``pid`` (by the marker it inherited), else None."""
        with contextlib.suppress(OSError):
            for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if v.startswith(f"{MARKER}={self.id}/".encode()):
                    return v.decode().split("/", 1)[1]
        return None

    def close(self, keep_logs: Path | None = None) -> None:
        """Kill every node (workers first), copy each node's Serve and raylet logs to ``keep_logs`` (when
        given), and remove the temp dirs; safe to call twice."""
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            if self.nodes[name].alive:
                self.kill(name)
        self._sweep(f"{self.id}/")
        if keep_logs is not None and self.root.exists():
            keep_logs.mkdir(parents=True, exist_ok=True)
            for name in self.nodes:
                for log in self.root.glob(f"{name}.start*.log"):
                    shutil.copy(log, keep_logs / log.name)
                for logs in (self.root / name).glob("session_2*/logs"):
                    dst = keep_logs / name
                    dst.mkdir(parents=True, exist_ok=True)
                    if (logs / "serve").is_dir():
                        shutil.copytree(logs / "serve", dst / "serve", dirs_exist_ok=True)
                    for f in ("raylet.out", "gcs_server.out", "dashboard_agent.log"):
                        if (logs / f).exists():
                            shutil.copy(logs / f, dst / f)
        shutil.rmtree(self.root, ignore_errors=True)

    # ----------------------------------------------------------------------------------------------
    def serve_deploy(self, config: dict[str, Any], path: Path) -> float:
        """``serve deploy`` (the CLI, against the dashboard, as KubeRay does with serveConfigV2); returns
        when Serve accepted the config."""
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        t0 = time.monotonic()
        p = subprocess.run(
            [str(BIN / "serve"), "deploy", str(path), "--address", self.dashboard],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        if p.returncode != 0:
            raise RuntimeError(
                f"serve deploy failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
            )
        return t0

    def serve_details(self) -> dict[str, Any]:
        """Serve's REST API (GET /api/serve/applications/): apps, deployments, replicas with node ids."""
        r = httpx.get(
            f"{self.dashboard}/api/serve/applications/",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
        )
        r.raise_for_status()
        return r.json()

    def replicas(self, app: str) -> dict[str, list[dict[str, Any]]]:
        """Deployment -> its replicas (Serve's ReplicaDetails, plus ``node``: which of our nodes runs it)."""
        details = self.serve_details()
        deps = (details.get("applications") or {}).get(app, {}).get("deployments") or {}
        out = {}
        for name, d in deps.items():
            out[name] = [
                {**r, "node": self.node_of_pid(r["pid"]) if r.get("pid") else None} for r in d["replicas"]
            ]
        return out

    def state(self) -> dict[str, list[dict[str, Any]]]:
        """Ray's State API (``ray.util.state.list_nodes`` / ``list_actors(detail=True)``) as the cluster's
        clients see it: run in a subprocess, which holds the token (this process never does)."""
        code = (
            "import json; from ray.util.state import list_actors, list_nodes; "
            f"a = {self.dashboard!r}; "
            "print(json.dumps({'nodes': [n.__dict__ for n in list_nodes(address=a, detail=True, limit=1000)], "
            "'actors': [x.__dict__ for x in list_actors(address=a, detail=True, limit=10000)]}, default=str))"
        )
        p = subprocess.run(
            [sys.executable, "-c", code], env=self.env(), capture_output=True, text=True, timeout=180
        )
        if p.returncode != 0:
            raise RuntimeError(f"State API failed ({p.returncode}): {p.stderr[-3000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    def proxy_url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.nodes[node].proxy_port}"


def app_config(serve_port: int, **args: Any) -> dict[str, Any]:
    """The RayService's serveConfigV2 (gpu overlay) for this machine: HTTP on 127.0.0.1:``serve_port``, the
    Reranker on the CPU of its (fake) GPU node, models offline, ``args`` (database URL, collection, ...), and
    each deployment at its autoscaling minimum as a fixed ``num_replicas`` (the autoscaler's decisions would
    tie placement and convergence to this machine's speed). Placement (``ray_actor_options``: resources,
    CPUs, GPUs), queues and user_config are the RayService's, untouched."""
    from kuberay import gpu_overlay_serve_config

    cfg = gpu_overlay_serve_config()
    cfg["http_options"].update(host="127.0.0.1", port=serve_port)
    (app,) = cfg["applications"]
    app["args"].update({"rerank_device": "cpu", "offline": True, **args})
    app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    for dep in app["deployments"]:
        auto = dep.pop("autoscaling_config", None)
        if auto is not None:
            dep["num_replicas"] = int(auto.get("min_replicas") or 1)
    return cfg
