"""Layer 7, evaluation: the robustness suite of a trained classifier."""
