"""Image to mesh: input preparation (crop, mask, sidecars), surface extraction, reconstruction, preview."""
