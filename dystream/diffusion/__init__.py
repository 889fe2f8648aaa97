"""Flow-matching schedule, timestep shift, samplers and student rollouts over a narrow denoiser interface."""
