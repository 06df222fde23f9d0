"""Headless Chromium driven over the DevTools protocol: open a page, query its DOM, screenshot it.

Used by the tests to check pages the way a person sees them (the report from disk, the MLflow UI
from its server). Chromium (Debian package `chromium`) starts headless with its own throw-away
profile and a DevTools port it picks itself (`--remote-debugging-port=0`, read back from the
profile's `DevToolsActivePort`); the protocol runs over a websocket (aiohttp, which Ray already
brings). Every network request the page makes is recorded from `Network.requestWillBeSent`.
The browser runs in its own process group, which `close()` terminates.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio", "--hide-scrollbars")


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """The path of a Chromium binary on PATH ($MEMLAYERS_CHROMIUM first), or None."""
    override = os.environ.get("MEMLAYERS_CHROMIUM")
    if override:
        return shutil.which(override) or (override if Path(override).is_file() else None)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """One headless browser with one page; use as a context manager."""

    def __init__(self, *, width: int = 1280, height: int = 900, binary: str | None = None,
                 start_timeout: float = 60.0) -> None:
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise BrowserError("no Chromium found (install the Debian package `chromium`)")
        self.width, self.height = width, height
        self.profile = Path(tempfile.mkdtemp(prefix="memlayers-chromium-"))
        self.events: list[dict] = []
        self._next_id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._loop = asyncio.new_event_loop()
        self._session = self._ws = self._reader = None
        self.process = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            self._run(self._connect(start_timeout))
        except BaseException:
            self.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------------
    def _run(self, coro, timeout: float | None = None):
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout) if timeout else coro)

    async def _connect(self, timeout: float) -> None:
        import aiohttp

        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.is_file() or len(port_file.read_text().split()) < 2:
            if self.process.poll() is not None:
                raise BrowserError(f"Chromium exited at start-up with code {self.process.returncode}")
            if time.monotonic() > deadline:
                raise BrowserError(f"Chromium did not open its DevTools port within {timeout:.0f} s")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession()
        targets = []
        while not targets:
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = [t for t in await response.json() if t.get("type") == "page"]
            if not targets:
                if time.monotonic() > deadline:
                    raise BrowserError("Chromium opened no page target")
                await asyncio.sleep(0.1)
        self._ws = await self._session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = self._loop.create_task(self._read())
        for domain in ("Page", "Network", "Runtime"):
            await self._call(f"{domain}.enable")
        await self._call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                         deviceScaleFactor=1, mobile=False)

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def _call(self, method: str, **params) -> dict:
        self._next_id += 1
        future = self._loop.create_future()
        self._pending[self._next_id] = future
        await self._ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        reply = await future
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def call(self, method: str, timeout: float = 60.0, **params) -> dict:
        """One DevTools protocol command; returns its result."""
        return self._run(self._call(method, **params), timeout)

    # -- what tests use ---------------------------------------------------------------------------
    def open(self, url: str, timeout: float = 60.0) -> None:
        """Navigate and wait for the load event (all images and styles loaded), unless only the
        #fragment changes (single-page apps route there; use `wait_for` for their content)."""
        start = len(self.events)

        async def navigate():
            reply = await self._call("Page.navigate", url=url)
            if reply.get("errorText"):
                raise BrowserError(f"cannot open {url}: {reply['errorText']}")
            if "loaderId" not in reply:
                return  # a same-document navigation (only the #fragment changed): no load event
            while not any(e["method"] == "Page.loadEventFired" for e in self.events[start:]):
                await asyncio.sleep(0.05)

        self._run(navigate(), timeout)

    def evaluate(self, expression: str, timeout: float = 30.0):
        """The value of a JavaScript expression in the page (promises awaited, JSON-able results)."""
        result = self.call("Runtime.evaluate", timeout, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails'].get('text')}: {expression[:200]}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.25):
        """Poll `expression` until it is truthy; returns its value (BrowserError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:.0f} s waiting for: {expression[:200]}")
            self._run(asyncio.sleep(interval))

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """A PNG of the page (the whole scrollable page when `full_page`)."""
        params: dict = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": max(size["width"], 1), "height": max(size["height"], 1),
                                "scale": 1})
        data = self.call("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def requested_urls(self) -> list[str]:
        """Every URL the page asked the network stack for, in order."""
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    # -- shutdown ---------------------------------------------------------------------------------
    def close(self) -> None:
        async def disconnect():
            if self._ws is not None:
                try:
                    await asyncio.wait_for(self._call("Browser.close"), 5)
                except Exception:
                    pass
                await self._ws.close()
            if self._reader is not None:
                self._reader.cancel()
            if self._session is not None:
                await self._session.close()

        try:
            if not self._loop.is_closed():
                self._run(disconnect())
                self._loop.close()
        finally:
            self._ws = self._session = self._reader = None
            if self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGTERM)
                    self.process.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(self.process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.process.wait(10)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
