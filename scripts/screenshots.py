"""README screenshots from a real headless browser: the MLflow runs table, a training run's metric
charts, the DVC plots page and the Snakemake report of a finished run, as PNGs.

    python scripts/screenshots.py                                    # the default run, into docs/
    python scripts/screenshots.py --params config/smoke.yaml --out /tmp/shots

Run it in the project folder after the pipeline (`snakemake --cores all`). It needs Chromium
(Debian: `apt-get install -y chromium`). It starts `mlflow ui` on the run's tracking store, on
127.0.0.1 and a free port, for the duration and stops it after; `dvc plots show` renders the report's
plots (image plots: no network); `snakemake --report` renders the report. The browser runs headless,
driven through the DevTools protocol on a pipe (no port), and may resolve and reach 127.0.0.1 only.
Each page is shot once it has rendered (its rows, charts or images are there); one that does not
render in time, or comes out blank (one colour), is an error.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, ImageStat

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SHOTS = {                                         # name -> what it shows
    "mlflow-runs": "the MLflow runs table of the run's experiment",
    "mlflow-training": "a training run's metric charts in MLflow",
    "dvc-plots": "the page of `dvc plots show`",
    "snakemake-report": "the Snakemake report (`snakemake --report`)",
}


def fail(message: str):
    sys.exit(f"screenshots: error: {message}")


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    fail("no Chromium found: apt-get install -y chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback(url: str) -> bool:
    return urllib.parse.urlparse(url).hostname in ("127.0.0.1", "localhost", "::1")


def wait_for(url: str, seconds: float, proc: subprocess.Popen | None = None) -> None:
    """Until `url` answers 200 (or `proc` exits, or `seconds` pass: one-line error)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            fail(f"the server for {url} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        time.sleep(0.5)
    fail(f"{url} did not answer within {seconds:.0f} s")


@contextlib.contextmanager
def mlflow_ui(store: str, log: Path):
    """`mlflow ui` on 127.0.0.1 over the tracking store `store`; yields its base URL. The server is
    started in a process group of its own, which is ended on exit."""
    if store.startswith(("http://", "https://")):
        if not loopback(store):
            fail(f"the tracking server {store} is not on this machine; run against its sqlite store")
        wait_for(store.rstrip("/") + "/health", 30)
        yield store.rstrip("/")
        return
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(["mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/health", 300, proc)
        wait_for(f"{base}/ajax-api/2.0/mlflow/experiments/search?max_results=1", 60, proc)   # the API answers too
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def blank(path: Path) -> bool:
    """True when the picture is (nearly) one colour: the page did not render."""
    with Image.open(path) as im:
        return max(ImageStat.Stat(im.convert("L")).stddev) < 2.0


class Chromium:
    """Headless Chromium driven through the DevTools protocol on a pipe (its fds 3 and 4: JSON
    messages ended by NUL), one page. Names resolve to nothing but loopback."""

    def __init__(self, exe: str, profile: Path):
        cmd_r, cmd_w = os.pipe()                       # we write commands, it reads them on fd 3
        res_r, res_w = os.pipe()                       # it writes results on fd 4, we read them

        def fds():
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
             "--disable-default-apps", "--no-default-browser-check", "--mute-audio", "--remote-debugging-pipe",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(res_w)
        self.out, self.inp, self.buf, self.n, self.session = cmd_w, res_r, b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, **params):
        """One protocol command (on the page once attached); its result."""
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self.inp, 1 << 20)
                if not chunk:
                    fail(f"Chromium exited during {method}")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.n:
                if "error" in reply:
                    fail(f"Chromium: {method}: {reply['error'].get('message')}")
                return reply["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, url: str, ready: str, wait: float) -> None:
        end = time.monotonic() + wait
        while not self.js(f"!!({ready})"):
            if time.monotonic() > end:
                fail(f"{url} did not render within {wait:.0f} s (waiting for {ready})")
            time.sleep(0.5)

    def shoot(self, url: str, path: Path, size: tuple[int, int], ready: str, wait: float, then: str = "",
              click: str = "", after: str = "", full: bool = False, until: str = "") -> None:
        """Open `url` at `size`, wait until the JS expression `ready` is true (at most `wait` s), run
        `then` (JS), run `until` (JS) again while it returns true, click the points [[x, y], ...] the JS
        `click` returns, wait for `after`, let it settle, and save a PNG of the viewport (`full`: of the
        whole page)."""
        if not (url.startswith("file://") or loopback(url)):
            fail(f"{url}: only pages on this machine are shot")
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False)
        self.call("Page.navigate", url=url)
        self.wait_for(url, ready, wait)
        if then:
            self.js(then)
            time.sleep(1.5)                               # the page lays itself out again
        end = time.monotonic() + wait
        while until and self.js(until):
            if time.monotonic() > end:
                fail(f"{url}: {until} still true after {wait:.0f} s")
            time.sleep(2)
        for x, y in self.js(click) if click else ():        # real mouse clicks (some widgets ignore .click())
            for kind in ("mousePressed", "mouseReleased"):
                self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        if then or click:
            time.sleep(1)
            self.wait_for(url, after or ready, wait)
        time.sleep(2)                                 # charts animate in, fonts settle
        if full:
            height = self.js("document.documentElement.scrollHeight")
            self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=max(size[1], int(height)),
                      deviceScaleFactor=1, mobile=False)
            time.sleep(0.5)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        if blank(path):
            fail(f"the screenshot of {url} is blank")

    def close(self):
        with contextlib.suppress(OSError, SystemExit):
            self.call("Browser.close")
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.out)
        os.close(self.inp)


