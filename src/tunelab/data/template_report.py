"""What `tunelab data check-template` reports: each check's outcome, the first failing conversation with its
tokens, as JSON or as text for people."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

CHECKS: dict[str, str] = {
    "prompt_match": "(a) tokens before each trained reply equal the tokens generate builds for that prompt",
    "end_of_turn": "(b) a token generate stops on ends each trained reply and is trained",
    "masks": "(c) each trained reply is trained in full; no system/user/template token or left-out reply is",
    "no_leak": "(d) nothing after a trained reply's end-of-turn token (later turns) is trained",
}


@dataclass
class Failure:
    """The first failing conversation of a check: where it is, what is wrong, and the tokens concerned
    (decoded one by one; trained ones in [[double brackets]])."""

    where: str
    message: str
    tokens: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class CheckResult:
    checked: int = 0
    """Conversations the check ran on."""
    failed: int = 0
    first: Failure | None = None

    @property
    def status(self) -> str:
        return "fail" if self.failed else "pass" if self.checked else "skipped"


@dataclass
class TemplateCheckReport:
    target: str
    model: str
    template: str
    train_on: str
    conversations: int
    """Chat samples in the data (valid rows)."""
    checked: int
    """Conversations checked (all, or a seeded sample)."""
    replies: int
    """Trained assistant replies among them."""
    text_samples: int
    invalid_rows: int
    stop_tokens: list[str]
    checks: dict[str, CheckResult]

    @property
    def ok(self) -> bool:
        return all(result.status != "fail" for result in self.checks.values())

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "checks"}
        data["ok"] = self.ok
        data["checks"] = {
            name: {
                "description": CHECKS[name],
                "status": r.status,
                "checked": r.checked,
                "failed": r.failed,
                "first_failure": asdict(r.first) if r.first else None,
            }
            for name, r in self.checks.items()
        }
        return data


def failure_lines(name: str, result: CheckResult) -> list[str]:
    lines = [f"FAIL {CHECKS[name]}: {result.failed} of {result.checked} conversation(s)"]
    if result.first:
        lines.append(f"     first: {result.first.where}: {result.first.message}")
        lines += [f"       {label}: {' '.join(tokens)}" for label, tokens in result.first.tokens.items()]
    return lines


def render_check_text(report: TemplateCheckReport) -> str:
    """The report for people: one PASS/FAIL/SKIP line per check, the first failure with its tokens."""
    lines = [
        f"template check of {report.target} with {report.model} ({report.template} chat template), "
        f"data.train_on={report.train_on}",
        f"checked {report.checked} of {report.conversations} conversation(s), {report.replies} trained "
        f"repl{'y' if report.replies == 1 else 'ies'}; generate stops on: "
        f"{', '.join(repr(s) for s in report.stop_tokens) or 'nothing'}",
    ]
    if report.text_samples:
        lines.append(f"{report.text_samples} raw-text sample(s) not checked (every token is trained)")
    if report.invalid_rows:
        lines.append(f"{report.invalid_rows} invalid row(s) skipped (`tunelab data inspect` lists them)")
    for name, result in report.checks.items():
        if result.status == "fail":
            lines += failure_lines(name, result)
        elif result.status == "pass":
            lines.append(f"PASS {CHECKS[name]}: {result.checked} conversation(s)")
        else:
            why = (
                "data.train_on=all trains every token"
                if report.train_on == "all" and name in ("masks", "no_leak")
                else "no conversation reached this check"
            )
            lines.append(f"SKIP {CHECKS[name]}: {why}")
    lines.append("result: " + ("pass" if report.ok else "FAIL"))
    return "\n".join(lines)
