"""Every committed benchmark result can be regenerated: each file under benchmarks/results is a report (.md) that
records its command, a companion (.json/.png) of such a report, or an input named in a report's command."""
from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
COMMAND = "python benchmarks/"


def commands(report: Path) -> list[str]:
    return [line.strip() for line in report.read_text().splitlines() if COMMAND in line]


def test_every_result_file_is_reproducible_by_a_recorded_command() -> None:
    reports = {path.stem: commands(path) for path in RESULTS.glob("*.md")}
    every_command = " ".join(line for lines in reports.values() for line in lines)
    orphans = []
    for path in sorted(RESULTS.iterdir()):
        if path.suffix == ".md":
            has_command = bool(reports[path.stem])
        else:
            has_command = bool(reports.get(path.stem)) or f"benchmarks/results/{path.name}" in every_command
        if not has_command:
            orphans.append(path.name)
    assert orphans == [], f"result files no recorded command regenerates: {orphans}"
