"""Calibration: statistics, fitting, scoring and selection (numpy), plus the PyTorch backend."""
