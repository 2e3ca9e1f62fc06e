"""The HTML run report and run comparison, on run directories written by hand in the format `tunelab train`
leaves (the report is a pure function of those files, so no model needs to train)."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tunelab.errors import ConfigError
from tunelab.eval.report import run_labels, write_comparison, write_report
from tunelab.eval.report_html import SAMPLES_SHOWN
from tunelab.eval.report_plots import metric_bars

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS, EVAL_EVERY = 12, 4
CONFIG_YAML = """model: smollm2-135m-instruct
data:
  train: tunelab:support_tickets
  eval_split: 0.1
method:
  name: lora
  r: 16
train:
  max_steps: 12
  lr: 0.0002
  scheduler: cosine
  eval_every: 4
eval:
  metrics:
  - json_field_accuracy
output_dir: {path}
"""
ESCAPE_ME = '<script>alert("pwned")</script>'


def eval_losses(step: int, offset: float) -> dict[str, float]:
    loss = 1.2 * math.exp(-step / 8) + offset
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(loss),
        "eval_loss/tickets.jsonl": loss - 0.05,
        "eval_loss/faq.jsonl": loss + 0.05,
    }


def make_run(run_dir: Path, offset: float = 0.3, field_accuracy: float = 0.75) -> dict:
    """A finished LoRA run of STEPS steps with an eval every EVAL_EVERY steps and a step-0 baseline."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(CONFIG_YAML.format(path=run_dir))
    records = [{"step": 0, **eval_losses(0, offset)}]
    for step in range(1, STEPS + 1):
        record = {
            "step": step,
            "epoch": round(step / 72, 4),
            "loss": 1.3 * math.exp(-step / 6) + offset - 0.05,
            "lr": 2e-4 * 0.5 * (1 + math.cos(math.pi * (step - 1) / STEPS)),
            "grad_norm": 1.5 / step,
            "tokens": 290 * step,
            "tokens_per_second": 50.0 + step % 3,
        }
        if step % EVAL_EVERY == 0:
            record.update(eval_losses(step, offset))
        records.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    base, final = records[0]["eval_loss"], records[-1]["eval_loss"]
    summary = {
        "status": "completed",
        "model": "smollm2-135m-instruct",
        "method": "lora",
        "steps": STEPS,
        "train_tokens": 290 * STEPS,
        "train_seconds": 69.6,
        "tokens_per_second": 50.0,
        "padding_efficiency": 0.26,
        "peak_memory_mb": 4636.8,
        "final_train_loss": records[-1]["loss"],
        "base_eval_loss": base,
        "final_eval_loss": final,
        "final_eval_perplexity": math.exp(final),
        "metrics_before": {"field_accuracy": 0.0625, "json_valid": 0.625, "exact_match": 0.0},
        "metrics_after": {"field_accuracy": field_accuracy, "json_valid": 0.875, "exact_match": 0.125},
        "trainable_parameters": 4884480,
        "total_parameters": 139399488,
        "precision": "bf16",
        "device": "cpu",
        "data": {
            "train_samples": 570,
            "eval_samples": 30,
            "train_tokens": 70389,
            "trainable_tokens": 20569,
            "trainable_fraction": 0.2922,
            "max_length_seen": 156,
            "median_length": 125,
            "truncated_samples": 2,
            "dropped_samples": 0,
            "formats": {"tunelab:support_tickets": "alpaca (columns 'instruction', 'output')"},
        },
        "trainer_state": {"step": STEPS, "best_eval_loss": final, "best_step": STEPS, "extra": {}},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    samples = [
        {
            "where": "tickets.jsonl:3",
            "prompt": [
                {"role": "system", "content": "You extract fields."},
                {"role": "user", "content": "first turn, not shown"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "Refund my <b>desk</b>, order D-1 & fast"},
            ],
            "reference": '{"intent": "refund", "order_id": "D-1"}',
            "base": "Sure! I can help with that.",
            "fine_tuned": ESCAPE_ME,
        },
        {
            "where": "tickets.jsonl:7",
            "prompt": [{"role": "user", "content": "Where is my lamp?"}],
            "reference": '{"intent": "order_status"}',
            "base": None,
            "fine_tuned": '{"intent": "order_status"}',
        },
    ]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return summary


class Page(HTMLParser):
    """What a browser would see: tags, link targets, images, visible text and the cells of each table by id."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.links += [attrs[key] for key in ("src", "href") if attrs.get(key)]
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self._table = attrs.get("id", f"table-{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def visible_text(self) -> str:
        return "".join(self.text)

    def rows(self, table_id: str) -> dict[str, list[str]]:
        return {row[0]: row[1:] for row in self.tables[table_id] if row}


def read_page(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def decode_png(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    png = base64.b64decode(src[len(prefix) :], validate=True)
    assert png.startswith(PNG_SIGNATURE)
    return png


def assert_self_contained(page: Page) -> None:
    assert page.images
    for src in page.images:
        decode_png(src)
    external = [link for link in page.links if link.startswith(("http://", "https://", "//"))]
    assert not external
    assert "script" not in page.tags and "link" not in page.tags
    assert "url(" not in page.visible_text and "@import" not in page.visible_text


def test_report_is_self_contained_and_saves_its_plots(tmp_path):
    run_dir = tmp_path / "lora-run"
    make_run(run_dir)

    path = write_report(run_dir)

    assert path == run_dir / "report.html"
    page = read_page(path)
    assert_self_contained(page)
    embedded = sorted(decode_png(src) for src in page.images)
    saved = sorted(p.read_bytes() for p in (run_dir / "plots").glob("*.png"))
    assert {p.name for p in (run_dir / "plots").glob("*.png")} == {"loss.png", "learning_rate.png", "throughput.png"}
    assert embedded == saved
    assert "model: smollm2-135m-instruct" in page.visible_text  # config.yaml is shown
    assert "alpaca (columns 'instruction', 'output')" in page.visible_text  # data statistics


def test_before_after_table_holds_the_summary_numbers(tmp_path):
    run_dir = tmp_path / "lora-run"
    summary = make_run(run_dir)

    rows = read_page(write_report(run_dir)).rows("before-after")

    base, final = summary["base_eval_loss"], summary["final_eval_loss"]
    assert rows["eval loss"] == [f"{base:.4f}", f"{final:.4f}", f"{final - base:+.4f}"]
    assert rows["eval perplexity"][:2] == [f"{math.exp(base):.4f}", f"{summary['final_eval_perplexity']:.4f}"]
    for name, after in summary["metrics_after"].items():
        before = summary["metrics_before"][name]
        assert rows[f"{name} (0-1)"] == [f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}"]  # scale named
    baseline, last = eval_losses(0, 0.3), eval_losses(STEPS, 0.3)
    assert rows["eval loss (faq.jsonl)"][:2] == [
        f"{baseline['eval_loss/faq.jsonl']:.4f}",
        f"{last['eval_loss/faq.jsonl']:.4f}",
    ]


def test_sample_gallery_escapes_model_output(tmp_path):
    run_dir = tmp_path / "lora-run"
    make_run(run_dir)

    html_text = write_report(run_dir).read_text(encoding="utf-8")
    page = Page(html_text)

    assert "<script>" not in html_text and "&lt;script&gt;" in html_text
    assert "script" not in page.tags and "b" not in page.tags
    assert ESCAPE_ME in page.visible_text  # shown as text, exactly as the model wrote it
    assert "Refund my <b>desk</b>, order D-1 & fast" in page.visible_text  # the last user turn
    assert "first turn, not shown" not in page.visible_text
    assert "Sure! I can help with that." in page.visible_text and "not generated" in page.visible_text


def test_interrupted_run_still_gets_a_report_that_says_what_is_missing(tmp_path):
    run_dir = tmp_path / "interrupted"
    make_run(run_dir)
    (run_dir / "summary.json").unlink()
    (run_dir / "samples.jsonl").unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:10]) + "\n" + lines[10][:25])  # killed mid-write

    page = read_page(write_report(run_dir))

    text = page.visible_text
    assert "summary.json is missing" in text and "samples.jsonl is missing" in text
    assert "metrics.jsonl line 11 is not a JSON object" in text
    assert_self_contained(page)  # the curves of the steps that were logged
    rows = page.rows("before-after")
    assert rows["eval loss"][:2] == [
        f"{eval_losses(0, 0.3)['eval_loss']:.4f}",
        f"{eval_losses(8, 0.3)['eval_loss']:.4f}",
    ]


def test_report_of_a_run_stopped_with_ctrl_c_says_so(tmp_path):
    run_dir = tmp_path / "stopped"
    summary = make_run(run_dir)
    summary.update(status="interrupted", steps=9, metrics_after={}, final_eval_perplexity=None)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "samples.jsonl").unlink()

    page = read_page(write_report(run_dir))

    assert "the run was interrupted at step 9" in page.visible_text
    rows = page.rows("before-after")
    assert rows["field_accuracy (0-1)"] == [f"{summary['metrics_before']['field_accuracy']:.4f}", "—", "—"]


def test_not_a_run_directory_is_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match="not a tunelab run directory"):
        write_report(tmp_path)


def test_comparison_puts_runs_side_by_side(tmp_path):
    make_run(tmp_path / "lora-r8", offset=0.4, field_accuracy=0.5)
    make_run(tmp_path / "lora-r16", offset=0.3, field_accuracy=0.75)

    path = write_comparison([tmp_path / "lora-r8", tmp_path / "lora-r16"], tmp_path / "out" / "compare.html")

    page = read_page(path)
    assert_self_contained(page)
    assert len(page.images) == 2  # overlaid eval loss, metric bars
    header, *_ = page.tables["comparison"]
    assert header == ["", "lora-r8", "lora-r16"]
    rows = page.rows("comparison")
    assert rows["field_accuracy (0-1)"] == ["0.5000", "0.7500"]
    assert 'class="num best">0.7500<' in path.read_text()


def test_runs_with_the_same_name_are_told_apart():
    assert run_labels([Path("a/run"), Path("b/run"), Path("b/other")]) == ["a/run", "b/run", "other"]


def test_long_sample_galleries_fold_and_empty_replies_say_so(tmp_path):
    run_dir = tmp_path / "lora-run"
    make_run(run_dir)
    sample = {
        "where": "tickets.jsonl:1",
        "prompt": "Where is my lamp?",
        "reference": "x",
        "base": "",
        "fine_tuned": "y",
    }
    samples = [{**sample, "where": f"tickets.jsonl:{n}"} for n in range(1, SAMPLES_SHOWN + 4)]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))

    html_text = write_report(run_dir).read_text(encoding="utf-8")

    shown, folded = html_text.split("<details><summary>3 more samples</summary>")
    assert shown.count('class="sample"') == SAMPLES_SHOWN and folded.count('class="sample"') == 3
    assert f"tickets.jsonl:{SAMPLES_SHOWN + 3}<" in folded
    assert shown.count("empty reply") == SAMPLES_SHOWN  # the base model's "" is named, not an empty box


def test_metric_bars_put_0_to_100_metrics_on_their_own_axis():
    fig = metric_bars([("a", {"exact_match": 0.5, "chrf": 80.0}), ("b", {"exact_match": 0.25, "chrf": 40.0})])

    left, right = fig.axes
    assert [round(p.get_height(), 2) for p in left.patches] == [0.5, 0.25]
    assert [round(p.get_height(), 2) for p in right.patches] == [80.0, 40.0]
    assert left.get_ylim()[1] < 1.2 and right.get_ylim()[1] > 80
    assert [t.get_text() for t in left.get_xticklabels()] == ["exact_match (0-1)", "chrf (0-100, right)"]
