"""Scoring predictions against ground truth: per-block metrics (`metrics`) and the blockwise `evaluate` stage."""
