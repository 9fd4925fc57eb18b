"""A local HTTP server for `vemscale view`: the Neuroglancer client plus the layers' files.

- `/v/<token>/...`: the client shipped in the neuroglancer pip package (it only starts under a `/v/<token>/`
  path); it takes the viewer state from the URL fragment.
- `/events/<token>`: an idle event stream, so the client (built for the Python integration) stays quiet
  instead of reporting a lost Python server; `/state|action/<token>` POSTs are accepted and ignored.
- `/data/<layer>/...`: each layer's directory with CORS and HTTP Range (sharded layers read byte ranges),
  through `neuroglancer.static_file_server.CorsStaticFileHandler`.
"""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.parse
from typing import Mapping

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web
from neuroglancer.async_util import BackgroundTornadoServer
from neuroglancer.random_token import make_random_token
from neuroglancer.static import get_default_static_content_source
from neuroglancer.static_file_server import CorsStaticFileHandler

__all__ = ["ViewerServer"]


class _ClientHandler(tornado.web.RequestHandler):
    def initialize(self, source) -> None:
        self.source = source

    def get(self, path: str) -> None:
        try:
            data, content_type = self.source.get(path, "")
        except ValueError:
            self.send_error(404)
            return
        self.set_header("Content-Type", content_type)
        self.finish(data)


class _EventsHandler(tornado.web.RequestHandler):
    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        try:
            while True:
                self.write(": idle\n\n")
                await self.flush()
                await asyncio.sleep(20)
        except tornado.iostream.StreamClosedError:
            return


class _IgnoreHandler(tornado.web.RequestHandler):
    def post(self, *args: str) -> None:
        self.set_status(204)
        self.finish()

    get = post


class ViewerServer(BackgroundTornadoServer):
    """Serve the client and `layers` ({name: local directory}) on `bind_address:port` (0 = any free port)."""

    def __init__(self, layers: Mapping[str, str], bind_address: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(daemon=True)
        self.layers = dict(layers)
        self.bind_address = bind_address
        self.port = int(port)
        self.token = make_random_token()

    def _attempt_to_start_server(self) -> None:
        t = self.token
        handlers: list = [
            (rf"/v/{t}/(.*)", _ClientHandler, {"source": get_default_static_content_source()}),
            (rf"/events/{t}", _EventsHandler),
            (rf"/(?:state|action)/{t}", _IgnoreHandler),
            (r"/favicon.ico", _IgnoreHandler),
        ]
        for name, path in self.layers.items():
            handlers.append((rf"/data/{re.escape(urllib.parse.quote(name))}/(.*)", CorsStaticFileHandler, {"path": path}))
        self.app = tornado.web.Application(handlers)
        self.http_server = tornado.httpserver.HTTPServer(self.app)
        sockets = tornado.netutil.bind_sockets(port=self.port, address=self.bind_address)
        self.http_server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        wildcard = self.bind_address in ("0.0.0.0", "::", "")
        self.url = f"http://{socket.getfqdn() if wildcard else self.bind_address}:{self.port}"
        self.local_url = f"http://{'127.0.0.1' if wildcard else self.bind_address}:{self.port}"

    def data_url(self, local: bool = False) -> str:
        """Base URL of the served layers (`<data_url>/<name>/`); `local` for a browser on this machine."""
        return f"{self.local_url if local else self.url}/data"

    def viewer_url(self, local: bool = False) -> str:
        return f"{self.local_url if local else self.url}/v/{self.token}/"
