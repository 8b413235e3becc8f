"""Layer 4, pretraining methods: the Method contract, memory shared across steps, the coreset contract."""
