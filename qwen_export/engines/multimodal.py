"""Engines for a multimodal export: the text tower (inputs_embeds + mRoPE), the vision tower and the token
embedding, one engine per GPU each, in one artifact.

    OUT/manifest.json, OUT/engines/<sm>/model.engine   the text tower, laid out as a text-only build
    OUT/vision/manifest.json, OUT/vision/engines/<sm>/model.engine
    OUT/embed/manifest.json, OUT/embed/engines/<sm>/model.engine

Each tower goes through its own passes (qwen_export/targets.py: the target's pipeline, and its vision and
embed pipelines) and profiles: the text tower's and the embedding's from the spec's batch and lengths, the
vision tower's from its media limits (qwen_export/engines/vision.py). The top manifest's `multimodal`
section names the three and the limits a runtime refuses media beyond.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from qwen_export.artifact import EXPORT_INFO_FILE, MANIFEST_FILE, BuildResult
from qwen_export.engines.builder import BuildPlan, build_engines
from qwen_export.engines.spec import DeploySpec
from qwen_export.engines.vision import VisionLimits
from qwen_export.errors import QwenExportError
from qwen_export.fsutil import atomic_output_dir

SUBFOLDERS = {"vision": "vision", "embed": "embed"}  # the text tower's engines sit at the top


def build_multimodal_engines(
    export_dir: Path,
    spec: DeploySpec,
    out: Path,
    *,
    dry_run: bool = False,
    console: Console | None = None,
    **options: Any,
) -> BuildResult | BuildPlan:
    """Text, vision and embedding engines for every GPU of `spec` from a multimodal export folder; a dry run
    prints the three plans and returns the text tower's. Nothing is left at `out` on error."""
    info = json.loads((export_dir / EXPORT_INFO_FILE).read_text())
    multimodal = info.get("multimodal")
    if not multimodal:
        raise QwenExportError(f"{export_dir}: not a multimodal export (export it with --multimodal)")
    limits = VisionLimits.from_spec(spec, multimodal["vision_spec"])  # bad limits fail before any work
    graphs = {tower: export_dir / name for tower, name in multimodal["graphs"].items()}
    if dry_run:
        plans = [
            build_engines(graphs[tower], spec, out, dry_run=True, console=console, tower=tower, **options)
            for tower in ("text", *SUBFOLDERS)
        ]
        return plans[0]

    with atomic_output_dir(out) as tmp:
        text = build_engines(graphs["text"], spec, tmp / "text", console=console, **options)
        for item in (tmp / "text").iterdir():
            shutil.move(str(item), tmp / item.name)
        (tmp / "text").rmdir()
        results = {"text": text}
        for tower, folder in SUBFOLDERS.items():
            results[tower] = build_engines(
                graphs[tower], spec, tmp / folder, console=console, tower=tower, **options
            )
        manifest = json.loads((tmp / MANIFEST_FILE).read_text())
        manifest["multimodal"] = {
            "towers": {"text": ".", **SUBFOLDERS},
            "vision_spec": multimodal["vision_spec"],
            "limits": limits.to_json(),
            "io": multimodal["io"],
            "engines": {tower: _engine_paths(tower, r) for tower, r in results.items()},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    engines = [record for r in results.values() for record in r.engines]
    timings = {f"{tower}_total": r.timings_s.get("total", 0.0) for tower, r in results.items()}
    return BuildResult(out, spec.target, manifest, engines=engines, plan=text.plan, timings_s=timings)


def _engine_paths(tower: str, result: BuildResult) -> dict[str, str]:
    """GPU -> the tower's engine file, relative to the artifact's top folder."""
    folder = Path(SUBFOLDERS.get(tower, "."))
    return {sm: str(folder / entry["path"]) for sm, entry in result.manifest["engines"].items()}
