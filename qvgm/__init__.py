"""qvgm core library: policy, data, sim, checkpoints, safety. Never imports rclpy."""

__version__ = "0.1.0"
