"""Evaluation: geometry metrics (Chamfer, P2S, F-score, normal consistency) and the silhouette baseline."""
