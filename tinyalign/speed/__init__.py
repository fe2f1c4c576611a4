"""Speed: what makes generation fast (fused projections, the compiled decode step, continuous batching)
and the speed benchmark. May import the core and infra/."""
