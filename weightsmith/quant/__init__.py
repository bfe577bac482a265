"""Quantization algorithms: the grid (grid.py) and one module per algorithm, each registered in registry.py."""
