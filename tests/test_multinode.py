"""Multinode tier: the app on a real multi-node Ray cluster on this machine, placed as the RayService places it.

The cluster (tests/multinode.py): ``ray start --head`` with no CPUs, plus ``ray start --address`` workers
with the resources of the KubeRay gpu overlay's groups (tests/kuberay.py reads them from k8s/): two
``rag_cpu_worker`` nodes and two ``rag_gpu_worker`` nodes (these declare the group's one GPU and run the
Reranker on the CPU). The app: the RayService's ``serveConfigV2`` as k8s/generate.py rendered it
(k8s/overlays/gpu/serve-config.yaml), with this machine's database, offline models and small limits,
deployed with ``serve deploy`` against the dashboard, as KubeRay deploys it. Callers enter through the
worker nodes' Serve proxies, where the RayService's Serve Service sends them (``excludeHeadPodFromServeSvc``).

In order (they share the cluster):

1. placement: every replica runs on a node of the group that advertises its deployment's resource, none on
   the head (it has no CPUs), and Ray sees each node with its group's resources;
2. node loss: the GPU node that runs the Reranker is SIGKILLed (raylet, agents, replicas) under open-loop
   load: callers get 200s in dense order with a reason, no error, until Serve runs a new Reranker on the
   other GPU node; how long each step took is measured;
3. rolling update: ``serve deploy`` with changed batch knobs (user_config), Reranker replicas (1 -> 2) and
   reranker model (another local folder) under load: no request lost, none failed but with a 503 and
   Retry-After; the time until Serve reports RUNNING with only new replicas and /info shows the new config.

``slow`` (opt-in): a CPU node killed under load (the Embedder's, with an Ingress).

Figures: ``<basetemp>/multinode-report.json`` and a summary table on the terminal (``make test-multinode``).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ingest_demo, wait_ready
from multinode import Cluster, app_config
from traffic import Answer, Load, assert_no_bugs, figures, kinds, recovered, write_report

pytestmark = pytest.mark.multinode

APP = "rag"
WORKERS = {"cpu-workers": 2, "gpu-workers": 2}
# This machine's adaptations: small requests, one thread per model, torch (no OpenVINO compile or int8
# calibration at start, and here single-threaded the faster: 18 vs 10 pairs/s under load), no score cache
# (repeated queries must reach the Reranker).
TEST_ARGS = {
    "fetch_k": 10,
    "top_k": 5,
    "embedding_threads": 1,
    "rerank_threads": 1,
    "embedding_runtime": "torch",
    "rerank_runtime": "torch",
    "rerank_cache": False,
}
# One search a second, ~10 short pairs each: well within one Reranker replica's pace on a loaded 2-core
# machine (~20 pairs/s; Ray runs its workers niced), so what callers see is the fault, not a backlog.
EVERY_S = 1.0
DEPLOY_TIMEOUT_S = 600.0  # a cold deploy on a loaded 2-core machine: ~90 s
RECOVERY_TIMEOUT_S = 240.0
REPORT: dict[str, dict[str, Any]] = {}


# --------------------------------------------------------------------------------------------------
# fixtures: the cluster, a collection, the app
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    t0 = time.monotonic()
    with Cluster(keep_logs=tmp_path_factory.getbasetemp() / "multinode-logs") as c:
        c.start(WORKERS)
        REPORT["tier"] = {
            "nodes": {n: node.group for n, node in c.nodes.items()},
            "start_s": round(c.started_in_s, 1),
        }
        try:
            yield c
        finally:
            REPORT["tier"]["module_s"] = round(time.monotonic() - t0, 1)
            REPORT["machine"] = _machine()
            path = tmp_path_factory.getbasetemp() / "multinode-report.json"
            write_report(REPORT, path, "multinode figures", request.config, _table())


@pytest.fixture(scope="module")
def mn_collection(store, embedder):
    name = ingest_demo(store, embedder, "mn", 120, chars=200)
    yield name
    store.drop_collection(name)


@pytest.fixture(scope="module")
def standin(state_dir: Path) -> Path:
    """The offline stand-in reranker, built before any replica needs it (replicas would each build it)."""
    from rag.models import build_standin_cross_encoder

    return build_standin_cross_encoder(state_dir / "models")


@pytest.fixture(scope="module")
def app(cluster: Cluster, db_url: str, state_dir: Path, mn_collection: str, standin: Path) -> dict[str, Any]:
    """The RayService's serveConfigV2, deployed; returns the config as deployed."""
    cfg = app_config(
        cluster.serve_port,
        database_url=db_url,
        data_dir=str(state_dir),
        collection=mn_collection,
        **TEST_ARGS,
    )
    t0 = cluster.serve_deploy(cfg, cluster.root / "serve-v1.yaml")
    _wait_running(cluster, t0 + DEPLOY_TIMEOUT_S)
    for url in entry_urls(cluster):
        wait_ready(url)
    REPORT["tier"]["deploy_s"] = round(time.monotonic() - t0, 1)
    return cfg


