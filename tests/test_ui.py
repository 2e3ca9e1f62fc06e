"""The web app's API on real tiny runs: the runs table and a run's page read from run directories (CLI runs
included), compare, chat next to the base model, the start form's check, failures, a killed run, and the API key.
A training started, streamed, stopped and resumed from the app is tests/test_ui_browser.py's."""

from __future__ import annotations

import json
import os
import shutil
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
    parts = [{"role": "user", "content": [{"type": "text", "text": "what is 2 plus "}, {"type": "text", "text": "3?"}]}]
    again = read_events_post(client, "/api/runs/lora-a/chat", {"messages": parts, "max_new_tokens": 6, "against": None})
    assert again[-1] == ("done", {"run": done["run"], "against": ""})  # OpenAI's text parts, as `serve` takes them
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
        # A start over the old run (overwrite) is `starting` while it loads too, not the old run's `interrupted`
        # (the page offers Stop for it); one that wrote how the run ended is only exiting.
        record = json.loads((root / UI_DIR / "launches" / "r.json").read_text())
        (root / UI_DIR / "launches" / "r.json").write_text(json.dumps({**record, "resume": False}))
        assert client.get("/api/runs/r").json()["status"] == "starting"
        (run / "status.json").write_text(json.dumps({**here, "status": "completed", "pid": loading.pid}))
        assert client.get("/api/runs/r").json()["status"] == "completed"
        assert client.get("/api/runs").json()[0]["status"] == "completed"

        (root / UI_DIR / "launches" / "r.json").unlink()
        (run / "status.json").write_text(json.dumps({**here, "status": "running", "pid": loading.pid,
                                                      "host": "gpu-node-7"}))
        stopped = client.post("/api/runs/r/stop")
        assert stopped.status_code == 409 and "gpu-node-7" in stopped.text
        (run / "status.json").write_text(json.dumps({**here, "status": "running", "pid": "abc"}))
        assert client.post("/api/runs/r/stop").status_code == 409
        assert client.post("/api/runs/nope/stop").status_code == 404
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
    # A message is `tunelab serve`'s: OpenAI's text parts pass the door (then: no such run), an image part does not.
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert client.post("/api/runs/r/chat", json=parts).status_code == 404
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    answer = client.post("/api/runs/r/chat", json=image)
    assert answer.status_code == 422 and "messages.0.content" in answer.json()["error"]
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


def test_an_empty_config_is_refused_and_starts_nothing(root):
    """A start form submitted with nothing in its box is a mistake, not a request for the default training; `{}`
    (or the form's own YAML) asks for the defaults in so many words."""
    from tunelab.ui.launcher import UI_DIR

    root.mkdir()
    client = TestClient(create_app(root))
    for text in ("", "  \n\t\n", "# my config, to be written\n\n", "---\n"):
        started = client.post("/api/runs", json={"name": "oops", "config_yaml": text})
        assert started.status_code == 400 and "config is empty" in started.json()["error"], (text, started.text)
        check = client.post("/api/check", json={"config_yaml": text}).json()
        assert not check["ok"] and "config is empty" in check["error"]
    assert not (root / UI_DIR).exists() and client.get("/api/runs").json() == []


