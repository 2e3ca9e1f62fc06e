"""The report of a real tiny training run, opened in headless Chromium with every network fetch made to fail. The
browser's own DOM says whether each plot decoded, whether anything was fetched, and what text is on screen, so
this checks what a reader sees, not what a parser guesses. Skipped only where no Chromium binary exists
(`scripts/setup.sh --dev` installs one on Debian/Ubuntu when run as root)."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.eval.metrics import metric_scale
from tunelab.eval.report import write_comparison
from tunelab.train.run import train_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((path for path in map(shutil.which, BROWSERS) if path), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason=f"no Chromium binary on PATH (looked for {', '.join(BROWSERS)})"
)

# Listens for failed loads from the first byte of <head>; after the load event it writes what the browser saw into
# the page, where --dump-dom finds it.
PROBE = """<script>
const failed = [];
addEventListener("error", (e) => failed.push(e.target.src || e.target.href || String(e.message)), true);
addEventListener("load", () => {
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const painted = (img) => {  // share of opaque pixels: a PNG cut short still decodes, its missing rows stay empty
    if (!img.naturalWidth) return 0;
    const canvas = document.createElement("canvas");
    [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
    const context = canvas.getContext("2d");
    context.drawImage(img, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let opaque = 0;
    for (let alpha = 3; alpha < pixels.length; alpha += 4) opaque += pixels[alpha] === 255;
    return opaque / (canvas.width * canvas.height);
  };
  const images = [...document.images].map((img) => ({
    alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight, box: box(img),
    painted: painted(img),
  }));
  const result = {
    images, failed, text: document.body.innerText,
    requests: performance.getEntriesByType("resource").map((entry) => entry.name),
    scroll_width: document.documentElement.scrollWidth, client_width: document.documentElement.clientWidth,
  };
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify(result);
  document.body.append(out);
});
</script>"""
OFFLINE = [
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
]
RESULT = re.compile(r'<pre id="browser-check">(.*?)</pre>', re.DOTALL)
TICKETS = [
    {"question": f"order {n}: the {thing} is broken, what now?", "answer": f"replace the {thing}"}
    for n in range(6)
    for thing in ("desk", "lamp", "chair")
]


def open_in_browser(page: Path, tmp_path: Path) -> dict:
    """What headless Chromium, offline, saw of `page` (a copy with the probe injected is what it opens)."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    command = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,2400",
        *OFFLINE,
        "--dump-dom",
        probed.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = RESULT.search(done.stdout)
    assert done.returncode == 0 and found, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def png_size(png: bytes) -> tuple[int, int]:
    return struct.unpack(">II", png[16:24])  # width, height from the IHDR chunk


def overlapping(a: list[float], b: list[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def rendering_problems(seen: dict, plots: dict[str, bytes]) -> list[str]:
    """Everything a reader would notice: an image that did not decode or is not the plot saved with the run, any
    fetch (a self-contained page makes none), plots drawn over each other, a page wider than the window."""
    problems = [f"load failed: {what[:80]}" for what in seen["failed"]]
    problems += [f"fetched: {url[:80]}" for url in seen["requests"]]
    shown = {img["alt"]: img for img in seen["images"]}
    for img in seen["images"]:
        saved = plots.get(img["alt"].replace(" ", "_"))
        if not (img["complete"] and img["width"] > 0):
            problems.append(f"image {img['alt']!r} did not load")
        elif img["painted"] < 1:  # the plots have an opaque background: every pixel is drawn
            problems.append(f"image {img['alt']!r} decoded only in part ({img['painted']:.0%} of its pixels)")
        elif saved and (img["width"], img["height"]) != png_size(saved):
            problems.append(f"image {img['alt']!r} decoded at {img['width']}x{img['height']}, not as saved")
        if img["box"][2] - img["box"][0] <= 0:
            problems.append(f"image {img['alt']!r} takes no space on the page")
    problems += [f"plot {name} is not on the page" for name in plots if name.replace("_", " ") not in shown]
    images = seen["images"]
    problems += [
        f"images {a['alt']!r} and {b['alt']!r} overlap"
        for i, a in enumerate(images)
        for b in images[i + 1 :]
        if overlapping(a["box"], b["box"])
    ]
    if seen["scroll_width"] > seen["client_width"]:
        problems.append(f"page is {seen['scroll_width']}px wide in a {seen['client_width']}px window")
    return problems


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A real run on the tiny model: LoRA, task metrics at every evaluation, a few held-out generations."""
    folder = tmp_path_factory.mktemp("browser")
    data = folder / "tickets.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TICKETS))
    overrides = [
        f"model={tiny_model_dir}",
        f"data.train={data}",
        "data.eval_split=0.25",
        "data.max_length=64",
        f"output_dir={folder / 'run'}",
        "train.batch_size=4",
        "train.lr=3e-3",
        "train.precision=fp32",
        "train.max_steps=6",
        "train.eval_every=2",
        "eval.metrics=[exact_match, chrf]",
        "eval.during_training=true",
        "eval.during_training_samples=2",
        "eval.generate_samples=3",
        "eval.max_new_tokens=4",
        "eval.show_samples=0",
    ]
    train_run(load_config(None, overrides))
    return folder / "run"


def test_report_renders_offline_in_headless_chromium(trained_run, tmp_path):
    report = trained_run / "report.html"
    plots = {path.stem: path.read_bytes() for path in sorted((trained_run / "plots").glob("*.png"))}
    summary = json.loads((trained_run / "summary.json").read_text())

    seen = open_in_browser(report, tmp_path)

    assert set(plots) == {"loss", "task_metrics", "learning_rate", "throughput"}
    assert rendering_problems(seen, plots) == []
    assert len(seen["images"]) == len(plots)
    text = seen["text"]  # innerText: what is rendered, laid out in rows with tab-separated cells
    base, final = summary["base_eval_loss"], summary["final_eval_loss"]
    assert f"eval loss\t{base:.4f}\t{final:.4f}\t{final - base:+.4f}" in text
    for name, after in summary["metrics_after"].items():
        scale = metric_scale(name)  # a built-in's row names its scale: exact_match (0-1)
        label = f"{name} ({scale})" if scale else name
        assert f"{label}\t{summary['metrics_before'][name]:.4f}\t{after:.4f}" in text
    assert f"steps\t{summary['steps']}" in text and f"tokens trained\t{summary['train_tokens']:,}" in text
    samples = (trained_run / "samples.jsonl").read_text().splitlines()
    assert f"samples ({len(samples)} held out)" in text


def test_comparison_renders_offline_in_headless_chromium(trained_run, tmp_path):
    page = write_comparison([trained_run, trained_run], tmp_path / "compare.html")

    seen = open_in_browser(page, tmp_path)

    assert rendering_problems(seen, {}) == []
    assert [img["alt"] for img in seen["images"]] == ["eval loss per run", "task metrics per run"]
    final = json.loads((trained_run / "summary.json").read_text())["final_eval_loss"]
    assert f"final eval loss\t{final:.4f}\t{final:.4f}" in seen["text"]


def test_the_browser_check_catches_broken_plots_and_a_fetch(trained_run, tmp_path):
    """The same page with one plot's PNG cut short, one that is no image at all, and one image from the network."""
    plots = {path.stem: path.read_bytes() for path in sorted((trained_run / "plots").glob("*.png"))}
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    embedded = {name: base64.b64encode(png).decode("ascii") for name, png in plots.items()}
    assert all(data in page for data in embedded.values())
    cut = base64.b64encode(plots["loss"][: len(plots["loss"]) // 2]).decode("ascii")
    junk = base64.b64encode(plots["throughput"][:8] + b"not a PNG").decode("ascii")
    remote = '<img alt="remote" src="http://plots.example.com/loss.png">'
    page = page.replace(embedded["loss"], cut).replace(embedded["throughput"], junk)
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("</main>", remote + "</main>"), encoding="utf-8")

    problems = rendering_problems(open_in_browser(broken, tmp_path), plots)

    assert any(p.startswith("image 'loss' decoded only in part") for p in problems), problems
    assert "image 'throughput' did not load" in problems
    assert "image 'remote' did not load" in problems
    assert "fetched: http://plots.example.com/loss.png" in problems
    assert not any("learning rate" in p or "task metrics" in p for p in problems)
