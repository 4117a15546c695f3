"""Open the repair report in headless Chromium: it renders, logs no errors, loads every image, fetches nothing.

Chromium is driven through the DevTools protocol over a pipe (`--remote-debugging-pipe`: JSON
messages separated by NUL bytes on file descriptors 3 and 4), which needs no websocket client,
no chromedriver and no open port.
"""

import fcntl
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass, field

import datasets
import numpy as np
import pytest
import torch

from hf_repair import RepairConfig, Repairer

from helpers import TinyCNN

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing; install it with `apt-get install -y chromium`"
)
TOP_N = 10


class DevTools:
    """A headless Chromium and a minimal DevTools-protocol client over its debugging pipe."""

    def __init__(self, user_data_dir: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        # Move the child's ends to fds >= 10 first, so dup2 onto 3 and 4 cannot overwrite one of them.
        child_read, child_write = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_read, replies_write))
        for fd in (commands_read, replies_write):
            os.close(fd)

        def give_child_fds_3_and_4() -> None:
            os.dup2(child_read, 3)
            os.dup2(child_write, 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             "--hide-scrollbars", "--window-size=1280,900", f"--user-data-dir={user_data_dir}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=give_child_fds_3_and_4, close_fds=False,
        )
        os.close(child_read)
        os.close(child_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()
        os.close(self._commands)
        os.close(self._replies)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept in `events`."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._receive()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _receive(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                raise TimeoutError(f"Chromium did not answer (exit code {self.process.poll()}).")
            ready, _, _ = select.select([self._replies], [], [], remaining)
            if ready:
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its debugging pipe.")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)



@pytest.fixture
def browser(tmp_path):
    devtools = DevTools(str(tmp_path / "chromium-profile"))
    yield devtools
    devtools.close()


def load(browser: DevTools, path: str) -> tuple[str, dict]:
    """Open `path` in a new tab; return the session id and what the page reports about itself."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Runtime", "Log", "Page", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Page.navigate", {"url": f"file://{path}"}, session=session)
    browser.wait_for("Page.loadEventFired")
    state = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """({
        title: document.title,
        sections: Array.from(document.querySelectorAll('section h2')).map(h => h.textContent),
        cards: document.querySelectorAll('.card').length,
        images: Array.from(document.images).map(i => ({gallery: !!i.closest('.gallery'), complete: i.complete,
                                                        width: i.naturalWidth, height: i.naturalHeight, alt: i.alt})),
        scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
        height: document.body.scrollHeight,
        missing: Array.from(document.querySelectorAll('.missing')).map(m => m.textContent),
    })"""}, session=session)
    return session, state["result"]["value"]


def problems(browser: DevTools) -> list[str]:
    """Console messages, uncaught exceptions, error log entries and any request that is not a local file."""
    found = []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            found.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Runtime.exceptionThrown":
            found.append(f"exception: {params['exceptionDetails']}")
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            found.append(f"log {params['entry']['level']}: {params['entry']['text']} ({params['entry'].get('url')})")
        elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(("file:", "data:")):
            found.append(f"network request: {params['request']['url']}")
        elif method == "Network.loadingFailed":
            found.append(f"failed to load: {params.get('errorText')}")
    return found


# ------------------------------------------------------------------------------------------------
# a small repaired image model with a suspect-sample gallery



@dataclass
class Identification:
    table: datasets.Dataset
    summary: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def image_report(tmp_path_factory):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(90) % 3
    pixel_values = torch.randn(90, 1, 12, 12, generator=generator) + labels.view(-1, 1, 1, 1).float()
    data = datasets.Dataset.from_dict(
        {"pixel_values": pixel_values.numpy(), "labels": labels.numpy()},
        features=datasets.Features({"pixel_values": datasets.Array3D((1, 12, 12), "float32"),
                                    "labels": datasets.ClassLabel(names=["circle", "square", "triangle"])}),
    ).with_format("torch")
    model = TinyCNN(size=12).eval()
    config = RepairConfig(alphas=[1.0, 100.0, 1e4], repair_seed=0, repair_disable_tqdm=True, min_improvement=-1.0,
                          significance_test="none")
    result = Repairer(model, config).repair(data.select(range(60)))
    rng = np.random.default_rng(0)
    corrupted = rng.random(90) < 0.3
    score = rng.normal(size=90) - 2 * corrupted
    table = datasets.Dataset.from_dict({
        "index": np.arange(90), "score": score, "given_label": labels.numpy(),
        "suggested_label": (labels.numpy() + corrupted) % 3, "flagged": score < -1, "is_corrupted": corrupted,
    })
    identification = Identification(table, {"num_samples": 90, "num_flagged": int((score < -1).sum()),
                                            "flag_rule": "threshold", "threshold": -1.0, "auroc": 0.9})
    directory = tmp_path_factory.mktemp("browser") / "report"
    path = result.report(directory, model=model, test_dataset=data.select(range(60, 90)),
                         identification=identification, train_dataset=data, top_n=TOP_N)
    return path


def test_report_renders_without_errors_and_loads_every_image(browser, image_report):
    _, page = load(browser, image_report)
    assert problems(browser) == []
    assert page["title"].startswith("hf_repair report")
    assert page["sections"] == ["Accuracy", "Choosing alpha", "Layers", "Confusion", "Suspect samples", "Files"]
    assert page["cards"] >= 5
    assert page["missing"] == []
    gallery = [image for image in page["images"] if image["gallery"]]
    figures = [image for image in page["images"] if not image["gallery"]]
    assert len(gallery) == TOP_N and len(figures) == 7
    assert all(image["complete"] and image["width"] > 0 and image["height"] > 0 for image in page["images"]), page["images"]
    assert all((image["width"], image["height"]) == (12, 12) for image in gallery)
    assert page["scrollWidth"] <= page["innerWidth"]  # nothing overflows sideways
    assert page["height"] > 2000


def test_report_without_matplotlib_renders_and_says_why(browser, tmp_path, monkeypatch):
    import sys

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    model = TinyCNN(size=12).eval()
    data = datasets.Dataset.from_dict({"pixel_values": torch.randn(30, 1, 12, 12).numpy(),
                                       "labels": (torch.arange(30) % 3).numpy()}).with_format("torch")
    config = RepairConfig(alphas=[1.0, 1e4], repair_seed=0, repair_disable_tqdm=True)
    path = Repairer(model, config).repair(data).report(tmp_path / "report")
    _, page = load(browser, path)
    assert problems(browser) == []
    assert page["images"] == []
    assert any("matplotlib is not installed" in text for text in page["missing"])
    assert any("Identification did not run" in text for text in page["missing"])


def test_the_checks_catch_errors_broken_images_and_network_requests(browser, tmp_path):
    """The checks above are not vacuous: a page with each fault trips them."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><title>bad</title></head><body>'
                    '<img src="missing.png"><img src="http://127.0.0.1:9/x.png">'
                    '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    _, state = load(browser, str(page))
    found = "\n".join(problems(browser))
    assert "console.error" in found and "exception" in found
    assert "network request: http://127.0.0.1:9/x.png" in found
    assert [image["width"] for image in state["images"]] == [0, 0]
