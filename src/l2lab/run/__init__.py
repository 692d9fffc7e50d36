"""Running jobs: the engine, recording, interrupts, resume, progress, DDP, scale-out, sweeps."""
