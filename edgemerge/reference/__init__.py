"""Pure-numpy/numba reference implementations that the native paths are checked against."""