def tracking_store(cfg: dict) -> str:
    """The run's MLflow store as a URI `mlflow ui` takes (a relative sqlite path made absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg["mlflow"]["tracking_uri"]
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        db = Path(uri[len(prefix):]).resolve()
        if not db.is_file():
            fail(f"no MLflow store {db}: run the pipeline first")
        uri = prefix + str(db)
    return uri


def mlflow_pages(store: str, experiment: str) -> tuple[str, str, str]:
    """(experiment id, a training run's id, its name): the run of the first `backbone` job by name."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        fail(f"no MLflow experiment {experiment!r} in {store}: run the pipeline first")
    runs = client.search_runs([exp.experiment_id], "tags.`spot.stage` = 'backbone'", max_results=100)
    runs = runs or [r for r in client.search_runs([exp.experiment_id], max_results=5000)
                    if (r.info.run_name or "").startswith("backbone/")]
    if not runs:
        fail(f"experiment {experiment!r} has no training run (stage backbone)")
    run = min(runs, key=lambda r: r.info.run_name or "")
    return exp.experiment_id, run.info.run_id, run.info.run_name


def dvc_plots(params: str, folder: Path) -> str:
    """`dvc plots show` of the report stage's plots (PNG images: the page loads nothing) into `folder`;
    its file:// URL."""
    from spot.workflow.config import load_config
    from spot.workflow.layout import Layout
    from spot.workflow.stage_table import STAGE
    cfg = load_config(params)
    report = Layout(cfg["root"])("report")
    targets = [str(report / p) for p in STAGE["report"].plots]
    missing = [t for t in targets if not Path(t).is_file()]
    if missing:
        fail(f"no {missing[0]}: run the pipeline first")
    r = subprocess.run(["dvc", "plots", "show", "-o", str(folder), *targets], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"dvc plots show failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return (folder / "index.html").resolve().as_uri()


def snakemake_report(params: str, path: Path) -> str:
    r = subprocess.run(["snakemake", "--report", str(path), "--config", f"params={params}"], capture_output=True,
                       text=True)
    if r.returncode != 0 or not path.is_file():
        fail(f"snakemake --report failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return path.resolve().as_uri()


CLOSE_ASSISTANT = """(() => {                       // MLflow 3 opens its assistant panel: close it
  for (const b of document.querySelectorAll('button[aria-label="Close"]'))
    for (let p = b.parentElement, i = 0; p && i < 8; p = p.parentElement, i++)
      if ((p.innerText || '').includes('Assistant')) { b.click(); return true; }
  return false; })()"""
UNFOLD_RUNS = """Array.from(document.querySelectorAll(         // the [+] of runs with nested job runs
  '[role=row] button[data-component-id*="runnamecellrenderer"]')).map(b => b.getBoundingClientRect())
  .filter(r => r.width > 0).map(r => [r.x + r.width / 2, r.y + r.height / 2]).reverse()  // bottom up: no row moves"""
SHOW_TABLES = """(() => {                           // the report's Tables category, showing tables.html
  const path = Object.keys(results).find(k => k.endsWith('/tables.html'));
  app.showCategory('Tables');
  app.setView({content: 'html', contentPath: results[path].data_uri, resultPath: path});
  return true; })()"""
LOAD_MORE = """(() => {                              // MLflow loads 100 runs a page: the next page
  const b = Array.from(document.querySelectorAll('button')).find(b => b.innerText.trim() === 'Load more');
  if (b) b.click();
  return !!b; })()"""
IMAGES_LOADED = "document.images.length > 0 && Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="the run's params file (default params.yaml)")
    ap.add_argument("--out", default="docs", help="folder for the PNGs (default docs/)")
    ap.add_argument("--only", nargs="+", choices=list(SHOTS), default=list(SHOTS), help="which pictures")
    ap.add_argument("--wait", type=float, default=90, help="seconds a page may take to render (default 90)")
    a = ap.parse_args(argv)
    from spot.workflow.config import load_config
    cfg = load_config(a.params)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = browser()
    made = {}
    with tempfile.TemporaryDirectory(prefix="spot-shots-") as tmp:
        tmp = Path(tmp)
        chrome = Chromium(exe, tmp / "profile")
        try:
            if {"mlflow-runs", "mlflow-training"} & set(a.only):
                store = tracking_store(cfg)
                eid, rid, name = mlflow_pages(store, cfg["name"])
                with mlflow_ui(store, tmp / "mlflow-ui.log") as base:
                    if "mlflow-runs" in a.only:
                        listed = r"/[1-9]\d* matching runs?/.test(document.body.innerText)"
                        chrome.shoot(f"{base}/#/experiments/{eid}/runs", out / "mlflow-runs.png", (1600, 900),
                                     listed, a.wait, CLOSE_ASSISTANT, UNFOLD_RUNS,
                                     f"{listed} && document.querySelectorAll('[role=row]').length > 4",  # job runs shown
                                     until=LOAD_MORE)                  # every run: the count is the experiment's
                        made["mlflow-runs"] = f"experiment {cfg['name']}"
                    if "mlflow-training" in a.only:
                        chrome.shoot(f"{base}/#/experiments/{eid}/runs/{rid}/model-metrics", out / "mlflow-training.png",
                                     (1600, 1000), "document.querySelectorAll('.js-plotly-plot').length > 0", a.wait,
                                     CLOSE_ASSISTANT)
                        made["mlflow-training"] = f"run {name}"
            if "dvc-plots" in a.only:
                chrome.shoot(dvc_plots(a.params, tmp / "dvc-plots"), out / "dvc-plots.png", (1150, 800), IMAGES_LOADED,
                             a.wait, full=True)
                made["dvc-plots"] = "the report's plots"
            if "snakemake-report" in a.only:
                chrome.shoot(snakemake_report(a.params, tmp / "report.html"), out / "snakemake-report.png", (1400, 860),
                             "typeof app !== 'undefined' && Object.keys(results).some(k => k.endsWith('/tables.html'))",
                             a.wait, SHOW_TABLES)
                made["snakemake-report"] = "its Tables category, tables.html"
        finally:
            chrome.close()
    for shot, what in made.items():
        print(f"{out / (shot + '.png')}: {SHOTS[shot]} ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
