"""Training data: synthetic people (anny bodies with garments), real scans, rendering, labelled points."""
