# syntax=docker/dockerfile:1
# The application image: the official Ray image of the Ray version the project pins (pyproject.toml,
# k8s rayVersion), the rag-serve package, and the production models baked in so that pods never download.
#
#   GPU (production):  docker build -t rag-serve:0.1.0-ray2.60.0 .
#   CPU (kind laptop): docker build -t rag-serve:0.1.0-ray2.60.0-cpu \
#                        --build-arg RAY_TAG=2.60.0-py311-cpu \
#                        --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Tests (tests/test_k8s.py) keep RAY_TAG's version equal to rayVersion and to the ray pin in pyproject.toml.
ARG RAY_TAG=2.60.0-py311-gpu

# ---- build the wheel (only pyproject.toml and the two packages: see .dockerignore) ----
FROM rayproject/ray:${RAY_TAG} AS wheel
# COPY --chown creates /home/ray/src owned by ray (a WORKDIR-created folder could be root's): the build writes there.
COPY --chown=ray:users pyproject.toml /home/ray/src/
COPY --chown=ray:users rag /home/ray/src/rag
COPY --chown=ray:users deployments /home/ray/src/deployments
WORKDIR /home/ray/src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /home/ray/wheels .

# ---- the runtime image ----
# checkov:skip=CKV_DOCKER_2: Kubernetes ignores HEALTHCHECK; KubeRay injects liveness and readiness probes
FROM rayproject/ray:${RAY_TAG}
ARG TORCH_INDEX_URL=""
# Pin model revisions (commit ids on the Hugging Face hub) for reproducible images; "main" takes the latest.
ARG EMBEDDING_MODEL=sentence-transformers/all-MiniLM-L6-v2
ARG EMBEDDING_MODEL_REVISION=main
ARG RERANK_MODEL=cross-encoder/ms-marco-MiniLM-L-6-v2
ARG RERANK_MODEL_REVISION=main

LABEL org.opencontainers.image.title="rag-serve" \
      org.opencontainers.image.description="Two-stage retrieval (pgvector + cross-encoder rerank) on Ray Serve" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=wheel --chown=ray:users /home/ray/wheels /home/ray/wheels
# The int8 extra (NNCF) quantizes the reranker below, at build time.
# DL3013 ("pin versions in pip"): the argument is the wheel built above from this commit, and its dependencies
# are bounded by pyproject.toml; there is no unpinned package name here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
      "$(ls /home/ray/wheels/*.whl)[int8]" \
    && rm -rf /home/ray/wheels

# Bake the models into a Hugging Face cache inside the image: at run time the hub ids in serve_config.yaml
# resolve from this cache (rag.models: source "hf-cache") with HF_HUB_OFFLINE=1, never from the network.
ENV HF_HOME=/home/ray/hf
RUN python -c "import sys; from huggingface_hub import snapshot_download; \
[snapshot_download(repo, revision=rev, ignore_patterns=['onnx/*', 'openvino/*', '*.onnx', '*.h5', '*.msgpack', '*.ot', 'tf_model*', 'flax_model*', 'rust_model*']) \
 for repo, rev in zip(sys.argv[1::2], sys.argv[2::2])]" \
      "${EMBEDDING_MODEL}" "${EMBEDDING_MODEL_REVISION}" "${RERANK_MODEL}" "${RERANK_MODEL_REVISION}"

# Offline from here on. Fail the build if either model would not load from the image alone, or if the
# reranker would fall back to the untrained offline stand-in.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1
RUN python -c "import sys; from pathlib import Path; from rag.models import resolve_cross_encoder, resolve_embedder; \
e = resolve_embedder(sys.argv[1], offline=True); \
r = resolve_cross_encoder(sys.argv[2], cache_dir=Path('/tmp/rag-models'), offline=True); \
print(e, r); \
assert e.source in ('packaged', 'hf-cache') and r.source == 'hf-cache' and r.trained, (e, r)" \
      "${EMBEDDING_MODEL}" "${RERANK_MODEL}" \
    && rm -rf /tmp/rag-models

# The reranker's OpenVINO IR and its int8 copy (NNCF post-training quantization, calibrated on stdlib
# docstrings), built once here: CPU replicas read them from RAG_RERANK_IR_DIR (read-only) instead of
# converting and quantizing at start-up. Compiled blobs are CPU-specific: dropped, rebuilt under /tmp.
ENV RAG_RERANK_IR_DIR=/home/ray/rag-ir
RUN python -c "import sys; from rag.rerank import CrossEncoderReranker; \
r = CrossEncoderReranker(sys.argv[1], cache_dir='/home/ray/rag-ir', device='cpu', runtime='openvino', screen='int8', offline=True); \
print(r.info()); assert r.engine.int8_xml.exists(), r.engine.int8_xml" \
      "${RERANK_MODEL}" \
    && rm -rf /home/ray/rag-ir/openvino/*/blobs /home/ray/rag-ir/openvino/*/screen-speed.json

# Pods run with a read-only root filesystem and an emptyDir at /tmp: everything the process writes goes there.
ENV RAG_DATA_DIR=/tmp/rag \
    HF_MODULES_CACHE=/tmp/hf-modules \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1

# The Ray image's non-root user (uid 1000, group users/100); the k8s manifests run as the same ids.
USER 1000:100
