"""dystream: real-time streaming dyadic (talking + listening) avatar video generation.

Layout (see docs/architecture.md):
    dystream.models       plain nn.Modules with typed configs and named presets
    dystream.diffusion    flow-matching schedule, samplers, student rollouts
    dystream.objectives   one loss file per method
    dystream.stages       one LightningModule per training stage
    dystream.streaming    StreamingAvatar, sample-file rendering, video/audio I/O
    dystream.zoo          pretrained entries, cache, verification
    dystream.datamodules  shards, the synthetic dyadic world, DataModules
    dystream.callbacks    evaluation, video logging, EMA, throughput
    dystream.evaluation   metrics and metric networks
"""

__version__ = "0.1.0"
