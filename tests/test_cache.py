"""`qwen-export cache`: what the cache holds, last use recorded on reuse, pruning oldest use first, and
entries rebuilt after removal. Runs on a private cache folder (QWEN_EXPORT_CACHE)."""

from __future__ import annotations

import json
import os
import time

import pytest
from typer.testing import CliRunner

from qwen_export import cache as cache_lib
from qwen_export.cli import app
from qwen_export.engines.cache import EngineCache
from qwen_export.exporter.export import cached_export
from qwen_export.presets import materialize

PRESET = "tiny-qwen3.5"
DAY = 86400


@pytest.fixture
def filled(tmp_path, monkeypatch):
    """A cache with one preset, one export and two engine entries (stored through EngineCache)."""
    monkeypatch.setenv("QWEN_EXPORT_CACHE", str(tmp_path / "cache"))
    preset_dir = materialize(PRESET, quiet=True)
    export_dir = cached_export(preset=PRESET)
    engines = EngineCache()
    stored = []
    for key, size in (("a1" * 32, 3000), ("b2" * 32, 5000)):
        staged = engines.staging(key)
        staged.write_bytes(os.urandom(size))
        stored.append(engines.store(key, staged, {"gpu": "sm89"}).engine.parent)
    return {"presets": preset_dir, "exports": export_dir, "engines": stored}


def _age(folder, days: float) -> None:
    then = time.time() - days * DAY
    os.utime(folder, (then, then))


def test_entries_cover_every_area_with_their_sizes(filled):
    found = cache_lib.entries()
    by_area = {a: [e for e in found if e.area == a] for a in cache_lib.AREAS}
    assert [e.path for e in by_area["presets"]] == [filled["presets"]]
    assert [e.path for e in by_area["exports"]] == [filled["exports"]]
    assert sorted(e.path for e in by_area["engines"]) == sorted(filled["engines"])
    export_bytes = sum(f.stat().st_size for f in filled["exports"].rglob("*") if f.is_file())
    assert by_area["exports"][0].bytes == export_bytes > 0
    engine_bytes = []
    for entry in by_area["engines"]:
        engine, meta = entry.path / "model.engine", entry.path / "entry.json"
        assert entry.bytes == engine.stat().st_size + meta.stat().st_size
        engine_bytes.append(engine.stat().st_size)
    assert sorted(engine_bytes) == [3000, 5000]


def test_reuse_records_the_last_use(filled):
    _age(filled["exports"], 10)
    _age(filled["presets"], 10)
    _age(filled["engines"][0], 10)
    assert cached_export(preset=PRESET) == filled["exports"]  # reused, not re-exported
    key = filled["engines"][0].name
    assert EngineCache().lookup(key) is not None
    now = time.time()
    for folder in (filled["exports"], filled["presets"], filled["engines"][0]):
        assert now - folder.stat().st_mtime < 60


def test_prune_by_age_then_by_size_oldest_first(filled):
    _age(filled["engines"][0], 30)
    _age(filled["engines"][1], 5)
    _age(filled["exports"], 1)
    found = cache_lib.entries()
    old = cache_lib.select_for_removal(found, older_than_days=7)
    assert [e.path for e in old] == [filled["engines"][0]]
    total = sum(e.bytes for e in found)
    presets_bytes = next(e.bytes for e in found if e.area == "presets")
    # keep only what the (most recently used) preset takes: everything older goes, oldest first
    chosen = cache_lib.select_for_removal(found, max_bytes=presets_bytes)
    assert [e.path for e in chosen] == [filled["engines"][0], filled["engines"][1], filled["exports"]]
    assert total - sum(e.bytes for e in chosen) <= presets_bytes


def test_removed_entries_are_gone_and_rebuilt_on_next_use(filled):
    exports = cache_lib.entries(["exports"])
    assert cache_lib.remove(exports) == exports[0].bytes
    assert not filled["exports"].exists()
    assert not [p for p in filled["exports"].parent.iterdir()]  # nothing half removed left behind
    rebuilt = cached_export(preset=PRESET)
    assert rebuilt == filled["exports"] and (rebuilt / "export.json").is_file()


def test_cli_reports_prunes_and_refuses_bad_input(filled):
    runner = CliRunner()
    report = runner.invoke(app, ["cache", "--json"])
    assert report.exit_code == 0, report.output
    assert len(json.loads(report.output)["entries"]) == 4

    dry = runner.invoke(app, ["cache", "--area", "engines", "--clear", "--dry-run", "--json"])
    assert dry.exit_code == 0 and len(json.loads(dry.output)["would_remove"]) == 2
    assert all(p.exists() for p in filled["engines"])

    cleared = runner.invoke(app, ["cache", "--area", "engines", "--clear", "--json"])
    assert cleared.exit_code == 0 and len(json.loads(cleared.output)["removed"]) == 2
    assert not any(p.exists() for p in filled["engines"]) and filled["exports"].exists()

    bad_area = runner.invoke(app, ["cache", "--area", "weights"])
    assert bad_area.exit_code == 2 and "unknown cache area 'weights'" in bad_area.output
    both = runner.invoke(app, ["cache", "--clear", "--max-size", "1"])
    assert both.exit_code == 2 and "--clear removes everything" in both.output
