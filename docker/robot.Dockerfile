# Robot PC: ROS 2 Jazzy (rclpy, launch, ros2 CLI, message packages) with CycloneDDS, plus the qvgm stack.
# Build from the repository root:  docker build -f docker/robot.Dockerfile -t qvgm-robot .
# The install step is scripts/setup.sh, the same one a developer runs: rclpy and the messages come from
# /opt/ros/jazzy (so the ros-* wheels are excluded), Python is the distro's 3.12, torch is the CPU build.
FROM ros:jazzy-ros-base

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive

RUN apt-get update \
    && apt-get install -y --no-install-recommends ros-jazzy-rmw-cyclonedds-cpp python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/qvgm
COPY . /opt/qvgm

ENV PYTHON=/usr/bin/python3.12 \
    QVGM_PYTHON_VERSION=3.12 \
    QVGM_REQUIREMENTS_EXCLUDE="^ros-" \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1
RUN bash scripts/setup.sh && rm -rf /var/lib/apt/lists/*

ENV PATH=/opt/qvgm/.venv/bin:$PATH \
    RMW_IMPLEMENTATION=rmw_cyclonedds_cpp \
    CYCLONEDDS_URI=file:///opt/qvgm/docker/cyclonedds.xml \
    MUJOCO_GL=egl \
    PYOPENGL_PLATFORM=egl \
    QVGM_BUFFER=/data/qvgm/buffer \
    QVGM_CHECKPOINTS=/data/qvgm/checkpoints

# The base image's entrypoint sources /opt/ros/jazzy/setup.bash before running the command.
CMD ["qvgm", "up", "real"]
