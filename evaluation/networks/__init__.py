"""Metric networks: InceptionV3 (FID), I3D (FVD), SyncNet, pose backends; S3FD and Light-ASD (active-speaker
detection, shared by data packing and the speaking segments of the metrics)."""
