"""bench/bench_fleet.py runs, tiny, as a subprocess: its JSON figures are there and every record
the simulated terminals sent was acknowledged (acks verified with the receiver's key) and is
counted by ``clearing report``. No timed assertions: the figures are only checked for being
there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_fleet.py"


def bench(*options: str) -> dict:
    done = subprocess.run([sys.executable, str(BENCH), "--json", *options], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1, done.stdout
    return json.loads(done.stdout)


def check_phase(phase: dict, terminals: int, batches: int) -> None:
    assert phase["failures"] == []
    assert phase["terminals"] == terminals and phase["batches"] == terminals * batches
    assert phase["acknowledged_batches"] == phase["batches"]
    assert phase["records"] >= terminals * batches * 20
    assert phase["acknowledged"] == phase["records"]
    for figure in ("seconds", "records_per_s", "ack_p50_s", "ack_p95_s", "ratio_to_bare"):
        assert phase[figure] > 0, figure


def workers_if_served() -> list[str]:
    """``--workers 2`` when ``clearing serve`` has the option."""
    shown = subprocess.run([str(Path(sys.executable).parent / "farebox"), "clearing", "serve",
                            "--help"], capture_output=True, text=True, timeout=60).stdout
    return ["--workers", "2"] if "--workers" in shown else []


def test_a_tiny_fleet_on_sqlite_is_acknowledged_whole():
    figures = bench("--terminals", "2", "--batches", "2", "--batch-records", "20",
                    "--cards", "30", "--versus-empty", *workers_if_served())
    assert figures["engine"] == "sqlite" and figures["prefill"] is None
    [phase] = figures["phases"]
    check_phase(phase, 2, 2)
    check_phase(figures["empty_phase"], 2, 2)  # the same batches, to an empty database
    assert figures["empty_phase"]["records"] == phase["records"]
    assert figures["versus_empty"] > 0
    assert figures["bare"]["records"] == phase["records"] and figures["bare"]["seconds"] > 0
    report = figures["report"]
    assert report["records_counted"] == report["records_expected"] == phase["records"]
    assert report["seconds"] > 0 and report["empty_seconds"] > 0
    if figures["report_has_day"]:
        assert [day["seconds"] > 0 for day in figures["report_day"]["days"]] == [True]


def test_the_prefill_fills_the_version_2_tables_on_sqlite():
    figures = bench("--prefill", "3000", "--prefill-only")
    assert figures["prefill"]["records"] in (3000, 3001) and figures["prefill"]["seconds"] > 0
    assert "phases" not in figures


def test_two_receivers_on_a_prefilled_postgresql(pg_cluster):
    figures = bench("--engine", "postgres", "--pg-url", pg_cluster, "--terminals", "3",
                    "--batches", "2", "--batch-records", "20", "--prefill", "3000",
                    "--receivers", "2")
    one, two = figures["phases"]
    assert (one["receivers"], two["receivers"]) == (1, 2)
    check_phase(one, 3, 2)
    check_phase(two, 3, 2)
    assert figures["scaling"] > 0 and figures["bare"]["method"] == "COPY"
    report = figures["report"]
    assert report["records_counted"] == report["records_expected"] \
        == figures["prefill"]["records"] + one["records"] + two["records"]
    import psycopg

    with psycopg.connect(pg_cluster) as conn:  # the bench dropped the databases it made
        names = [row[0] for row in conn.execute("SELECT datname FROM pg_database")]
    assert not [name for name in names if name.startswith("fb_bench_")], names
