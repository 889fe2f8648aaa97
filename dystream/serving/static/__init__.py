"""The web page that `dystream serve` serves (HTML, JS, CSS; data files, no code)."""
