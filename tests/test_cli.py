"""The `rag` command as a user runs it: one-line errors naming the fix, never a stack trace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def rag(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ragcli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, db_url):
    d = tmp_path_factory.mktemp("cli")
    return {
        "RAG_DATA_DIR": str(d),
        "RAG_DATABASE_URL": db_url,
        "RAG_OFFLINE": "1",
        "RAG_COLLECTION": "cli_" + d.name.replace("-", "_").lower()[:20],
    }


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "ragcli", "--help"], capture_output=True, text=True).stdout
    for cmd in ("db", "ingest", "query", "serve", "eval"):
        assert cmd in out


def test_no_help_text_is_eaten_as_rich_markup():
    """Typer renders help through Rich markup, where "[default: x]" or "[the folder's name]" is a style tag and
    vanishes ("Collection to use ."). Every command's and option's help must print as written."""
    import typer
    from rich.text import Text

    from ragcli import app

    lost = []

    def walk(cmd, path: str) -> None:
        texts = [("help", cmd.help or "")] + [(p.name, getattr(p, "help", None) or "") for p in cmd.params]
        lost.extend(f"{path} {name}: {t!r}" for name, t in texts if Text.from_markup(t).plain != t)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "rag")
    assert not lost, "write (...) instead of [...] in these help texts:\n" + "\n".join(lost)


def test_ingest_query_round_trip_and_errors(cli_env, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "gliders.md").write_text("Gliders soar on thermals: rising columns of warm air.")
    (docs / "bread.txt").write_text("Bread rises because yeast ferments sugar into carbon dioxide.")
    (docs / "broken.txt").write_bytes(b"\xff\xfe\x80\x81")
    r = rag("ingest", str(docs), "--json", env=cli_env)
    assert r.returncode == 3, r.stderr  # finished, and says it skipped something (broken.txt)
    rep = json.loads(r.stdout)
    assert rep["documents_added"] == 2 and len(rep["skipped"]) == 1 and "broken.txt" in rep["skipped"][0]
    again = json.loads(rag("ingest", str(docs), "--json", env=cli_env).stdout)
    assert again["documents_added"] == 0 and again["documents_unchanged"] == 2

    # stage 1 finds the right file (the stand-in reranker's order is arbitrary, so judge the dense order)
    r = rag("query", "how do gliders stay up", "--no-rerank", "--top-k", "1", "--json", env=cli_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["results"][0]["source"].endswith("gliders.md") and out["reranked"] is False

    r = rag("query", "how do gliders stay up", "--fetch-k", "2", "--top-k", "1", "--json", env=cli_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["timings_ms"]) >= {"embed", "retrieve", "rerank", "total"} and out["reranked"] is True
    assert out["reranker"]["trained"] is False and len(out["results"]) == 1

    plain = rag("query", "bread", "--fetch-k", "2", "--top-k", "2", env=cli_env)
    assert "STAND-IN" in plain.stdout + plain.stderr and "timings:" in plain.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("query", "   "), "non-empty"),
        (("query", "x", "--top-k", "0"), "top_k must be an integer >= 1"),
        (("query", "x", "--fetch-k", "5", "--top-k", "8"), "larger than fetch_k"),
        (("query", "x", "--fetch-k", "5000"), "above the maximum"),
        (("ingest", "/definitely/not/here"), "path not found"),
        (("query", "x", "--collection", "Bad-Name"), "lower-case"),
        (("query", "x", "--collection", "never_ingested"), "does not exist"),
    ],
)
def test_bad_input_is_one_line_with_the_fix(cli_env, args, message):
    r = rag(*args, env=cli_env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


def test_database_down_names_url_without_password(cli_env):
    env = {
        **cli_env,
        "RAG_DATABASE_URL": "postgresql://app:s3cret@127.0.0.1:1/rag",
        "RAG_CONNECT_TIMEOUT_S": "1",
    }
    r = rag("query", "x", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "s3cret" not in r.stderr and "app:***@127.0.0.1:1" in r.stderr and "rag db start" in r.stderr


def test_missing_cohere_key(cli_env):
    env = {**cli_env, "RAG_RERANKER": "cohere", "CO_API_KEY": "", "RAG_COHERE_API_KEY": ""}
    r = rag("query", "bread", "--fetch-k", "2", "--top-k", "1", env=env)
    assert r.returncode == 2 and "CO_API_KEY" in r.stderr and "Traceback" not in r.stderr


def test_embedded_database_lifecycle_keeps_data():
    base = Path(tempfile.mkdtemp(prefix="rag-cli-db-"))
    base.chmod(0o755)  # the postgres user (pgserver) must traverse it when running as root
    env = {"RAG_DATA_DIR": str(base), "RAG_DATABASE_URL": "", "RAG_OFFLINE": "1"}
    try:
        r = rag("db", "start", env=env)
        assert r.returncode == 0 and "running" in r.stdout, r.stderr
        url = rag("db", "url", env=env).stdout.strip()
        assert url.startswith("postgresql://") and str(base) in url
        import psycopg

        with psycopg.connect(url, autocommit=True) as c:
            c.execute("CREATE TABLE keepme (x int)")
            c.execute("INSERT INTO keepme VALUES (42)")
        assert rag("db", "stop", env=env).stdout.strip() == "stopped"
        st = rag("db", "status", env=env)
        assert st.returncode == 1 and "stopped" in st.stdout
        assert rag("db", "start", env=env).returncode == 0
        with psycopg.connect(rag("db", "url", env=env).stdout.strip()) as c:
            assert c.execute("SELECT x FROM keepme").fetchone() == (42,)
        assert rag("db", "status", env=env).returncode == 0
    finally:
        rag("db", "stop", env=env)
        shutil.rmtree(base, ignore_errors=True)


def test_ingest_skips_what_it_cannot_store_and_says_so_in_its_exit_status(cli_env, tmp_path):
    (tmp_path / "ok.txt").write_text("Thread locks serialise access to shared state.")
    (tmp_path / "nul.txt").write_text("a \x00 byte")
    env = {**cli_env, "RAG_COLLECTION": cli_env["RAG_COLLECTION"][:30] + "_skip"}
    r = rag("ingest", str(tmp_path), env=env)
    assert r.returncode == 3, r.stderr  # finished, with skips (documented in --help)
    assert "nul.txt" in r.stderr and "NUL" in r.stderr and "Traceback" not in r.stderr
    assert "1 added" in r.stdout and "1 skipped" in r.stdout
    assert "Exit status" in rag("ingest", "--help", env=env).stdout
