"""``rag``: the command line. db, attach/detach, ingest, query, serve, eval, bench.

Every command reads its defaults from ``Settings`` (env prefix ``RAG_``); flags override them. Errors the
user can fix print one line (``error: ...``) and exit with status 2; nothing prints a stack trace.

The CLI sits above every layer: the core (``rag``), the Serve app (``deployments``, for ``rag serve``) and
the benchmarks (``bench``, mounted as ``rag bench``); none of them imports it.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from rag.errors import RagError
from rag.settings import Settings, get_settings

__all__ = ["app", "main"]

app = typer.Typer(
    help="Two-stage retrieval: pgvector candidates, cross-encoder rerank, served by Ray Serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(
    help="The embedded PostgreSQL + pgvector (used when RAG_DATABASE_URL is unset).", no_args_is_help=True
)
app.add_typer(db_app, name="db")

CollectionOpt = Annotated[
    str | None,
    typer.Option("--collection", "-c", help="Collection to use (default: RAG_COLLECTION or 'default')."),
]


def _settings(**overrides: Any) -> Settings:
    return get_settings().with_overrides(**overrides)


INGEST_SKIPPED = 3  # `rag ingest` finished, but skipped some inputs


def _json_option(value: str | None, name: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"{name} must be JSON ({e.msg} at character {e.pos})") from e


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading reports, progress bars) off the user's terminal."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "sentence_transformers", "huggingface_hub", "pgserver", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)

    warnings.showwarning = show
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")


def _mount_bench() -> None:
    try:
        from bench.cli import app as bench_app
    except ImportError:  # benchmarks are optional in a trimmed install
        return
    app.add_typer(bench_app, name="bench")


# The command modules register their commands on ``app``; this order is --help's.
from ragcli import db  # noqa: E402

# isort: split
from ragcli import commands  # noqa: E402

_mount_bench()
__all__ += ["commands", "db"]


def main() -> None:
    """Entry point: one place turns expected errors into a one-line message and exit status 2."""
    _quiet_libraries()
    try:
        app()
    except RagError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except ValidationError as e:  # a bad RAG_* variable or flag value
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "settings"
            typer.secho(f"error: {where}: {err['msg']}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
