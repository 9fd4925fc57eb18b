"""vemscale: organelle segmentation for volume electron microscopy, from a laptop crop to a cluster."""

__version__ = "0.1.0"
