"""A PostgreSQL primary and a streaming-replication hot standby on this machine, from the embedded wheel's
own binaries (``pgserver``'s ``pginstall/bin``: initdb, pg_ctl, pg_basebackup, postgres).

Each server listens on 127.0.0.1 on a free port (and a Unix socket in its own folder). initdb's defaults
already allow what a standby needs: ``wal_level = replica``, ``max_wal_senders = 10``, ``hot_standby = on``
and ``host replication all 127.0.0.1/32 trust`` in pg_hba.conf. As root (as in CI), the servers run as the
``pgserver`` user, as the embedded server does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from helpers import free_port

__all__ = ["Server", "primary_and_standby"]


def _bin(name: str) -> str:
    from pgserver._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


USER = "pgserver" if os.geteuid() == 0 else None


def _run(*args: str, timeout: float = 60) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, user=USER, timeout=timeout)


class Server:
    """One PostgreSQL data folder and its postmaster."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout_s: float = 30.0) -> None:
        """``pg_ctl start``; retried while the backends of a killed postmaster still hold its shared memory."""
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.pgdata}"
        log = str(self.pgdata.parent / f"{self.pgdata.name}.log")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                _run(_bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-l", log, "-o", opts, "start")
                return
            except subprocess.CalledProcessError as e:
                if time.monotonic() > deadline:
                    tail = Path(log).read_text(errors="replace")[-2000:]
                    raise AssertionError(f"pg_ctl start failed: {e.stderr}\n{tail}") from e
                time.sleep(0.2)

    def kill(self) -> int:
        """SIGKILL the postmaster (its backends notice and exit); returns its pid."""
        pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        subprocess.run(
            [_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "immediate", "stop"],
            capture_output=True,
            user=USER,
            timeout=60,
        )

    def sql(self, query: str, params: Any = None) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


@contextmanager
def primary_and_standby() -> Iterator[tuple[Server, Server]]:
    """A running primary and a hot standby streaming from it (``pg_basebackup -R``); removed afterwards."""
    # Not under pytest's tmp dirs: the pgserver user must be able to traverse the path (see conftest.db_url).
    base = Path(tempfile.mkdtemp(prefix="rag-test-repl-"))
    base.chmod(0o755)
    if USER is not None:
        pw = pwd.getpwnam(USER)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    primary, standby = Server(base / "primary"), Server(base / "standby")
    try:
        _run(_bin("initdb"), "-D", str(primary.pgdata), "--auth=trust", "-U", "postgres", "-E", "utf8")
        primary.start()
        _run(
            _bin("pg_basebackup"),
            *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"),
            *("-D", str(standby.pgdata), "-R", "-X", "stream", "-c", "fast"),
        )
        standby.start()
        yield primary, standby
    finally:
        standby.stop()
        primary.stop()
        shutil.rmtree(base, ignore_errors=True)
