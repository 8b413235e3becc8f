"""Layer 2, networks and their training pieces: the encoder, shared losses, momentum encoders, optimisers."""
