"""`vemscale view LAYER...`: serve local layers with the Neuroglancer client and print the viewer URL.

    vemscale view /data/em /data/pred                        # serves them; Ctrl-C stops
    vemscale view em=/data/em seg=/data/pred:segmentation --port 8080 --bind 0.0.0.0
    vemscale view /data/em /data/pred --screenshot shot.png  # renders in headless Chromium, then exits
    vemscale view gs://bucket/em                             # remote only: a URL for the public Neuroglancer

LAYER is `[name=]url[:image|probabilities|segmentation]`: precomputed, OME-Zarr/zarr (v2, v3) or n5,
local or s3/gs/http; a `vemscale infer` output folder stands for its layers. Files Neuroglancer cannot
read (TIFF, HDF5, MRC) must be exported first.
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Any

from vemscale.errors import UserError

__all__ = ["add_arguments", "run_cli", "view"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("layers", nargs="+", metavar="LAYER", help="[name=]url[:kind] of each layer, bottom first")
    parser.add_argument("--port", type=int, default=0, help="port to serve on (default: any free port)")
    parser.add_argument("--bind", default="127.0.0.1", help="address to bind (0.0.0.0 to share on the network)")
    parser.add_argument("--screenshot", metavar="PNG", default=None, help="render in headless Chromium, save, exit")
    parser.add_argument("--size", default="1280x960", help="screenshot size WxH")
    parser.add_argument("--layout", default="4panel", help="4panel, xy, xz, yz, 3d, xy-3d, ...")
    parser.add_argument("--timeout", type=float, default=120.0, help="screenshot: seconds to wait for the viewer")


def view(layers: list[str], port: int = 0, bind: str = "127.0.0.1", screenshot: str | None = None,
         size: tuple[int, int] = (1280, 960), layout: str = "4panel", timeout: float = 120.0,
         wait: bool = True) -> dict[str, Any]:
    """Describe, serve and show `layers`; with `screenshot` render a PNG and return, else serve until Ctrl-C."""
    from vemscale.export.state import PUBLIC_VIEWER, build_state, describe_layer, expand_layer_args, state_url

    described = [describe_layer(arg) for arg in expand_layer_args(layers)]
    panels = 2 if layout == "4panel" else 1  # panels across and down, to zoom the volume to fit one
    panel_px = max(100, min(size[0] // panels, (size[1] - 60) // panels))
    names = [lay.name for lay in described]
    if len(set(names)) != len(names):
        raise UserError(f"layer names {names} repeat; name them: name=url")
    local = {lay.name: lay.local_path for lay in described if lay.local_path is not None}
    result: dict[str, Any] = {"layers": [{"name": lay.name, "kind": lay.kind, "format": lay.fmt,
                                          "shape_zyx": list(lay.shape_zyx), "segments": len(lay.segments)}
                                         for lay in described]}
    if not local:
        url = state_url(build_state(described, layout=layout, panel_pixels=panel_px), PUBLIC_VIEWER)
        print(url, flush=True)
        result["url"] = url
        if screenshot:
            from vemscale.export.browser import screenshot as shoot

            result.update(shoot(url, screenshot, size, timeout))
        return result
    from vemscale.export.server import ViewerServer

    logging.getLogger("tornado.access").setLevel(logging.WARNING)

    server = ViewerServer(local, bind, port)
    try:
        url = state_url(build_state(described, server.data_url(), layout, panel_px), server.viewer_url())
        result["url"] = url
        print(url, flush=True)
        if any(lay.local_path is None for lay in described):
            log.info("remote layers load in the browser straight from their store")
        if screenshot:
            from vemscale.export.browser import screenshot as shoot

            local_url = state_url(build_state(described, server.data_url(local=True), layout, panel_px),
                                  server.viewer_url(local=True))
            result.update(shoot(local_url, screenshot, size, timeout))
        elif wait:
            log.info("serving %s on %s; Ctrl-C to stop", ", ".join(local), server.url)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
    finally:
        server.stop()
    return result


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {args.size!r} must be WIDTHxHEIGHT, e.g. 1280x960") from None
    return view(args.layers, args.port, args.bind, args.screenshot, (w, h), args.layout, args.timeout)
