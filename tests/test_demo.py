"""The demo's synthetic checkpoint (pipelines/demo.py): kept in the workspace for later
`llamaflow run recipe=demo` commands, the same bytes wherever it is built."""
from __future__ import annotations

from pathlib import Path

from pipelines.config import load_config


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_the_demo_source_has_the_same_bytes_in_any_workspace(tmp_path):
    """The download stage keys a local source by its checklists, which hold the tokenizer's
    md5: a tokenizer that records the folder it was trained in gave each workspace, and each
    rebuild, another key."""
    from pipelines.demo import ensure_demo_source

    a = _files(ensure_demo_source(tmp_path / "one"))
    b = _files(ensure_demo_source(tmp_path / "deeper" / "two"))
    assert sorted(a) == sorted(b) and "tiny/checklist.chk" in a and "tokenizer.model" in a
    assert [f for f in a if a[f] != b[f]] == []
    for data in a.values():
        assert str(tmp_path).encode() not in data


def test_the_demo_source_is_made_once_and_only_complete(tmp_path):
    from pipelines.demo import DEMO_SOURCE, ensure_demo_source

    model_cfg = load_config(["recipe=demo"])["model"]
    # an interrupted demo's leftover (no checklist.chk) is replaced, not taken for the source
    (tmp_path / DEMO_SOURCE / model_cfg["meta_dir"]).mkdir(parents=True)
    (tmp_path / DEMO_SOURCE / "tokenizer.model").write_bytes(b"half")
    source = ensure_demo_source(tmp_path, model_cfg)
    assert source == tmp_path / DEMO_SOURCE
    assert (source / model_cfg["meta_dir"] / "checklist.chk").is_file()
    assert (source / "tokenizer.model").read_bytes() != b"half"
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_SOURCE]   # no temp dir left
    stamp = (source / "tokenizer.model").stat().st_mtime_ns
    assert ensure_demo_source(tmp_path) == source                        # kept, not rebuilt
    assert (source / "tokenizer.model").stat().st_mtime_ns == stamp
    # and the demo recipe reads it there
    cfg = load_config(["recipe=demo", f"workdir={tmp_path}"])
    assert cfg["source"] == {"kind": "local", "path": str(source), "model_dir": "tiny",
                             "hardlink": False}
