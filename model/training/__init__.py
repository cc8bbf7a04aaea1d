"""Training: the three stages as loss modules, their losses, and the augmentations inference's inputs need."""
