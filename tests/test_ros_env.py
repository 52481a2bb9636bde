import os
import socket

from qvgm_policy_node.ros_env import apply_loopback_env, pick_free_domain_id


def test_session_runs_on_loopback_with_a_domain():
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert 1 <= int(os.environ["ROS_DOMAIN_ID"]) <= 101


def test_busy_domain_is_skipped():
    busy = pick_free_domain_id()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 7400 + 250 * busy + 10))
        for _ in range(50):
            assert pick_free_domain_id() != busy


def test_apply_keeps_existing_domain_when_asked(monkeypatch):
    monkeypatch.setenv("ROS_DOMAIN_ID", "42")
    assert apply_loopback_env(keep_existing_domain=True) == 42
    assert os.environ["ROS_DOMAIN_ID"] == "42"
