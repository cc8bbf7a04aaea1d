"""The PIFuHD networks (normal nets, hourglass filters, MLPs, the two-level model), their config and checkpoints."""
