"""The web app in a real browser (headless Chromium driven by Playwright), as a user meets it: the runs table, a
run started from the form whose curve grows while it trains, a refresh that loses nothing, the app killed and
restarted while the run goes on, stop and resume, the compare page, and a streamed chat next to the base model.
Every page is screenshotted (kept in TUNELAB_TEST_ARTEFACTS when set) and checked to be non-blank; no request
leaves the app's own origin."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.train.run import train_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((path for path in map(shutil.which, BROWSERS) if path), None)
playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is in the dev extra")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason=f"no Chromium binary on PATH (looked for {', '.join(BROWSERS)})")

QA = [{"question": f"what is {a} plus {b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class App:
    """`tunelab ui` as a user starts it: its own process, killable."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port, self.process = root, port, None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "--runs", str(self.root), "--port",
                                         str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("tunelab ui did not start listening")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def status_of(root: Path, name: str) -> dict:
    try:
        return json.loads((root / name / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def steps_of(root: Path, name: str) -> int:
    path = root / name / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line).get("step", 0) for line in lines if line.strip()), default=0)


def wait_until(check, timeout: float = 120, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def non_blank(png: Path) -> bool:
    from PIL import Image

    image = Image.open(png).convert("L")
    low, high = image.getextrema()
    return high - low > 100 and len(set(image.resize((64, 64)).getdata())) > 8


def test_the_app_in_a_browser(tmp_path, tiny_model_dir):
    root = tmp_path / "runs"
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    train_run(load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "data.max_length=64",
                                 f"output_dir={root / 'from-cli'}", "train.max_steps=4", "train.batch_size=4",
                                 "train.precision=fp32", "eval.generate_samples=2", "eval.max_new_tokens=4",
                                 "eval.show_samples=0"]))
    shutil.copytree(root / "from-cli", root / "lr=1e-3,r=8")  # a CLI run folder whose name holds a comma
    artefacts = Path(os.environ.get("TUNELAB_TEST_ARTEFACTS", tmp_path / "screens"))
    artefacts.mkdir(parents=True, exist_ok=True)
    app, single = App(root, free_port()), App(root / "from-cli", free_port())
    app.start()
    base, single_base = f"http://127.0.0.1:{app.port}", f"http://127.0.0.1:{single.port}"
    outside: list[str] = []
    config = (f"model: {tiny_model_dir}\ndata: {{train: {data}, max_length: 64}}\n"
              "train: {max_steps: 3000, batch_size: 4, precision: fp32, save_every: 5, lr: 0.001}\n"
              "eval: {generate_samples: 0, show_samples: 0, before_after: false}\n")
    try:
        with playwright_api.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("request", lambda r: None if r.url.startswith((base, single_base)) else outside.append(r.url))

            def shot(name: str) -> None:
                path = artefacts / f"{name}.png"
                page.screenshot(path=str(path), full_page=True)
                assert non_blank(path), name

            page.goto(base + "/")
            page.wait_for_selector("tr[data-run='from-cli']")
            assert "completed" in page.inner_text("tr[data-run='from-cli']")
            shot("1-runs")

            page.goto(base + "/#/new")
            page.wait_for_selector("#f-train-lr")
            page.fill("#f-train-lr", "0.002")
            assert "lr: 0.002" in page.input_value("#config-yaml")  # the form writes the YAML that starts
            page.fill("#config-yaml", "# to be pasted\n")  # an empty box starts nothing, and says so
            page.click("#start")
            assert "config is empty" in page.inner_text("#start-error")
            page.fill("#config-yaml", config)
            page.fill("#run-name", "from-form")
            page.click("#check")
            page.wait_for_selector("#check-result .ok", timeout=120_000)
            assert "template check: PASS" in page.inner_text("#check-result")
            assert "3,000 steps; estimated peak memory" in page.inner_text("#plan")
            shot("2-start-form")
            page.click("#start")
            page.wait_for_url("**/#/run/from-form")
            loss_points = "#charts .chart[data-title='loss']"
            page.wait_for_function(f"document.querySelector(\"{loss_points}\")?.dataset.points >= 3",
                                   timeout=120_000)
            first = int(page.get_attribute(loss_points, "data-points"))
            page.wait_for_function(f"document.querySelector(\"{loss_points}\").dataset.points > {first + 3}",
                                   timeout=60_000)  # the curve grows while it trains, pushed by the server
            shot("3-run-live")

            page.reload()  # a refresh loses nothing
            page.wait_for_function(f"document.querySelector(\"{loss_points}\")?.dataset.points > {first}",
                                   timeout=60_000)

            app.kill()  # the training is its own process: killing the app leaves it training
            at_kill = steps_of(root, "from-form")
            wait_until(lambda: steps_of(root, "from-form") > at_kill + 3, what="training to go on without the app")
            assert status_of(root, "from-form")["status"] == "running"
            app.start()
            page.goto(base + "/#/run/from-form")
            page.wait_for_selector("text=Stop (save a checkpoint)")
            page.click("text=Stop (save a checkpoint)")
            page.wait_for_selector("h1 .status.interrupted", timeout=60_000)
            stopped = steps_of(root, "from-form")
            page.wait_for_selector("text=Resume")
            page.click("text=Resume")
            wait_until(lambda: status_of(root, "from-form").get("status") == "running"
                       and steps_of(root, "from-form") > stopped, what="the resumed run to train")
            page.wait_for_selector("h1 .status.running", timeout=60_000)
            page.click("text=Stop (save a checkpoint)")
            page.wait_for_selector("h1 .status.interrupted", timeout=60_000)
            shot("4-run-stopped")
            logged = [json.loads(line) for line in (root / "from-form" / "metrics.jsonl").read_text().splitlines()]
            steps = [r["step"] for r in logged if "loss" in r]
            assert steps == list(range(1, len(steps) + 1)) and len(steps) > stopped  # resumed: no gap, no repeat

            page.goto(base + "/#/compare?runs=from-cli,from-form")  # an older link: names joined by commas
            page.wait_for_selector("#config-diff")
            assert "train.max_steps" in page.inner_text("#config-diff")
            assert page.locator(".chart[data-title='loss']").count() == 1
            shot("5-compare")
            page.goto(base + "/")  # picked in the table: a name with a comma is one run
            for name in ("lr=1e-3,r=8", "from-form"):
                page.check(f"tr[data-run='{name}'] input[type=checkbox]")
            page.click("text=Compare selected")
            page.wait_for_selector("#config-diff")
            assert page.inner_text("h1") == "Compare: lr=1e-3,r=8 · from-form"
            assert "■ lr=1e-3,r=8" in page.inner_text(".chart[data-title='loss'] .legend")

            page.goto(base + "/#/chat/from-cli")
            page.wait_for_selector("#chat-input")
            page.fill("#chat-input", "what is 2 plus 2?")
            page.press("#chat-input", "Enter")
            page.wait_for_function("document.querySelector('#send') && !document.querySelector('#send').disabled "
                                   "&& document.querySelectorAll('#chat pre').length === 2", timeout=120_000)
            assert not page.locator("#chat .error").count()
            assert page.locator("#gallery tr").count() >= 2  # the held-out samples: base and fine-tuned replies
            shot("6-chat")

            single.start()  # `tunelab ui --runs RUN_DIR`: the run opens under its folder's name
            page.goto(single_base + "/")
            page.click("tr[data-run='from-cli'] a")
            page.wait_for_function(f"document.querySelector(\"{loss_points}\")?.dataset.points >= 4", timeout=60_000)
            page.wait_for_function("document.querySelector('#log').textContent.includes('lora on')", timeout=60_000)
            assert not page.locator(".error").count()
            browser.close()
    finally:
        app.kill()
        if single.process is not None:
            single.kill()
        pid = status_of(root, "from-form").get("pid")
        if pid and status_of(root, "from-form").get("status") == "running":
            os.kill(pid, 15)
    assert not outside, f"requests outside the app: {outside[:5]}"
