"""pid_fast: fused Physics Informed Distillation for diffusion models."""
