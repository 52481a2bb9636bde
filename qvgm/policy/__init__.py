"""qvgm/policy"""
