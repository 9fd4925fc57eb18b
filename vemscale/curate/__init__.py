"""`vemscale curate`: a pre-training corpus from many volumes and image folders (sample, filter, de-duplicate)."""
