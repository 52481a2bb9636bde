"""rclpy nodes: thin adapters between ROS 2 messages and the `qvgm` core library."""
