"""Shards, the synthetic dyadic world and LightningDataModules (installed as dystream.datamodules)."""
