"""qvgm/sim"""
