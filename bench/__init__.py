"""pyflat's benchmarks: ratios against autograd baselines measured in the same run."""
