"""Experiments: speed and accuracy benchmarks, the non-local (cumulene twist) suite and k-chains."""
