"""A page in headless Chromium, driven over the DevTools protocol (a websocket, no framework).

``with ChromiumPage(html_file) as page:`` opens the file; ``page.eval(js)`` returns a value
computed in the page, ``page.type_into(selector, text)`` focuses an element and types as a
user does (real key events: the page's ``input`` listeners fire), ``page.wait_for(js)``
polls until ``js`` is truthy, ``page.screenshot(path)``
writes a PNG; :func:`search_tree` types into a node tree's search box and waits for the
filter. :func:`chromium_binary` finds the distribution's ``chromium`` (None: not
installed)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import websocket  # websocket-client (the dev extra)

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_binary() -> Optional[str]:
    return next((found for name in _NAMES if (found := shutil.which(name))), None)


class ChromiumPage:
    def __init__(self, html_file: Path, width: int = 1100, height: int = 800, timeout: float = 30.0) -> None:
        self.html_file = Path(html_file).resolve()
        self.size = (width, height)
        self.timeout = timeout
        self._ids = itertools.count(1)

    def __enter__(self) -> "ChromiumPage":
        binary = chromium_binary()
        assert binary is not None, "no chromium binary"
        self._profile = tempfile.TemporaryDirectory(prefix="gpc-chromium-")
        self._proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--remote-debugging-port=0", f"--user-data-dir={self._profile.name}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # its own process group: its helpers are stopped with it
        try:
            port = self._port()
            target = self._page_target(port)
            self._ws = websocket.create_connection(target, timeout=self.timeout, suppress_origin=True)
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call("Page.navigate", url=self.html_file.as_uri())
            self._wait_for("Page.loadEventFired")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            ws.close()
        # chromium's helper processes (renderer, utility, crashpad) outlive the browser process
        # for a moment and keep writing into the profile: stop the whole group, then remove it
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:
                time.sleep(0.5)  # helpers of the group exit after the browser
        deadline = time.monotonic() + 10
        while True:
            try:
                shutil.rmtree(self._profile.name)
                break
            except FileNotFoundError:
                break
            except OSError:  # a helper still finishing a write
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._profile.cleanup()

    def _port(self) -> int:
        marker = Path(self._profile.name) / "DevToolsActivePort"  # chromium writes its port here
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            if self._proc.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self._proc.returncode}")
            time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port")

    def _page_target(self, port: int) -> str:
        import urllib.request

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as reply:
                pages = [t for t in json.load(reply) if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            time.sleep(0.05)
        raise TimeoutError("chromium has no page target")

    def call(self, method: str, **params: Any) -> Any:
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def _wait_for(self, event: str) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if json.loads(self._ws.recv()).get("method") == event:
                return
        raise TimeoutError(event)

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str) -> Any:
        """The value of ``expression`` once it is truthy (polled)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.02)
        raise TimeoutError(f"never true in the page: {expression}")

    def type_into(self, selector: str, text: str) -> None:
        self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        for ch in text:  # one key at a time, as typed
            self.call("Input.dispatchKeyEvent", type="keyDown", text=ch, key=ch, unmodifiedText=ch)
            self.call("Input.dispatchKeyEvent", type="keyUp", key=ch)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)


def search_tree(page: ChromiumPage, text: str) -> None:
    """Type ``text`` into a node tree's search box; return once the page has filtered for it
    (the tree records the query it last showed in ``data-query``)."""
    page.type_into("input[type=search]", text)
    page.wait_for(f"document.querySelector('.gpc-tree').getAttribute('data-query') === {json.dumps(text)}")


__all__ = ["ChromiumPage", "chromium_binary", "search_tree"]
