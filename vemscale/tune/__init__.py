"""Sweeps on Ray Tune: fine-tuning runs over arms x a search space x seeds, then statistics, plots, a report.

- `config`: the sweep config model (`SweepConfig`) and how one trial's fine-tune config is composed.
- `validate`: every arm x search-space value checked against `FinetuneConfig` before any trial starts.
- `space`: the search space as Ray Tune domains (grid, choice, uniform, loguniform).
- `trainable`: the function trainable that builds and fits one trial's Ray Train `TorchTrainer`.
- `results`: one row per trial (`trials.csv`) from the Tune results and the trials' own metrics.
- `stats`: per-arm mean/std/n and Mann-Whitney U between arms.
- `plots`: box plots per metric (one box per arm) and metric-vs-iteration curves per arm.
- `report`: `summary.csv`, `pvalues.csv`, `report.md`, `report.json`.
- `run`: the `vemscale sweep` stage (start, `--resume`, `--check`).
"""
