"""`tunelab eval RUN --baseline base` keeps its result in the run directory and the run's report shows the base
model's number, the run's, the difference and its 95% interval."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.eval.recorded import evaluation_rows, read_evaluations
from tunelab.eval.report import write_report

runner = CliRunner()
ROWS = [{"question": f"is {n} even?", "answer": "yes" if n % 2 == 0 else "no"} for n in range(24)]


class TableCells(HTMLParser):
    """The text of every cell of the table with the given id, row by row."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.inside, self.rows = table_id, False, []

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.inside = dict(attrs).get("id") == self.table_id
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False

    def handle_data(self, data):
        if self.inside and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data


def table(page: str, table_id: str) -> dict[str, list[str]]:
    parser = TableCells(table_id)
    parser.feed(page)
    return {row[0]: row[1:] for row in parser.rows[1:]}


def test_eval_against_base_is_recorded_and_reported_with_its_interval(tmp_path, tiny_model_dir):
    data = tmp_path / "parity.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\n"
        f"data: {{train: {data}, eval_split: 0.25, max_length: 64}}\n"
        "method: {name: lora, r: 8}\n"
        "train: {max_steps: 3, batch_size: 4, lr: 0.003, precision: fp32}\n"
        "eval: {generate_samples: 4, max_new_tokens: 3, show_samples: 0, metrics: [label_accuracy]}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    assert runner.invoke(app, ["train", str(config)]).exit_code == 0
    run = tmp_path / "run"
    args = ["--data", str(data), "--metrics", "loss", "--labels", "yes,no", "--baseline", "base"]
    result = runner.invoke(app, ["eval", str(run), *args])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)

    found, problems = read_evaluations(run)
    assert problems == [] and found == [("parity-loss-label_accuracy.json", printed)]
    difference = printed["comparison"]["differences"]["label_accuracy"]
    assert difference["difference"] == printed["label_accuracy"] - printed["baseline"]["label_accuracy"]
    rows = table((run / "report.html").read_text(), "eval-parity-loss-label_accuracy")
    base, tuned = printed["baseline"]["label_accuracy"], printed["label_accuracy"]
    interval = f"[{difference['ci95_low']:+.4f}, {difference['ci95_high']:+.4f}]"
    assert rows["label_accuracy"][0] == f"{base:.4f}" and rows["label_accuracy"][1] == f"{tuned:.4f}"
    assert rows["label_accuracy"][3] == interval
    assert rows["loss"][:2] == [f"{printed['baseline']['loss']:.4f}", f"{printed['loss']:.4f}"]
    assert [name for name, *_ in evaluation_rows(printed)] == ["loss", "perplexity", "label_accuracy"]
    # A damaged record does not break the report; it is named.
    (run / "evals" / "broken.json").write_text("{not json")
    page = write_report(run).read_text()
    assert "evals/broken.json is unreadable" in page and "eval-parity-loss-label_accuracy" in page
