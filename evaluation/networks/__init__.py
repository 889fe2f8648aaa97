"""Metric networks: InceptionV3 (FID), I3D (FVD), SyncNet, pose backends."""
