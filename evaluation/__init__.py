"""Metrics and metric networks (installed as dystream.evaluation)."""
