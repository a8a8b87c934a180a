#!/usr/bin/env bash
# Watch a local `rag serve` run: Debian's Prometheus (apt-get install prometheus) scraping Ray's metrics port,
# with the project's alert rules loaded. Runs in the foreground; Ctrl-C stops it.
#
#   monitoring/run-prometheus.sh [extra prometheus flags]
#
# Environment: RAG_METRICS_PORT (Ray's metrics export port, default 8080), PROM_PORT (where Prometheus
# listens, default 9090), PROM_DATA (config copy + TSDB, default .rag/prometheus), PROM_SCRAPE_INTERVAL
# (default 5s), PROMETHEUS (the binary, default: prometheus on PATH).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
metrics_port="${RAG_METRICS_PORT:-8080}"
prom_port="${PROM_PORT:-9090}"
data="${PROM_DATA:-$root/.rag/prometheus}"
interval="${PROM_SCRAPE_INTERVAL:-5s}"
bin="${PROMETHEUS:-$(command -v prometheus || true)}"

if [[ -z "$bin" || ! -x "$bin" ]]; then
  echo "prometheus not found. Install Debian's package: sudo apt-get install -y --no-install-recommends prometheus" >&2
  echo "(or set PROMETHEUS=/path/to/prometheus)" >&2
  exit 127
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$prom_port") 2>/dev/null; then
  echo "port $prom_port is already in use (Debian's prometheus service listens on 9090 once started:" >&2
  echo "'sudo systemctl stop prometheus'), or pick another: PROM_PORT=9091 $0" >&2
  exit 1
fi

mkdir -p "$data"
sed -e "s/127\.0\.0\.1:8080/127.0.0.1:${metrics_port}/" \
    -e "s/^\(  *\)scrape_interval: .*/\1scrape_interval: ${interval}/" \
    -e "s/^\(  *\)evaluation_interval: .*/\1evaluation_interval: ${interval}/" \
    "$here/prometheus.yml" > "$data/prometheus.yml"
cp "$here/alerts.yaml" "$data/alerts.yaml"

echo "Prometheus: http://127.0.0.1:${prom_port}  scraping Ray metrics at 127.0.0.1:${metrics_port} every ${interval}"
echo "  targets: http://127.0.0.1:${prom_port}/targets   alerts: http://127.0.0.1:${prom_port}/alerts   data: $data"
exec "$bin" --config.file="$data/prometheus.yml" --storage.tsdb.path="$data/tsdb" \
  --web.listen-address="127.0.0.1:${prom_port}" "$@"
