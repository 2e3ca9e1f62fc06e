"""Web app fixes: the runs table stays answered while a training the app launched makes its run directory."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from tunelab.ui import app as ui_app
from tunelab.ui.app import create_app
from tunelab.ui.launcher import ui_dir


def test_the_runs_table_answers_while_a_launched_training_writes_its_status(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    launches = ui_dir(root) / "launches"
    launches.mkdir(parents=True)
    # a launch whose process is gone (no such pid; and any process now running is younger than a record of 1970)
    # and that left no run directory: `failed`
    (launches / "late.json").write_text(json.dumps({"name": "late", "pid": 2**22 + 12345, "started_at": 0}))
    real = ui_app.launch_state
    answers: list[str | None] = []

    def status_written_after_the_first_read(root: Path, name: str) -> str | None:
        """The real state once; then None, as once the training has written its status.json."""
        answers.append(None if answers else real(root, name))
        return answers[-1]

    monkeypatch.setattr(ui_app, "launch_state", status_written_after_the_first_read)
    response = TestClient(create_app(root)).get("/api/runs")
    assert response.status_code == 200, response.text
    assert [(r["name"], r["status"]) for r in response.json()] == [("late", "failed")]
