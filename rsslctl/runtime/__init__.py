"""Layer 1, the process: torch.distributed membership and collectives, atomic checkpoint files."""
