"""Bad input, generated: every malformed data file or config ends `tunelab train` with exit code 2 and one message
naming the file and line (or the key), no traceback, no run directory, and nothing half-written in the cache.

Each example starts from valid rows and breaks exactly one thing, so the expected message is known."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.formats import _ROLE_ALIASES, ROLES

ROWS = 6
QA_ROWS = [{"question": f"what is {i} plus {i}?", "answer": f"{2 * i}"} for i in range(ROWS)]
CHAT_ROWS = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
             for i in range(ROWS)]
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@dataclass
class Broken:
    kind: str
    name: str
    """File name (its suffix chooses the reader)."""
    content: bytes
    line: int | None
    """The line the message must name, or None when the fault is the whole file's."""
    overrides: tuple[str, ...] = ()


def jsonl(rows: list) -> list[bytes]:
    return [json.dumps(row).encode() for row in rows]


def joined(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def _not_an_object(text: str) -> bool:
    try:
        return not isinstance(json.loads(text), dict)
    except ValueError:
        return True


@st.composite
def broken_jsonl(draw) -> Broken:
    kind = draw(st.sampled_from(["truncated", "garbage", "wrong_type", "missing", "empty", "null", "utf8", "bom",
                                 "role", "overlong"]))
    i = draw(st.integers(0, ROWS - 1))
    rows = [dict(row) for row in QA_ROWS]
    field = draw(st.sampled_from(["question", "answer"]))
    overrides: tuple[str, ...] = ()
    if kind == "truncated":
        lines = jsonl(rows)
        lines[i] = lines[i][: draw(st.integers(1, len(lines[i]) - 1))]
    elif kind == "garbage":
        text = draw(st.text(st.characters(exclude_characters="\n"), min_size=1, max_size=30)
                    .filter(lambda t: t.strip() and _not_an_object(t)))
        lines = jsonl(rows)
        lines[i] = text.encode()
    elif kind == "wrong_type":
        rows[i][field] = draw(st.one_of(st.booleans(), st.lists(st.integers(), max_size=3),
                                        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)))
        lines = jsonl(rows)
    elif kind == "missing":
        del rows[i][field]
        lines = jsonl(rows)
    elif kind == "empty":
        rows[i][field] = draw(st.sampled_from(["", " ", "\t\n", "\u3000"]))
        lines = jsonl(rows)
    elif kind == "null":
        rows[i][field] = None
        lines = jsonl(rows)
    elif kind == "utf8":
        lines = jsonl(rows)
        at = draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:at] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\x80", b"\xed\xa0\x80"])) + lines[i][at:]
    elif kind == "bom":
        i = max(i, 1)  # a byte-order mark opening the file is fine; anywhere else it breaks the row
        lines = jsonl(rows)
        lines[i] = b"\xef\xbb\xbf" + lines[i]
    elif kind == "role":
        known = set(ROLES) | set(_ROLE_ALIASES)
        rows = [json.loads(json.dumps(row)) for row in CHAT_ROWS]
        rows[i]["messages"][draw(st.integers(0, 1))]["role"] = draw(
            st.text(min_size=1, max_size=10).filter(lambda r: r not in known))
        lines = jsonl(rows)
    else:  # overlong
        rows[i][field] = "word " * draw(st.integers(80, 3000))
        lines = jsonl(rows)
        overrides = ("data.overlong=error",)
    return Broken(kind, "data.jsonl", joined(lines), i + 1, overrides)


@st.composite
def broken_other(draw) -> Broken:
    kind = draw(st.sampled_from(["empty_file", "csv_utf8", "csv_empty_cell", "csv_no_reply", "json_utf8", "text_utf8"]))
    i = draw(st.integers(0, ROWS - 1))
    csv_lines = [b"question,answer"] + [f'"{r["question"]}",{r["answer"]}'.encode() for r in QA_ROWS]
    if kind == "empty_file":
        name = draw(st.sampled_from(["data.jsonl", "data.csv", "data.json", "data.txt"]))
        content = draw(st.sampled_from([b"", b"\n", b" \n\n\t\n"]))
        return Broken(kind, name, content if name != "data.json" else b"[]", None)
    if kind == "csv_utf8":
        csv_lines[i + 1] = csv_lines[i + 1] + b"\xff"
        return Broken(kind, "data.csv", joined(csv_lines), i + 2)
    if kind == "csv_empty_cell":
        csv_lines[i + 1] = csv_lines[i + 1].rsplit(b",", 1)[0] + b","
        return Broken(kind, "data.csv", joined(csv_lines), i + 2)
    if kind == "csv_no_reply":
        return Broken(kind, "data.csv", joined([line.rsplit(b",", 1)[0] for line in csv_lines]), None)
    if kind == "json_utf8":
        text = json.dumps(QA_ROWS, indent=1).encode().split(b"\n")
        line = draw(st.integers(1, len(text) - 2))
        text[line] = text[line] + b"\xc3"
        return Broken(kind, "data.json", b"\n".join(text), line + 1)
    lines = [b"First document line.", b"", b"Second document."]
    lines[2] = b"Second \xff document."
    return Broken(kind, "data.txt", joined(lines), 3)


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    return home


