# Trainer: CUDA PyTorch, no ROS. Runs critic_trainer on the shared replay buffer and publishes checkpoints
# into the shared store. Build from the repository root:  docker build -f docker/trainer.Dockerfile -t qvgm-trainer .
# The install step is scripts/setup.sh: the ros-* and colcon wheels are excluded, and the CPU torch pin of
# constraints.txt is dropped so requirements.txt's torch==2.13.0 resolves to PyPI's CUDA build (it carries
# the CUDA runtime; the host needs only the NVIDIA driver and container toolkit).
FROM python:3.11-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive

WORKDIR /opt/qvgm
COPY . /opt/qvgm

ENV QVGM_REQUIREMENTS_EXCLUDE="^(ros-|colcon-)" \
    QVGM_CONSTRAINTS_EXCLUDE="^torch==" \
    PIP_NO_CACHE_DIR=1
RUN bash scripts/setup.sh && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/qvgm/.venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MUJOCO_GL=egl \
    PYOPENGL_PLATFORM=egl \
    QVGM_BUFFER=/data/qvgm/buffer \
    QVGM_CHECKPOINTS=/data/qvgm/checkpoints

ENTRYPOINT ["critic_trainer"]
CMD ["--help"]
