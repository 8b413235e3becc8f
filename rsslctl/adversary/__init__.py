"""Layer 3, attacks on inputs: the Attack interface and adversarial training on views."""
