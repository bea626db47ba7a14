"""Is it quantization, and where: guidelines, per-layer analysis and its report."""