def run_train(tiny_model_dir: Path, folder: Path, overrides: list[str]):
    config = folder / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\n")
    return CliRunner().invoke(app, ["train", str(config), f"output_dir={folder / 'run'}", "data.max_length=64",
                                    "train.max_steps=1", "eval.before_after=false", *overrides])


def assert_clean_failure(result, folder: Path, home: Path, *named: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    message = result.output[result.output.index("error:"):]
    for text in named:
        assert text in message, (text, message)
    assert not (folder / "run").exists()
    leftovers = [p for p in home.rglob("*") if p.name.startswith(".tmp")]
    assert not leftovers, leftovers


@FUZZ
@given(broken=st.one_of(broken_jsonl(), broken_other()))
def test_a_broken_data_file_fails_cleanly_naming_file_and_line(broken, tiny_model_dir, isolated_home):
    folder = Path(tempfile.mkdtemp())
    try:
        data = folder / broken.name
        data.write_bytes(broken.content)
        result = run_train(tiny_model_dir, folder, [f"data.train={data}", *broken.overrides])
        where = f"{data}:{broken.line}:" if broken.line else str(data)
        assert_clean_failure(result, folder, isolated_home, where)
    finally:
        shutil.rmtree(folder)


BAD_VALUES = {
    "train.lr": ["-1", "0", "fast", "[1]"],
    "train.batch_size": ["0", "-3", "2.5", "eight"],
    "train.epochs": ["0", "none?"],
    "train.scheduler": ["cosinus", "1"],
    "data.max_length": ["0", "-1", "long"],
    "data.overlong": ["cut", "yes"],
    "method.name": ["lora2", "qlora8", "3"],
    "method.r": ["0", "-8", "big"],
    "objective.name": ["dpo2", "ppo"],
    "eval.generate_samples": ["-1", "many"],
}
SECTIONS = ["data", "train", "method", "eval", "objective", "track"]


@st.composite
def broken_override(draw) -> tuple[str, str]:
    """(override, the key the message must name)."""
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(BAD_VALUES)))
        return f"{key}={draw(st.sampled_from(BAD_VALUES[key]))}", key
    section = draw(st.sampled_from(SECTIONS))
    name = draw(st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True).filter(lambda n: n not in ("name", "to")))
    return f"{section}.{name}_x=1", f"{section}.{name}_x"


@FUZZ
@given(case=broken_override())
def test_a_broken_config_override_fails_cleanly_naming_the_key(case, tiny_model_dir, isolated_home, tmp_path):
    override, key = case
    folder = Path(tempfile.mkdtemp())
    try:
        data = folder / "data.jsonl"
        data.write_bytes(joined(jsonl(QA_ROWS)))
        result = run_train(tiny_model_dir, folder, [f"data.train={data}", override])
        assert_clean_failure(result, folder, isolated_home, key)
    finally:
        shutil.rmtree(folder)


VALID_CONFIG = ["model: {model}", "data:", "  train: {data}", "  max_length: 64", "train:", "  max_steps: 1",
                "  lr: 0.0001", "eval:", "  before_after: false"]


@st.composite
def broken_config_file(draw) -> tuple[bytes, int | None]:
    """(file content, the line the message must name or None), each breaking one line of a valid config."""
    kind = draw(st.sampled_from(["tab", "unclosed", "utf8", "not_mapping", "bad_indent"]))
    lines = list(VALID_CONFIG)
    i = draw(st.integers(1, len(lines) - 1))
    if kind == "tab":
        lines[i] = "\t" + lines[i].lstrip()
        return "\n".join(lines).encode(), i + 1
    if kind == "unclosed":
        lines[i] = lines[i].split(":")[0] + ": [1, 2"
        return "\n".join(lines).encode(), None  # the parser notices at a later line
    if kind == "utf8":
        encoded = [line.encode() for line in lines]
        encoded[i] += b"\xff"
        return b"\n".join(encoded), i + 1
    if kind == "not_mapping":
        return b"- model\n- data\n", None
    lines[i] = "   " + lines[i] if not lines[i].startswith(" ") else lines[i].strip() + ": :"
    return "\n".join(lines).encode(), None


@FUZZ
@given(case=broken_config_file())
def test_a_broken_config_file_fails_cleanly_naming_it(case, tiny_model_dir, isolated_home):
    content, line = case
    folder = Path(tempfile.mkdtemp())
    try:
        data = folder / "data.jsonl"
        data.write_bytes(joined(jsonl(QA_ROWS)))
        config = folder / "run.yaml"
        config.write_bytes(content.replace(b"{model}", str(tiny_model_dir).encode())
                           .replace(b"{data}", str(data).encode()))
        result = CliRunner().invoke(app, ["train", str(config), f"output_dir={folder / 'run'}"])
        assert_clean_failure(result, folder, isolated_home, f"{config}:{line}:" if line else str(config))
    finally:
        shutil.rmtree(folder)
