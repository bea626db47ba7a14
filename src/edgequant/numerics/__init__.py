"""Numbers, no graphs: scales and zero points, rounding, power-of-2 exponents, range
statistics, fake-quant, schemes and cross-rank reduction."""
