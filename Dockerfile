# CPU image by default: torch comes from requirements.txt's pin. For GPUs build on a CUDA PyTorch base whose torch
# is in the supported range (2.11-2.13); the image keeps that base's torch (launch/docker_requirements.py swaps the
# pin for the base's version, and refuses a base torch outside the range), e.g.
#   docker build --build-arg BASE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime -t moe .
ARG BASE=python:3.11-slim
FROM ${BASE}
WORKDIR /workspace
COPY requirements.txt requirements-dev.txt pyproject.toml ./
COPY launch/docker_requirements.py launch/
RUN python launch/docker_requirements.py requirements-dev.txt > /tmp/requirements-image.txt \
    && pip install --no-cache-dir -r /tmp/requirements-image.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
CMD ["python", "train.py", "configs/tiny.yml"]
