"""Benchmarks: `python -m vemscale.bench.<stage>` prints a small table of throughput numbers."""


def emit(result: dict, json_out: str | None) -> int:
    """Print a benchmark's result as one JSON line (the last line) and, if asked, write it to `json_out`."""
    import json
    from pathlib import Path

    print(json.dumps(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return 0
