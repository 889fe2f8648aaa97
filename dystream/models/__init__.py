"""Plain nn.Modules with typed config dataclasses and named presets (no losses, no Lightning)."""
