"""Post-processing of label volumes: per-label statistics and surface meshes of one block at a time."""
