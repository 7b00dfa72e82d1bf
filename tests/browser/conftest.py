"""Fixtures of the browser tests: a headless JupyterLab on loopback and Debian's Chromium.

JupyterLab runs as a child process on a free loopback port with a random
token, in a temporary root directory holding a copy of the notebooks under
test. Its kernels get ``DATABASE_URL``/``REDIS_URL`` and the test run's
``TOOLKIT_NAMESPACE``/``TOOLKIT_SCHEMA``, so they write only to this run's
isolated schema and namespace. The browser is ``/usr/bin/chromium`` driven by
Playwright (never ``playwright install``: no browser is downloaded).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Servers

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Lab:
    """A running JupyterLab: where it listens and its root directory."""

    port: int
    token: str
    root: Path

    def url(self, path: str) -> str:
        """Return the URL of ``path`` on this server, with the token."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET") -> Any:
        """Call the server's REST API; return the decoded JSON (``None`` when empty)."""
        request = urllib.request.Request(self.url(path), method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
        return json.loads(body) if body else None


def free_port() -> int:
    """Return a TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lab_env(servers: Servers, home: Path) -> dict[str, str]:
    """The Jupyter server's environment: the test servers, and settings kept under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "TOOLKIT_"))}
    env.update({
        "DATABASE_URL": servers.database_url, "REDIS_URL": servers.redis_url,
        "TOOLKIT_NAMESPACE": servers.namespace, "TOOLKIT_SCHEMA": servers.schema,
        "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "PYTHONWARNINGS": "ignore",
    })
    return env


def quiet_lab(settings_dir: Path) -> None:
    """Turn off JupyterLab's news and update toasts (no network, nothing over the widget)."""
    path = settings_dir / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False,
                                "doNotDisturbMode": True}))


def wait_until_up(lab: Lab, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the server answers ``/api/status`` (fail with its log if it dies or hangs)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            lab.api("api/status")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    pytest.fail(f"jupyter lab did not answer in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def stop_lab(lab: Lab, proc: subprocess.Popen[bytes]) -> None:
    """Shut the server (and its kernels) down through its API, else terminate it."""
    try:
        lab.api("api/shutdown", method="POST")
        proc.wait(timeout=20)
    except (urllib.error.URLError, ConnectionError, TimeoutError, subprocess.TimeoutExpired):
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def lab(clean: Servers, tmp_path: Path) -> Iterator[Lab]:
    """A headless JupyterLab on loopback whose root holds a copy of ``notebooks/``."""
    root = tmp_path / "root"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    server = Lab(free_port(), secrets.token_hex(16), root)
    log = tmp_path / "jupyter.log"
    args = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={server.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={server.token}", f"--ServerApp.root_dir={root}",
            "--allow-root", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    quiet_lab(tmp_path / "home" / "settings")
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                env=lab_env(clean, tmp_path / "home"), cwd=root)
    try:
        wait_until_up(server, proc, log)
        yield server
    finally:
        stop_lab(server, proc)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A Playwright page in Debian's headless Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            yield context.new_page()
            context.close()
        finally:
            browser.close()
