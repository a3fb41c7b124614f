"""Curvature pieces: loss factors, Gram assembly, targets and solves."""
