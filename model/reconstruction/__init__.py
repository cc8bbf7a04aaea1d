"""Image to mesh: whose crop is made (`people`), input preparation (`preprocess`), the fitted body as a
body-guided model's input (`body_guidance`), surface extraction, reconstruction, preview."""
