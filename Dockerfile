# CPU image by default; for GPUs pass a CUDA PyTorch base, e.g.
#   docker build --build-arg BASE=pytorch/pytorch:2.7.0-cuda12.6-cudnn9-runtime -t moe .
ARG BASE=python:3.11-slim
FROM ${BASE}
WORKDIR /workspace
COPY requirements.txt requirements-dev.txt pyproject.toml ./
RUN pip install --no-cache-dir -r requirements-dev.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
CMD ["python", "train.py", "configs/tiny.yml"]
