# tnas on a CUDA runtime: the same torch==2.11.0 wheel the Makefile uses provides libtorch (CUDA 13).
# Build: docker build -t tnas .   Run: docker run --gpus all -p 8080:8080 tnas
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS base
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV TNAS_CACHE=/opt/tnas
RUN python3 -m venv $TNAS_CACHE/venv && $TNAS_CACHE/venv/bin/pip install --no-cache-dir torch==2.11.0 nvidia-cuda-crt==13.0.88 numpy pillow safetensors

FROM base AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential curl make \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
RUN touch $TNAS_CACHE/venv/.tnas-setup-2 && make release TNAS_CACHE=$TNAS_CACHE

FROM base
COPY --from=build /src/target/release/tnas-server /src/target/release/tnas-train /usr/local/bin/
COPY models /models
# The model for requests that name none; the deployments inherit it (override to serve another).
ENV TNAS_DEFAULT_MODEL=omniglot-tnas-six-clean2
EXPOSE 8080
ENTRYPOINT ["tnas-server", "--models", "/models", "--host", "0.0.0.0", "--port", "8080", "--device", "auto"]
