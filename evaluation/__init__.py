"""Metrics and metric networks (installed as dystream.evaluation).

The metric functions are pure and document the protocol they follow (docs/evaluation.md):

- `frechet_distance` (FID, FVD) from features or cached `FeatureStats`;
- `sync_scores` (Sync-C / Sync-D from SyncNet embeddings, syncnet_python's +-15-frame offset search);
- `listening_variances`, `hkv`, `hkc` (keypoint variances over masked frames);
- `identity_drift` (distance to the reference over long streams).

Metric networks load only from explicit files; a missing or wrong file raises `MetricWeightsMissing`
(a `MetricUnavailable`), which tables report as "n/a (reason)".
"""

from dystream.evaluation.frechet import FeatureStats, frechet_distance, frechet_distance_from_stats
from dystream.evaluation.identity import identity_drift
from dystream.evaluation.keypoints import (
    COCO_WHOLEBODY_133,
    DWPOSE_134,
    KeypointLayout,
    hkc,
    hkv,
    listening_variances,
)
from dystream.evaluation.sync import sync_scores
from dystream.evaluation.weights import MetricDependencyMissing, MetricUnavailable, MetricWeightsMissing

__all__ = [
    "COCO_WHOLEBODY_133",
    "DWPOSE_134",
    "FeatureStats",
    "KeypointLayout",
    "MetricDependencyMissing",
    "MetricUnavailable",
    "MetricWeightsMissing",
    "frechet_distance",
    "frechet_distance_from_stats",
    "hkc",
    "hkv",
    "identity_drift",
    "listening_variances",
    "sync_scores",
]
