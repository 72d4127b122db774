"""Start JupyterLab and drive it in headless Chromium (used by tests/test_browser.py).

Kept apart from the tests so that they read as: open a notebook, run it, check what the reader sees.
"""
from __future__ import annotations

import html
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = os.environ.get("FSO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
#: JupyterLab settings for the test: no news popup, every cell rendered (no windowed notebook).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def missing_requirements() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python Playwright is not installed (pip install playwright; never `playwright install`)"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_notebooks_without_outputs(source: Path, target: Path) -> list[str]:
    """Copy every notebook of ``source`` with outputs and execution counts removed; return their names."""
    import nbformat

    target.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(source.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.outputs = []
                cell.execution_count = None
        nbformat.write(notebook, target / path.name)
        names.append(path.name)
    return names


def mirror_repository(repo: Path, target: Path) -> None:
    """Make ``target`` look like the repository around ``target/notebooks``: link every other top-level entry
    (``data/``, ``benchmarks/``, ...) so that notebooks reading ``../data/...`` find it. Only the notebook
    copies are real files, so autosave can never rewrite the repository's notebooks."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in repo.iterdir():
        if entry.name in {"notebooks", ".git", ".venv"} or (target / entry.name).exists():
            continue
        (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())


def write_lab_settings(settings_dir: Path) -> None:
    for relative, values in LAB_SETTINGS.items():
        path = settings_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def readme_lab_arguments(readme: Path) -> list[str]:
    """The arguments of the README's command that opens the book: what follows ``jupyter lab`` on its line."""
    for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", readme.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL):
        for line in block.splitlines():
            match = re.search(r"jupyter lab\b(.*)$", line)
            if match:
                return shlex.split(match.group(1).split("&&")[0])
    raise ValueError(f"no command with `jupyter lab` in a bash block of {readme}")


@dataclass
class LabServer:
    process: subprocess.Popen
    url: str
    token: str
    root: Path
    log: Path
    runtime_dir: Path

    def api(self, method: str, path: str):
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        for kernel in self.api("GET", "/api/kernels"):
            self.api("DELETE", f"/api/kernels/{kernel['id']}")

    def shutdown_sessions(self, keep: tuple[str, ...] = ()) -> None:
        """End every notebook session (and its kernel) except those of the paths in ``keep``."""
        for session in self.api("GET", "/api/sessions"):
            if session["path"] not in keep:
                self.api("DELETE", f"/api/sessions/{session['id']}")

    def browser_open_url(self) -> str:
        """The address the server asks a browser to open: the page of the file named on its command line if
        there is one, else its default page (read from the file Jupyter writes for ``webbrowser.open``)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pages = (sorted(self.runtime_dir.glob("jpserver-file-to-run-*-open.html"))
                     or sorted(self.runtime_dir.glob("jpserver-*-open.html")))
            if pages:
                match = re.search(r'<a href="([^"]+)"', pages[0].read_text(encoding="utf-8"))
                if match:
                    return html.unescape(match.group(1))
            time.sleep(0.25)
        raise RuntimeError(f"JupyterLab wrote no browser-open file in {self.runtime_dir}")

    def stop(self) -> None:
        """Stop the server and everything it started (its kernels share its process group)."""
        if self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def start_lab(root: Path, settings_dir: Path, log: Path, extra_env: dict[str, str], timeout: float = 90,
              lab_arguments: list[str] | None = None) -> LabServer:
    """JupyterLab on a free local port with a random token, in its own process group, started in ``root``.

    ``lab_arguments`` are the reader's arguments (those of the README's command); by default the server is
    rooted at ``root``. The test's own options (port, token, no browser) come first.
    """
    port, token = free_port(), secrets.token_hex(16)
    runtime_dir = settings_dir.parent / "runtime"
    env = {**os.environ, **extra_env, "JUPYTERLAB_SETTINGS_DIR": str(settings_dir),
           "JUPYTERLAB_WORKSPACES_DIR": str(settings_dir.parent / "workspaces"), "JUPYTER_RUNTIME_DIR": str(runtime_dir)}
    env.pop("MPLBACKEND", None)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
               f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0", "--allow-root",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    command += lab_arguments if lab_arguments is not None else [f"--ServerApp.root_dir={root}"]
    handle = open(log, "wb")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=root,
                               start_new_session=True)
    server = LabServer(process, f"http://127.0.0.1:{port}", token, root, log, runtime_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {process.returncode}; see {log}")
        try:
            server.api("GET", "/api/status")
            return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"JupyterLab did not answer within {timeout} s; see {log}")


# ----------------------------------------------------------------------------- in the page
PROMPTS_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt'))
                      .map(p => p.textContent.trim())"""
OUTPUT_TEXT_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output'))
                          .map(o => o.innerText)"""


def open_notebook(page, server: LabServer, name: str, workspace: str, timeout_ms: int = 90_000) -> None:
    """Open ``name`` in a fresh workspace and wait until its kernel is ready to run cells."""
    page.goto(f"{server.url}/lab/workspaces/{workspace}/tree/{name}?token={server.token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout_ms)
    page.wait_for_selector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator[data-status="idle"]',
                           timeout=timeout_ms)
    # Idle alone is not enough before "Run All" (about 1 run in 6 did nothing): also wait for the debugger
    # button, which JupyterLab enables once the kernel has answered its info request.
    page.wait_for_selector('.jp-DebuggerBugButton[aria-disabled="false"]', timeout=timeout_ms)


def run_all_cells(page, timeout_s: float = 240) -> list[str]:
    """Run > Run All Cells, then wait until nothing is queued or running; return the input prompts."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    deadline = time.monotonic() + timeout_s
    started = False
    while time.monotonic() < deadline:
        prompts = page.evaluate(PROMPTS_JS)
        busy = any("*" in p for p in prompts)
        started = started or busy or any(any(c.isdigit() for c in p) for p in prompts)
        idle = page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').count() > 0
        if started and not busy and idle:
            return prompts
        time.sleep(0.5)
    raise TimeoutError(f"the notebook was still running after {timeout_s} s")


def save_screenshots(page, directory: Path, stem: str, element=None) -> list[Path]:
    """The visible page and, if given, one element (JupyterLab scrolls inside its panel, so a full-page
    screenshot misses content)."""
    directory.mkdir(parents=True, exist_ok=True)
    saved = []
    try:
        page.screenshot(path=str(directory / f"{stem}-page.png"))
        saved.append(directory / f"{stem}-page.png")
        if element is not None:
            element.screenshot(path=str(directory / f"{stem}-element.png"))
            saved.append(directory / f"{stem}-element.png")
    except Exception:  # noqa: BLE001 - a screenshot must never hide the real failure
        pass
    return saved


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
