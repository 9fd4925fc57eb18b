"""`vemscale instances`: objects (instances, per-object morphometrics) from a prediction, blockwise."""
