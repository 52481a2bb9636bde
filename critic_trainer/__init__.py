"""Offline training: SFT, RL token, Cal-QL critic ensemble, Q-VGM and baselines. Never imports rclpy."""
