"""ament_python build of the ROS 2 package `qvgm` (colcon) and a plain pip-installable distribution."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "qvgm"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=["qvgm", "qvgm.*", "qvgm_policy_node", "qvgm_policy_node.*",
                                    "critic_trainer", "critic_trainer.*"]),
    package_data={"qvgm": ["assets/*"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + PACKAGE]),
        ("share/" + PACKAGE, ["package.xml"]),
        ("share/" + PACKAGE + "/launch", glob("launch/*.py")),
        ("share/" + PACKAGE + "/config", glob("config/*.yaml") + glob("config/*.xml")),
        ("share/" + PACKAGE + "/config/robots", glob("config/robots/*.yaml")),
        ("share/" + PACKAGE + "/urdf", glob("urdf/*")),
    ],
    zip_safe=False,
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "qvgm = qvgm_policy_node.cli:main",
            "sim_node = qvgm_policy_node.sim_node:main",
            "policy_node = qvgm_policy_node.policy_node:main",
            "camera_node = qvgm_policy_node.camera_node:main",
            "recorder_node = qvgm_policy_node.recorder_node:main",
            "episode_manager = qvgm_policy_node.episode_manager:main",
            "teleop_node = qvgm_policy_node.teleop_node:main",
            "critic_trainer = critic_trainer.cli:main",
        ],
    },
)
