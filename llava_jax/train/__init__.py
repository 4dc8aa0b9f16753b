"""Training: the SFT / reward-model loop and what every trainer shares (model and trainable
split, shardings, restore, the train state, losses, optimiser, checkpoints, metrics)."""
