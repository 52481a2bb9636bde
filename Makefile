# Every target that touches ROS 2 runs with DDS discovery on loopback and a free per-run domain id.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
ROS_ENV = ROS_DOMAIN_ID=$$($(PY) -m qvgm_policy_node.ros_env)
PYTEST_ARGS ?=

.PHONY: setup demo loop expert-demo test test-all lint colcon bench clean
setup:
	@bash scripts/setup.sh

# The learn-from-experience loop (issue 7): demos -> SFT -> round 0 eval -> [ROS rollouts -> Q-VGM -> hot reload of the
# running policy node -> eval] x 2; WORK=runs/loop (summary.json, loop.png); rerun resumes. `make loop` is the same.
demo loop: setup
	$(ROS_ENV) $(PY) -m qvgm_policy_node.loop $(LOOP_ARGS)

# The scripted expert driving the simulated tabletop through the ROS topics (per-episode success).
expert-demo: setup
	$(ROS_ENV) $(PY) -m qvgm_policy_node.demo $(DEMO_ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(ROS_ENV) $(PY) -m pytest -q -m "not slow" --durations=15 $(PYTEST_ARGS)

test-all: setup
	$(ROS_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

colcon: setup
	cd ros2_ws && source ../$(VENV)/bin/activate && colcon build --event-handlers console_direct-

bench: setup
	$(ROS_ENV) $(PY) bench/sim_throughput.py

clean:
	rm -rf ros2_ws/build ros2_ws/install ros2_ws/log
