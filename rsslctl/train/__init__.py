"""Layer 6, training: the pretraining loop, classifier training (fine-tuning, linear probes) and monitors."""