def _wait_running(cluster: Cluster, deadline: float) -> dict[str, Any]:
    while True:
        app = (cluster.serve_details().get("applications") or {}).get(APP) or {}
        if app.get("status") == "RUNNING":
            return app
        assert app.get("status") != "DEPLOY_FAILED", app.get("message")
        assert time.monotonic() < deadline, (
            f"app not RUNNING in time: {app.get('status')} {app.get('message')}"
        )
        time.sleep(1.0)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def deployments(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in cfg["applications"][0]["deployments"]}


def replica_count(dep: dict[str, Any]) -> int:
    return int(dep.get("num_replicas") or 1)


def group_of(cluster: Cluster, dep: dict[str, Any]) -> str:
    """The one group whose nodes advertise every custom resource the deployment asks for."""
    wanted = set((dep.get("ray_actor_options") or {}).get("resources") or {})
    (group,) = [g for g, res in cluster.groups.items() if wanted and wanted <= set(res)]
    return group


def entry_urls(cluster: Cluster, exclude: Collection[str] = ()) -> list[str]:
    """The Serve proxies of worker nodes that run replicas and whose proxy is healthy, but ``exclude``:
    where the RayService's Serve Service sends callers (it leaves out the head and pods not ready)."""
    proxies = cluster.serve_details().get("proxies") or {}
    nodes = {r["node"]: r["node_id"] for rs in cluster.replicas(APP).values() for r in rs if r["node"]}
    urls = [
        cluster.proxy_url(n)
        for n, nid in sorted(nodes.items())
        if n not in exclude
        and cluster.nodes[n].group != "head"
        and (proxies.get(nid) or {}).get("status") == "HEALTHY"
    ]
    assert urls, f"no healthy worker proxy besides {exclude}: {proxies}"
    return urls


