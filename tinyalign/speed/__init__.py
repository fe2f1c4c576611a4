"""Speed: what makes generation fast (fused projections, the compiled decode step, continuous batching)
and the speed measurements (throughput.py). May import the core and infra/."""
