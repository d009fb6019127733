"""`llamaflow verify` on a damaged artifact of a stage that runs as part of another."""
from __future__ import annotations

from pathlib import Path

from pipelines.artifacts import HashCache, Store


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_names_the_stage_to_force_for_a_damaged_report(tmp_path, capsys):
    """report runs as part of evaluate: a damaged report is recomputed by force=[evaluate]
    (force=[report] is no stage), and `verify report` checks report's artifacts."""
    from pipelines.cli import main

    store = Store(tmp_path / "artifacts", HashCache(tmp_path / "hashcache.json"))
    tmp = store.new_tmp("report", "k")
    (tmp / "report.md").write_text("# report, a long enough line to flip a byte in\n")
    art = store.commit(tmp, "report", "k", version="1", config={}, inputs={}, metrics={})
    _flip_byte(art.path / "report.md")
    assert main(["verify", "--workdir", str(tmp_path), "report"]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED report" in out and "`llamaflow run force=[evaluate]`" in out, out
