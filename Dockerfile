# merger: one image for the API and the workers. No model weights inside: input models come from the
# read-only /models mount (MERGER_MODEL_ROOTS) and results go to the store volume (MERGER_HOME=/data).
#
#   CPU image (api, cpu worker):  docker build -t merger:cpu .
#   CUDA image (gpu worker):      docker build -t merger:cuda --build-arg TORCH_INDEX= .
#
# torch is installed first, on its own, from TORCH_INDEX: PyTorch's CPU index by default (a CPU-only
# wheel, no CUDA libraries). An empty TORCH_INDEX means pip's default index, PyPI, whose Linux x86_64
# torch wheel is the CUDA build (the CUDA runtime comes as nvidia-* wheels; the host needs only the
# NVIDIA driver and the NVIDIA Container Toolkit); TORCH_INDEX=https://download.pytorch.org/whl/cuXXX
# picks a particular CUDA version instead.
# The rest of merger's dependencies are then installed with that torch held fixed.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    MERGER_TOOLS_DIR=/opt/merger-tools
# a compiler for llama-cpp-python (the gguf extra: llama.cpp's quantizer), which PyPI ships as source only
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC" \
 && pip freeze | grep -i '^torch==' > /opt/torch-constraint.txt \
 && cat /opt/torch-constraint.txt

# Dependencies first, read from pyproject.toml: this layer is rebuilt when pyproject.toml changes,
# not on every source edit. EXTRAS: comma-separated optional-dependency groups (postgres for the
# compose stack's database, gguf for GGUF quantize stages and llama.cpp evaluation, lm-eval for
# lm-evaluation-harness tasks; the gemma extra is left out on purpose: it is model weights).
WORKDIR /src
COPY pyproject.toml README.md ./
ARG EXTRAS=postgres,gguf,lm-eval
RUN python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; x = p.get("optional-dependencies", {}); print("\n".join(p["dependencies"] + [r for e in sys.argv[1].split(",") if e for r in x[e]]))' "$EXTRAS" > /tmp/requirements.txt \
 && cat /tmp/requirements.txt \
 && pip install -c /opt/torch-constraint.txt -r /tmp/requirements.txt

# merger itself (not editable), then a check that the service's modules import
COPY merger ./merger
COPY worker ./worker
RUN pip install -c /opt/torch-constraint.txt --no-deps . \
 && pip check \
 && python -c "import torch, uvicorn, merger.cli, merger.service.api, merger.service.client, worker.tasks; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && merger setup-gguf


FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MERGER_HOME=/data \
    MERGER_MODEL_ROOTS=/models \
    MERGER_TOOLS_DIR=/opt/merger-tools

# Non-root. /data belongs to it, so a new named volume mounted there starts out writable by it
# (Docker copies the image directory's owner into an empty named volume).
RUN useradd --create-home --uid 10001 --user-group merger \
 && mkdir -p /data /models \
 && chown merger:merger /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/merger-tools /opt/merger-tools

USER merger
WORKDIR /home/merger
EXPOSE 8000

CMD ["merger", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
