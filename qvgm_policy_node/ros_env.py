"""DDS environment for processes on this machine: discovery on loopback and a per-run domain id.

Imported (and applied) before rclpy by tests, `make`, benchmarks and `qvgm up`. Never imports rclpy itself.
A domain is "free" when the unicast metatraffic port of its first participant (Fast DDS / Cyclone default
port mapping: 7400 + 250*domain + 10) can be bound on 127.0.0.1, i.e. no participant of another run uses it.
"""

from __future__ import annotations

import os
import random
import socket

# Domain ids 0..101 keep every participant's ports below the ephemeral range on Linux.
_MAX_DOMAIN = 101


def _domain_port_free(domain_id: int) -> bool:
    port = 7400 + 250 * domain_id + 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_free_domain_id(rng: random.Random | None = None) -> int:
    """A domain id in 1..101 that no DDS participant on this host is using right now."""
    rng = rng or random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    candidates = list(range(1, _MAX_DOMAIN + 1))
    rng.shuffle(candidates)
    for domain_id in candidates:
        if _domain_port_free(domain_id):
            return domain_id
    raise RuntimeError("no free ROS_DOMAIN_ID in 1..101 on this host")


def apply_loopback_env(domain_id: int | None = None, *, keep_existing_domain: bool = False) -> int:
    """Set ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and ROS_DOMAIN_ID in os.environ; returns the domain id.

    Must run before rclpy is imported/initialised in this process; children inherit the environment.
    """
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.pop("ROS_LOCALHOST_ONLY", None)  # deprecated variable; the range above replaces it
    if domain_id is None:
        existing = os.environ.get("ROS_DOMAIN_ID")
        domain_id = int(existing) if keep_existing_domain and existing else pick_free_domain_id()
    os.environ["ROS_DOMAIN_ID"] = str(domain_id)
    return domain_id


if __name__ == "__main__":
    print(pick_free_domain_id())
