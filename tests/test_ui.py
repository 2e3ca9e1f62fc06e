"""The web app's API on real tiny runs: the runs table and a run's page read from run directories (CLI runs
included), compare, chat next to the base model, the start form's check, failures, a killed run, and the API key.
A training started, streamed, stopped and resumed from the app is tests/test_ui_browser.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from tunelab.config import load_config
from tunelab.infer.generate import GenerationOptions, generate_replies
from tunelab.infer.load import load_for_inference
from tunelab.train.run import train_run
from tunelab.ui.app import create_app
from tunelab.ui.chat import ChatModels

QA = [{"question": f"what is {a} plus {b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QA))
    return tmp_path / "runs"


def settings(tiny_model_dir, data: Path, *extra: str) -> list[str]:
    return [f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0.2", "data.max_length=64",
            "train.batch_size=4", "train.precision=fp32", "eval.generate_samples=0", "eval.show_samples=0", *extra]


def yaml_for(tiny_model_dir, data: Path, **train) -> str:
    train_lines = "".join(f"  {k}: {v}\n" for k, v in train.items())
    return (f"model: {tiny_model_dir}\ndata: {{train: {data}, eval_split: 0.2, max_length: 64}}\n"
            f"train:\n  batch_size: 4\n  precision: fp32\n{train_lines}"
            "eval: {generate_samples: 0, show_samples: 0, before_after: false}\n")


def wait_for(client: TestClient, name: str, done, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        response = client.get(f"/api/runs/{name}")
        if response.status_code == 200 and done(response.json()):
            return response.json()
        time.sleep(0.3)
    raise AssertionError(f"{name}: still {client.get(f'/api/runs/{name}').json()} after {timeout} s")


def read_events(client: TestClient, path: str, kinds: set[str], count: int) -> list[tuple[str, dict]]:
    """The first `count` server-sent events of the given kinds on `path`."""
    events: list[tuple[str, dict]] = []
    with client.stream("GET", path) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and kind in kinds:
                events.append((kind, json.loads(line[len("data: "):])))
                if len(events) >= count:
                    break
    return events


def read_events_post(client: TestClient, path: str, body: dict) -> list[tuple[str, dict]]:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    events, kind = [], None
    for line in response.text.splitlines():
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: "):])))
    return events


def test_cli_runs_appear_with_their_numbers_curves_and_report(root, tiny_model_dir):
    data = root.parent / "qa.jsonl"
    train_run(load_config(None, settings(tiny_model_dir, data, f"output_dir={root / 'lora-a'}", "train.max_steps=6",
                                         "train.eval_every=3", "train.lr=3e-3", "eval.generate_samples=2",
                                         "eval.max_new_tokens=4")))
    train_run(load_config(None, settings(tiny_model_dir, data, f"output_dir={root / 'lora-b'}", "train.max_steps=6",
                                         "method.r=4", "train.lr=1e-3")))
    client = TestClient(create_app(root))
    assert "<title>tunelab</title>" in client.get("/").text and "lineChart" in client.get("/static/app.js").text
    rows = {row["name"]: row for row in client.get("/api/runs").json()}
    assert set(rows) == {"lora-a", "lora-b"}
    row = rows["lora-a"]
    assert row["status"] == "completed" and row["steps"] == 6 and row["method"] == "lora" and row["objective"] == "sft"
    assert row["eval_loss"] < row["base_eval_loss"] and row["peak_memory_mb"] > 0
    detail = client.get("/api/runs/lora-a").json()
    assert "max_steps: 6" in detail["config_yaml"] and detail["summary"]["steps"] == 6 and detail["has_report"]
    streamed = read_events(client, "/api/runs/lora-a/events", {"metrics", "run"}, 2)
    assert streamed[0][0] == "metrics" and streamed[1] == ("run", {**rows["lora-a"], "launched_by_app": False})
    records = client.get("/api/runs/lora-a/metrics").json()["records"]
    assert streamed[0][1]["records"] == records
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6]
    assert client.get("/api/runs/lora-a/report").text.startswith("<!DOCTYPE html>")
    log = client.get("/api/runs/lora-a/log").json()["text"]  # a CLI run's own RUN/train.log, plain text
    assert "lora on" in log and "evaluating the fine-tuned model" in log and "\x1b[" not in log
    compared = client.get("/api/compare?runs=lora-a,lora-b").json()
    changed = {d["key"]: d["values"] for d in compared["config_differences"]}
    assert changed["method.r"] == [16, 4] and changed["train.lr"][1] == 1e-3 and "output_dir" not in changed
    assert len(compared["curves"]["lora-b"]["loss"]) == 6
    assert {r["name"] for r in compared["numbers"]} >= {"final eval loss", "peak memory (MB)"}
    gallery = client.get("/api/runs/lora-a/samples").json()
    assert len(gallery) == 2 and {"prompt", "reference", "base", "fine_tuned"} <= set(gallery[0])

    # Chat: the run's streamed reply and its base's, each what `generate` gives for the same conversation.
    messages = [{"role": "user", "content": "what is 2 plus 3?"}]
    events = read_events_post(client, "/api/runs/lora-a/chat", {"messages": messages, "max_new_tokens": 6})
    done = events[-1][1]
    assert events[-1][0] == "done" and {k for k, _ in events[:-1]} == {"token"}
    assert "".join(d["text"] for k, d in events[:-1] if d["side"] == "run") == done["run"]
    loaded = load_for_inference(root / "lora-a")
    options = GenerationOptions(max_new_tokens=6)
    assert done["run"].strip() == generate_replies(loaded.model, loaded.renderer, [messages], options)[0].strip()
    with loaded.model.disable_adapter():
        base_reply = generate_replies(loaded.model, loaded.renderer, [messages], options)[0]
    assert done["against"].strip() == base_reply.strip()
    assert client.post("/api/runs/lora-a/chat", json={"messages": messages, "against": "nope"}).status_code == 404
    # A run trained again (new weights in its folder) is loaded afresh, not served from the cache.
    models = ChatModels()
    first = models.get(str(root / "lora-a"))[0]
    assert models.get(str(root / "lora-a"))[0] is first
    adapter = root / "lora-a" / "adapter_model.safetensors"
    save_file({name: tensor * 2 for name, tensor in load_file(adapter).items()}, adapter)
    assert models.get(str(root / "lora-a"))[0] is not first

    taken = client.post("/api/runs", json={"name": "lora-a", "config_yaml": "{}"})
    assert taken.status_code == 409 and "exists" in taken.json()["error"]
    assert client.get("/api/runs/nope").status_code == 404
    assert client.get("/api/runs/..%2Fetc").status_code in (400, 404)


def test_failures_are_shown_with_their_reason(root, tiny_model_dir):
    client = TestClient(create_app(root))
    bad_key = client.post("/api/runs", json={"name": "bad", "config_yaml": "train: {lrr: 1}\n"})
    assert bad_key.status_code == 400 and "train.lrr" in bad_key.json()["error"]
    assert client.post("/api/runs", json={"name": "../x", "config_yaml": "{}"}).status_code == 400
    missing = yaml_for(tiny_model_dir, root.parent / "missing.jsonl", max_steps=2)
    client.post("/api/runs", json={"name": "no-data", "config_yaml": missing}).raise_for_status()
    failed = wait_for(client, "no-data", lambda run: run["status"] == "failed")
    assert "missing.jsonl" in failed["error"]
    assert any(r["name"] == "no-data" and r["status"] == "failed" for r in client.get("/api/runs").json())
    check = client.post("/api/check", json={"config_yaml": "method: {name: lora, rank: 4}\n"}).json()
    assert not check["ok"] and "method.rank" in check["error"]


def test_the_start_forms_check_inspects_the_data_and_estimates_memory_without_writing(root, tiny_model_dir):
    client = TestClient(create_app(root))
    config = yaml_for(tiny_model_dir, root.parent / "qa.jsonl", max_steps=7)
    check = client.post("/api/check", json={"config_yaml": config}).json()
    assert check["ok"] and check["method"] == "lora"
    assert check["inspect"]["files"][0]["rows"] == 36 and check["inspect"]["files"][0]["invalid_rows"] == 0
    assert check["template"]["ok"]
    assert check["plan"]["steps_planned"] == 7 and check["plan"]["peak_memory_estimate_mb"] > 0
    assert check["plan"]["trainable_parameters"] > 0
    assert not root.exists() or not [p for p in root.iterdir() if not p.name.startswith(".")]  # nothing written


def test_a_killed_run_is_reported_as_died(root, tiny_model_dir):
    train_run(load_config(None, settings(tiny_model_dir, root.parent / "qa.jsonl", f"output_dir={root / 'k'}",
                                         "train.max_steps=2")))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    status = json.loads((root / "k" / "status.json").read_text())
    (root / "k" / "status.json").write_text(json.dumps({**status, "status": "running", "pid": dead.pid}))
    row = TestClient(create_app(root)).get("/api/runs/k").json()
    assert row["status"] == "died" and "--resume" in row["error"]


def test_start_resume_and_stop_go_by_live_processes_on_this_machine(root, tiny_model_dir):
    """A resume the app launched that is still loading (the run's old status.json in place) makes the run busy for
    another resume and for an overwrite; Stop never signals a process status.json names on another host, nor
    fails on a pid that is not a number."""
    import socket

    from tunelab.ui.launcher import UI_DIR

    run = root / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml_for(tiny_model_dir, root.parent / "qa.jsonl"))
    here = {"host": socket.gethostname(), "started_at": time.time() - 60}
    (run / "status.json").write_text(json.dumps({**here, "status": "interrupted", "pid": 1}))
    loading = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    client = TestClient(create_app(root))
    try:
        (root / UI_DIR / "launches").mkdir(parents=True)
        (root / UI_DIR / "launches" / "r.json").write_text(json.dumps(
            {"name": "r", "pid": loading.pid, "args": [], "resume": True, "started_at": time.time() + 1}))
        assert client.post("/api/runs/r/resume").status_code == 409
        started = client.post("/api/runs", json={"name": "r", "config_yaml": "model: x\n", "overwrite": True})
        assert started.status_code == 409 and "training now" in started.text
        assert client.get("/api/runs/r").json()["status"] == "starting"

        (root / UI_DIR / "launches" / "r.json").unlink()
        (run / "status.json").write_text(json.dumps({**here, "status": "running", "pid": loading.pid,
                                                      "host": "gpu-node-7"}))
        stopped = client.post("/api/runs/r/stop")
        assert stopped.status_code == 409 and "gpu-node-7" in stopped.text
        (run / "status.json").write_text(json.dumps({**here, "status": "running", "pid": "abc"}))
        assert client.post("/api/runs/r/stop").status_code == 409
        assert loading.poll() is None  # never signalled
    finally:
        loading.kill()
        loading.wait()


def test_bad_requests_are_refused_naming_the_field_and_unknown_runs_are_404(root):
    root.mkdir()
    client = TestClient(create_app(root))
    for body, field in [({"messages": []}, "messages"),
                        ({"messages": [{"content": "hi"}]}, "messages.0.role"),
                        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
                        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]},
                         "the last message is the user's"),
                        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
                        ({"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 0}, "max_new_tokens")]:
        answer = client.post("/api/runs/r/chat", json=body)
        assert answer.status_code == 422 and field in answer.json()["error"], (body, answer.text)
    for path in ("/api/runs/nope/metrics", "/api/runs/nope/log", "/api/runs/nope/samples", "/api/runs/nope"):
        assert client.get(path).status_code == 404, path
    assert client.get("/api/runs/nope/log?lines=0").status_code == 422
    assert client.get("/api/runs/nope/metrics?after=-3").status_code == 422


def test_the_api_key_guards_the_api_and_the_cli_refuses_open_hosts_without_one(root):
    root.mkdir()
    client = TestClient(create_app(root, api_key="secret"))
    assert client.get("/api/runs").status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer secret"}).status_code == 200
    assert client.get("/api/runs?token=secret").status_code == 200
    assert client.get("/").status_code == 200  # the page itself asks for the key
    done = subprocess.run([sys.executable, "-m", "tunelab", "ui", "--runs", str(root), "--host", "0.0.0.0"],
                          capture_output=True, text=True, env={**os.environ, "TUNELAB_API_KEY": ""})
    assert done.returncode == 2 and "--api-key" in done.stderr
