"""Training: the recipe schema, the trainer loop, checkpoints, evaluation and tracking."""
