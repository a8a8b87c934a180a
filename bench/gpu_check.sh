#!/usr/bin/env bash
# GPU check for the reranker (issue 6). Prepared for a CUDA machine; nothing in CI runs it or needs a GPU.
#
#   bench/gpu_check.sh [OUT_DIR]        (default results/gpu; needs the project's venv with a CUDA torch)
#
# 1. environment: nvidia-smi, torch.cuda;
# 2. `rag bench rerank` on CUDA in fp16 and in bf16: the seed's CrossEncoder.predict fp32 side by side,
#    GPU matmul peak (fp32/fp16/bf16), fraction of the floor, fidelity to fp32 on 50 queries;
# 3. Serve with four Reranker replicas on one GPU (num_gpus 0.25 each, from serve_config.yaml), checks that
#    four processes hold the GPU, then `rag bench serve` at concurrency 1, 4, 16, 32 (JSON + PNG).
# 2b. `rag bench llm-rerank` on CUDA: pairs/s of the LLM reranker at Qwen3-Reranker-0.6B's size (random weights).
#
# Environment: DATASET (Cranfield BEIR folder, default ../shared/datasets/cranfield), RAG (the rag command),
# PY (python), PORT (8000), METRICS_PORT (8080). The Serve app and Ray are shut down on exit.
set -euo pipefail

OUT=${1:-results/gpu}
DATASET=${DATASET:-../shared/datasets/cranfield}
RAG=${RAG:-.venv/bin/rag}
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8000}
METRICS_PORT=${METRICS_PORT:-8080}
export RAG_OFFLINE=${RAG_OFFLINE:-1} TOKENIZERS_PARALLELISM=false RAG_SERVE_PORT=$PORT RAG_METRICS_PORT=$METRICS_PORT
mkdir -p "$OUT"
log() { printf '\n== %s ==\n' "$*"; }

log "1. environment"
nvidia-smi | tee "$OUT/nvidia-smi.txt"
$PY - <<'EOF' | tee "$OUT/torch-cuda.txt"
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device: install a CUDA build of torch==2.13.0"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
EOF
[ -f "$DATASET/corpus.jsonl" ] || { echo "Cranfield not found at $DATASET (set DATASET)"; exit 2; }

log "2. reranker benchmark on CUDA, fp16 and bf16 (seed fp32 side by side)"
for dt in float16 bfloat16; do
  RAG_RERANK_DEVICE=cuda RAG_EMBEDDING_DEVICE=cuda "$RAG" bench rerank --dataset "$DATASET" --dtype "$dt" \
    --queries 30 --fidelity-queries 50 --out "$OUT/rerank-$dt.json" | tee "$OUT/rerank-$dt.txt"
done

log "2b. LLM reranker (issue 23): the stand-in and a random Qwen3-Reranker-0.6B-sized model on CUDA"
RAG_RERANK_DEVICE=cuda "$RAG" bench llm-rerank --real-pairs 64 --out "$OUT/llm-rerank.json" | tee "$OUT/llm-rerank.txt"

log "3. four reranker replicas on one GPU (num_gpus 0.25 each)"
$PY - "$OUT/serve_4x025.yaml" <<'EOF'
import sys
import yaml

cfg = yaml.safe_load(open("serve_config.yaml"))
app = cfg["applications"][0]
app["args"]["rerank_device"] = "cuda"
for d in app["deployments"]:
    if d["name"] == "Reranker":
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 4
        d.setdefault("ray_actor_options", {})["num_gpus"] = 0.25
cfg["http_options"]["host"] = "127.0.0.1"
yaml.safe_dump(cfg, open(sys.argv[1], "w"), sort_keys=False)
print("wrote", sys.argv[1])
EOF
# ingest Cranfield into the collection 'cranfield' once (rag eval does it on first use)
"$RAG" eval "$DATASET" --no-rerank --json > "$OUT/eval-stage1.json"
"$RAG" serve --config "$OUT/serve_4x025.yaml" > "$OUT/serve.log" 2>&1 &
SERVE=$!
trap 'kill -INT $SERVE 2>/dev/null || true; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$PORT/readyz" > /dev/null && break
  kill -0 $SERVE 2>/dev/null || { echo "rag serve exited; see $OUT/serve.log"; exit 1; }
  sleep 2
done
curl -sf "http://127.0.0.1:$PORT/readyz" | tee "$OUT/readyz.json"; echo
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv | tee "$OUT/gpu-processes.csv"
n=$(($(wc -l < "$OUT/gpu-processes.csv") - 1))
echo "processes on the GPU: $n (expected: 4 reranker replicas)"
"$RAG" bench serve --collection cranfield --concurrency 1,4,16,32 --duration 30 --no-inprocess \
  --rerank-json "$OUT/rerank-float16.json" --dataset "$DATASET" --out-dir "$OUT" | tee "$OUT/serve.txt"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv | tee "$OUT/gpu-processes-after.csv"
log "done: $OUT"