def by_status(answers: list[Answer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in answers:
        out[str(a.status)] = out.get(str(a.status), 0) + 1
    return dict(sorted(out.items()))


def _machine() -> dict[str, Any]:
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = info.get("flags", "").split()
    return {
        "cpu": f"{info.get('model name')} (family {info.get('cpu family')}, model {info.get('model')})",
        "cpus": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
    }


def _table() -> str:
    """The headline figures, one row per fault."""
    rows = [("", "sent", "answered", "by status", "by kind", "recovered/converged s")]
    for name, r in REPORT.items():
        if "sent" not in r:
            continue
        done = r.get("converged_s", r.get("recovery_s"))
        rows.append(
            (
                name,
                str(r["sent"]),
                str(r["answered"]),
                " ".join(f"{k}:{v}" for k, v in r["by_status"].items()),
                " ".join(f"{k}:{v}" for k, v in r.get("all_kinds", r["kinds"]).items()),
                str(done),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    t = REPORT.get("tier", {})
    lines.append(
        f"cluster start {t.get('start_s')} s, deploy {t.get('deploy_s')} s, module {t.get('module_s')} s"
    )
    return "\n".join(["", "multinode summary:", *lines])


# --------------------------------------------------------------------------------------------------
# 1. placement
# --------------------------------------------------------------------------------------------------
def test_every_replica_runs_on_its_worker_group(cluster: Cluster, app: dict[str, Any]) -> None:
    replicas = cluster.replicas(APP)
    placed: dict[str, list[str]] = {}
    for name, dep in deployments(app).items():
        group = group_of(cluster, dep)
        reps = replicas[name]
        assert len(reps) == replica_count(dep) and all(r["state"] == "RUNNING" for r in reps), (name, reps)
        placed[name] = sorted(r["node"] for r in reps)
        assert all(r["node"] and cluster.nodes[r["node"]].group == group for r in reps), (name, group, placed)
    # Ray's own view: every node with its group's resources, the controller on the head, no replica there
    state = cluster.state()
    node_of_id = {a["node_id"]: cluster.node_of_pid(a["pid"]) for a in state["actors"] if a.get("pid")}
    alive = [n for n in state["nodes"] if n["state"] == "ALIVE"]
    assert len(alive) == len(cluster.nodes), alive
    advertised = {g: {k: float(v) for k, v in res.items() if v} for g, res in cluster.groups.items()}
    seen = []
    for n in alive:
        name = node_of_id.get(n["node_id"])
        res = {
            k: float(v)
            for k, v in n["resources_total"].items()
            if v and k not in ("memory", "object_store_memory") and not k.startswith("node:")
        }
        matches = [g for g, want in advertised.items() if want == res]
        assert len(matches) == 1 and (matches[0] == "head") == n["is_head_node"], (n, matches)
        assert name is None or cluster.nodes[name].group == matches[0], (name, n)
        seen.append(matches[0])
    assert sorted(seen) == sorted(node.group for node in cluster.nodes.values()), seen
    (controller,) = [
        a for a in state["actors"] if a["class_name"] == "ServeController" and a["state"] == "ALIVE"
    ]
    head_id = next(n["node_id"] for n in alive if n["is_head_node"])
    assert controller["node_id"] == head_id
    on_head = [
        a["name"] for a in state["actors"] if a["node_id"] == head_id and "ServeReplica" in a["class_name"]
    ]
    assert not on_head, on_head
    REPORT["placement"] = {
        "replicas": placed,
        "groups": {g: {k: v for k, v in r.items() if v} for g, r in cluster.groups.items()},
    }


# --------------------------------------------------------------------------------------------------
# 2. a GPU node lost under load
# --------------------------------------------------------------------------------------------------
def kill_node_under_load(cluster: Cluster, deployment: str, name: str) -> tuple[list[Answer], dict[str, Any]]:
    """SIGKILL the node that runs ``deployment``'s replica under load; wait for Serve to run a new one on
    another node, then for normal answers. Records when Serve's controller saw the replica gone, when Ray
    declared the node dead (its end time in the State API) and when the new replica was RUNNING."""
    before = cluster.replicas(APP)
    (old,) = before[deployment]
    victim = old["node"]
    urls = entry_urls(cluster, exclude={victim})
    gone_s = back_s = None
    new_node = None
    with Load(*urls, every_s=EVERY_S) as load:
        assert load.wait_until(lambda a: sum(x.kind == "reranked" for x in a) >= 4, 120), kinds(load.answers)
        wall = time.time()
        fault_at = cluster.kill(victim)
        while back_s is None and time.monotonic() - fault_at < RECOVERY_TIMEOUT_S:
            reps = cluster.replicas(APP)[deployment]
            now = round(time.monotonic() - fault_at, 2)
            if gone_s is None and not any(
                r["replica_id"] == old["replica_id"] and r["state"] == "RUNNING" for r in reps
            ):
                gone_s = now
            new = [r for r in reps if r["replica_id"] != old["replica_id"] and r["state"] == "RUNNING"]
            if new:
                back_s, new_node = now, new[0]["node"]
            time.sleep(0.5)
        ok = back_s is not None and load.wait_until(recovered(time.monotonic(), n=6), 180)
        time.sleep(1.0)
    answers = list(load.answers)
    dead = [n for n in cluster.state()["nodes"] if n["node_id"] == old["node_id"]]
    REPORT[name] = fig = figures(answers, fault_at)
    fig.update(
        sent=load.sent,
        answered=len(answers),
        by_status=by_status(answers),
        all_kinds=kinds(answers),
        killed=victim,
        lost_with_it={d: len([r for r in rs if r["node"] == victim]) for d, rs in before.items()},
        replica_moved_to=new_node,
        controller_saw_replica_gone_s=gone_s,
        ray_declared_node_dead_s=(
            round(dead[0]["end_time_ms"] / 1000 - wall, 2) if dead and dead[0].get("end_time_ms") else None
        ),
        new_replica_running_s=back_s,
    )
    assert back_s is not None, f"no new {deployment} replica within {RECOVERY_TIMEOUT_S:.0f}s: {fig}"
    assert ok, f"not answering normally within 180s of the new replica: {fig}"
    assert new_node != victim and cluster.nodes[new_node].group == cluster.nodes[victim].group, fig
    assert load.sent == len(answers), f"{load.sent - len(answers)} requests got no answer: {fig}"
    assert_no_bugs(answers)  # every failure a 503 with Retry-After
    return answers, fig


def test_gpu_node_loss_degrades_to_dense_then_recovers(cluster: Cluster, app: dict[str, Any]) -> None:
    answers, fig = kill_node_under_load(cluster, "Reranker", "gpu_node_kill")
    # the Reranker's node gone never fails a search: dense order, with the reason, until it is back
    assert all(a.status == 200 for a in answers), fig
    degraded = [a for a in answers if a.kind != "reranked"]
    assert degraded and all(a.kind.startswith("dense:") for a in degraded), fig


# --------------------------------------------------------------------------------------------------
# 3. a rolling update under load
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def new_model(standin: Path, tmp_path: Path) -> Path:
    """The "new" reranker: the stand-in from another local folder (hard links, no copy)."""
    dst = tmp_path / "reranker-v2"
    shutil.copytree(standin, dst, copy_function=os.link)
    return dst


def _updated(cfg: dict[str, Any], model: Path) -> dict[str, Any]:
    """``cfg`` with half the batch sizes (user_config), two Reranker replicas and another reranker model."""
    new = copy.deepcopy(cfg)
    deps = deployments(new)
    emb, rr = deps["Embedder"]["user_config"], deps["Reranker"]["user_config"]
    emb.update(max_batch_size=emb["max_batch_size"] // 2, batch_wait_timeout_s=0.002)
    rr.update(max_batch_size=rr["max_batch_size"] // 2, max_pairs_per_batch=rr["max_pairs_per_batch"] // 2)
    deps["Reranker"]["num_replicas"] = replica_count(deps["Reranker"]) + 1
    new["applications"][0]["args"]["rerank_model"] = str(model)
    return new


def _info_shows(info: dict[str, Any], cfg: dict[str, Any]) -> bool:
    deps, st = deployments(cfg), info.get("stages") or {}
    rr, emb = st.get("reranker") or {}, st.get("embedder") or {}
    return (
        rr.get("model") == cfg["applications"][0]["args"]["rerank_model"]
        and all((rr.get("user_config") or {}).get(k) == v for k, v in deps["Reranker"]["user_config"].items())
        and all(
            (emb.get("user_config") or {}).get(k) == v for k, v in deps["Embedder"]["user_config"].items()
        )
    )


def test_rolling_update_under_load_loses_nothing(
    cluster: Cluster, app: dict[str, Any], new_model: Path
) -> None:
    new = _updated(app, new_model)
    before = {d: {r["replica_id"] for r in rs} for d, rs in cluster.replicas(APP).items()}
    want = {name: replica_count(dep) for name, dep in deployments(new).items()}
    urls = entry_urls(cluster)
    serve_s = info_s = None
    with Load(*urls, every_s=EVERY_S) as load:
        assert load.wait_until(lambda a: sum(x.kind == "reranked" for x in a) >= 4, 120), kinds(load.answers)
        t0 = cluster.serve_deploy(new, cluster.root / "serve-v2.yaml")
        accepted_s = round(time.monotonic() - t0, 2)
        streak = 0
        while info_s is None and time.monotonic() - t0 < DEPLOY_TIMEOUT_S:
            details = (cluster.serve_details().get("applications") or {}).get(APP) or {}
            reps = cluster.replicas(APP)
            fresh = all(
                len(reps.get(d, [])) == n
                and all(
                    r["state"] == "RUNNING" and r["replica_id"] not in before.get(d, set()) for r in reps[d]
                )
                for d, n in want.items()
            )
            if details.get("status") == "RUNNING" and fresh:
                serve_s = serve_s or round(time.monotonic() - t0, 2)
                r = httpx.get(urls[0] + "/info", timeout=30)
                streak = streak + 1 if r.status_code == 200 and _info_shows(r.json(), new) else 0
                if streak >= 5:
                    info_s = round(time.monotonic() - t0, 2)
            time.sleep(0.5)
        time.sleep(2.0)
    answers = list(load.answers)
    during = [a for a in answers if a.end > t0]
    failed = [a for a in answers if a.status != 200]
    placed = {d: sorted(r["node"] for r in rs) for d, rs in cluster.replicas(APP).items()}
    REPORT["rolling_update"] = {
        "sent": load.sent,
        "answered": len(answers),
        "by_status": by_status(answers),
        "kinds": kinds(during),
        "failed": len(failed),
        "retry_after_on_503": all(a.retry_after is not None for a in failed if a.status == 503),
        "slowest_s": round(max((a.seconds for a in during), default=0.0), 2),
        "deploy_accepted_s": accepted_s,
        "serve_running_s": serve_s,
        "converged_s": info_s,
        "placement_after": placed,
        "changed": {
            "Embedder.user_config": deployments(new)["Embedder"]["user_config"],
            "Reranker.user_config": deployments(new)["Reranker"]["user_config"],
            "Reranker.num_replicas": want["Reranker"],
            "rerank_model": "another local folder (the stand-in, hard-linked)",
        },
    }
    fig = REPORT["rolling_update"]
    assert info_s is not None, f"not converged within {DEPLOY_TIMEOUT_S:.0f}s: {fig}"
    assert load.sent == len(answers), f"{load.sent - len(answers)} requests got no answer: {fig}"
    assert_no_bugs(answers)
    assert all(a.status == 503 for a in failed), fig  # deliberate, with Retry-After (assert_no_bugs)
    for name, dep in deployments(new).items():
        group = group_of(cluster, dep)
        assert all(cluster.nodes[n].group == group for n in placed[name]), (name, placed)


# --------------------------------------------------------------------------------------------------
# slow: a CPU node lost under load
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cpu_node_loss_answers_503_then_recovers(cluster: Cluster, app: dict[str, Any]) -> None:
    """The Embedder's CPU node (with an Ingress, maybe the Retriever) SIGKILLed under load: searches get
    503 + Retry-After (no live Embedder) until Serve runs a new one on the other CPU node."""
    answers, fig = kill_node_under_load(cluster, "Embedder", "cpu_node_kill")
    failed = [a for a in answers if a.status != 200]
    assert failed and all(a.kind == "503:unavailable" for a in failed), fig
