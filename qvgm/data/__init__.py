"""qvgm/data"""
