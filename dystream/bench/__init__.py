"""`make bench` / `dystream bench <part>`: speed and memory figures, medians over repeated runs."""
