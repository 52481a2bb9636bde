"""`cd ros2_ws && colcon build` builds the ament_python package `qvgm` from the repository root."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_colcon_build_of_ros2_ws(tmp_path):
    ws = tmp_path / "ros2_ws"
    (ws / "src").mkdir(parents=True)
    # Same layout as ros2_ws/src/qvgm (a link to the repository root), built out of tree so the
    # test never touches the developer's ros2_ws/build.
    assert os.readlink(ROOT / "ros2_ws" / "src" / "qvgm") == "../.."
    (ws / "src" / "qvgm").symlink_to(ROOT)
    colcon = Path(sys.executable).with_name("colcon")
    assert colcon.exists(), "colcon-common-extensions is not installed in the venv"
    env = dict(os.environ, PATH=f"{colcon.parent}:{os.environ['PATH']}")
    proc = subprocess.run(
        [str(colcon), "build", "--event-handlers", "console_direct-"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    share = ws / "install" / "qvgm" / "share" / "qvgm"
    assert (share / "package.xml").is_file()
    for installed in ("launch/tabletop.launch.py", "config/tabletop_sim.yaml", "config/tabletop_real.yaml",
                      "config/robots/ur5e.yaml", "urdf/tabletop_arm.urdf"):
        assert (share / installed).is_file(), f"{installed} is not installed into share/qvgm"
    index = ws / "install" / "qvgm" / "share" / "ament_index" / "resource_index"
    assert (index / "packages" / "qvgm").is_file()
    site = list((ws / "install" / "qvgm" / "lib").glob("python3*/site-packages/qvgm"))
    assert site, "the qvgm import package was not installed"
    shutil.rmtree(ws / "build", ignore_errors=True)
