"""One objective per file, named after its method."""
