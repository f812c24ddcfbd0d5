"""Training: the Lightning module (loss, metrics, optimiser), callbacks, checkpoints, training-set
statistics and model preparation."""