def write_run(folder: Path, status: str = "interrupted", **files: str) -> Path:
    """A run directory as `tunelab train` leaves it, without training: config.yaml, status.json and `files`."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: tiny\nmethod: {name: lora}\n")
    (folder / "status.json").write_text(json.dumps({"status": status, "pid": 0, "started_at": time.time()}))
    for name, text in files.items():
        (folder / name.replace("_", ".")).write_text(text)
    return folder


def test_runs_being_written_and_odd_names_are_answered_not_500(root):
    """Half a line of samples.jsonl (a run writing it, or killed while it did), a launched run whose folder lost
    its config.yaml, a run name that is a file of the runs folder, and a resume with no complete checkpoint."""
    from tunelab.ui.launcher import UI_DIR

    sample = {"prompt": [{"role": "user", "content": "hi"}], "reference": "1", "base": "2", "fine_tuned": "1"}
    write_run(root / "done", "completed", samples_jsonl=json.dumps(sample) + "\n[1]\n" + '{"prompt": [{"ro')
    client = TestClient(create_app(root))
    assert client.get("/api/runs/done/samples").json() == [sample]

    (root / UI_DIR / "launches").mkdir(parents=True)
    (root / UI_DIR / "launches" / "gone.json").write_text(json.dumps({"name": "gone", "pid": 0, "args": [],
                                                                       "resume": False, "started_at": 0}))
    (root / "gone").mkdir()
    (root / "gone" / "status.json").write_text(json.dumps({"status": "completed"}))
    assert [row["name"] for row in client.get("/api/runs").json()] == ["done"]

    # Chat against a run still training (no summary.json, no saved model) is refused before the stream starts.
    write_run(root / "half", "running")
    (root / "done" / "summary.json").write_text("{}")
    said = client.post("/api/runs/done/chat", json={"messages": [{"role": "user", "content": "hi"}], "against": "half"})
    assert said.status_code == 404 and "'half' has no trained model yet to compare with (it" in said.json()["error"]

    (root / "notes.txt").write_text("not a run")
    taken = client.post("/api/runs", json={"name": "notes.txt", "config_yaml": "model: x\n"})
    assert taken.status_code == 409 and "is a file" in taken.json()["error"]
    assert (root / "notes.txt").read_text() == "not a run"

    (root / "done" / "checkpoints" / ".tmp-step-000004").mkdir(parents=True)  # killed while writing its first one
    refused = client.post("/api/runs/done/resume")
    assert refused.status_code == 409 and "no complete checkpoint" in refused.json()["error"]
    assert ".tmp-step-000004 ignored" in refused.json()["error"]
    assert not (root / UI_DIR / "launches" / "done.json").exists()  # nothing was started


def test_cli_runs_with_any_folder_name_open_and_no_name_leaves_the_runs_folder(root):
    """`tunelab train output_dir="runs/my run"` is a run the table lists, so its page, log and stop answer for it;
    names that would leave the runs folder (or are too long to be a folder) are refused, not a 500."""
    from urllib.parse import quote

    write_run(root / "my run", "completed")
    write_run(root / "_scratch", "completed", train_log="step 1\n")
    write_run(root / "lr=1e-3,r=8", "completed")
    (root.parent / "secret").mkdir()
    client = TestClient(create_app(root))
    assert {row["name"] for row in client.get("/api/runs").json()} == {"my run", "_scratch", "lr=1e-3,r=8"}
    for name in ("my run", "_scratch"):
        assert client.get(f"/api/runs/{quote(name, safe='')}").json()["status"] == "completed"
    assert client.get("/api/runs/_scratch/log").json()["text"] == "step 1"
    assert client.post("/api/runs/my%20run/stop").status_code == 409  # not training, rather than a bad name
    assert client.get("/api/compare?runs=my run,_scratch").json()["runs"] == ["my run", "_scratch"]  # older links
    commas = client.get("/api/compare", params=[("runs", "lr=1e-3,r=8"), ("runs", "my run")]).json()
    assert commas["runs"] == ["lr=1e-3,r=8", "my run"] and set(commas["curves"]) == {"lr=1e-3,r=8", "my run"}
    alone = client.get("/api/compare", params={"runs": "lr=1e-3,r=8"}).json()  # that run, not an older link's two
    assert alone == {"error": "compare needs two or more runs"}
    if shutil.which("node"):  # and the compare page reads links as the API does (app.js's runsOf, run in node)
        source = (Path(create_app.__code__.co_filename).parent / "static" / "app.js").read_text()
        start, queries = source.index("function runsOf("), ["runs=lr%3D1e-3%2Cr%3D8", "runs=a%2Cb", "runs=a%2C"]
        script = (source[start:source.index("\n}\n", start) + 2] + f"console.log(JSON.stringify({json.dumps(queries)}"
                  ".map((q) => runsOf(q, new Set(['lr=1e-3,r=8', 'a', 'b'])))));")
        read = subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True, timeout=60).stdout
        assert json.loads(read) == [["lr=1e-3,r=8"], ["a", "b"], ["a"]]
    for name in ("..", ".tunelab-ui", "a" * 300):
        for path in (f"/api/runs/{name}", f"/api/runs/{name}/log", f"/api/runs/{name}/metrics"):
            assert client.get(path).status_code in (400, 404), path
    assert client.post("/api/runs", json={"name": "my run", "config_yaml": "model: x\n"}).status_code == 400


def test_a_run_folder_given_as_the_runs_folder_opens_under_its_own_name(root):
    """`tunelab ui --runs RUN_DIR`: the run goes by its folder's name, which a URL keeps (browsers and HTTP clients
    drop a `.` segment: `/api/runs/./metrics` reaches `/api/runs/metrics`), so its page, curves, samples, log and
    live feed load; a run inside with that name keeps it, and the folder's own run gets a `~`."""
    sample = {"prompt": [{"role": "user", "content": "hi"}], "reference": "1", "base": "2", "fine_tuned": "1"}
    run = write_run(root / "lora-r8", "completed", metrics_jsonl='{"step": 1, "loss": 2.5}\n',
                    samples_jsonl=json.dumps(sample) + "\n", train_log="step 1\n")
    client = TestClient(create_app(run))
    assert [row["name"] for row in client.get("/api/runs").json()] == ["lora-r8"]
    at = "/api/runs/lora-r8"
    assert client.get(at).json()["status"] == "completed"
    assert client.get(f"{at}/metrics").json()["records"] == [{"step": 1, "loss": 2.5}]
    assert client.get(f"{at}/samples").json() == [sample]
    assert client.get(f"{at}/log").json()["text"] == "step 1"
    assert read_events(client, f"{at}/events", {"run"}, 1)[0][1]["status"] == "completed"
    assert client.post(f"{at}/stop").status_code == 409  # found, and not training
    started = client.post("/api/runs", json={"name": "lora-r8", "config_yaml": "model: x\n"})
    assert started.status_code == 409 and "runs folder itself" in started.json()["error"]
    assert not (run / "lora-r8").exists()

    write_run(run / "lora-r8", "interrupted")
    rows = {row["name"]: row["status"] for row in client.get("/api/runs").json()}
    assert rows == {"lora-r8~": "completed", "lora-r8": "interrupted"}
    assert client.get(f"{at}/metrics").json()["records"] == []
    assert client.get(f"{at}~/metrics").json()["records"] == [{"step": 1, "loss": 2.5}]


def test_config_errors_name_the_config_box_and_its_line_not_the_apps_copy(root):
    """Start and Check write the box's text to a file of their own (.tunelab-ui/configs/NAME.yaml, a scratch file);
    the user typed into the box, so its errors say `the config box, line N`."""
    root.mkdir()
    client = TestClient(create_app(root))
    for text, said in [("model: x\ntrain:\n  lr: 1\n\tbatch_size: 2\n", "the config box, line 4: not valid YAML"),
                       ("- a list\n", "the config box: a config file must hold a mapping"),
                       ("train: {lrr: 1}\n", "the config box: unknown key 'train.lrr'")]:
        started = client.post("/api/runs", json={"name": "typo", "config_yaml": text}).json()["error"]
        checked = client.post("/api/check", json={"config_yaml": text}).json()["error"]
        for error in (started, checked):
            assert error.startswith(said) and ".yaml" not in error, (text, error)
