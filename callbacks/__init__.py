"""Lightning callbacks: evaluation, video logging, EMA, throughput (installed as dystream.callbacks)."""
