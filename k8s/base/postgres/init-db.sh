#!/usr/bin/env bash
# Runs once, on the first start of an empty data directory (/docker-entrypoint-initdb.d of the postgres image),
# as the superuser: creates the extensions in database "rag" (vector: pgvector; vectorscale: pgvectorscale's
# StreamingDiskANN index; pg_textsearch: the BM25 index, which needs shared_preload_libraries=pg_textsearch,
# as the StatefulSet's args set) and the unprivileged role the application connects as, and makes that role the
# owner of the database (and so of schema public). The role cannot create these extensions itself: vectorscale
# and pg_textsearch are not trusted extensions (superuser only).
# It also creates the role "replicator" (REPLICATION, nothing else) and lets it stream WAL from anywhere in the
# cluster network with a password (the image's pg_hba.conf admits "all" databases, which does not cover
# replication connections): what the read replicas of k8s/components/read-replica copy and follow.
set -euo pipefail
app_password="$(<"${RAG_DB_PASSWORD_FILE}")"
replication_password="$(<"${RAG_REPLICATION_PASSWORD_FILE}")"
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}" \
  --set=app_user="${RAG_DB_USER}" --set=app_password="${app_password}" --set=db="${POSTGRES_DB}" \
  --set=replication_password="${replication_password}" <<'EOSQL'
CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS vectorscale;
CREATE EXTENSION IF NOT EXISTS pg_textsearch;
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password';
ALTER DATABASE :"db" OWNER TO :"app_user";
ALTER SCHEMA public OWNER TO :"app_user";
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'replication_password';
EOSQL
echo "host replication replicator all scram-sha-256" >> "${PGDATA}/pg_hba.conf"
