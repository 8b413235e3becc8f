"""Layer 5, a run: recipes and their validation, run directories, assembling a method from a recipe, logs."""
