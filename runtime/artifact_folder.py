"""An artifact folder as the runtime opens it: its manifest (a build) or export.json (an export), the graph
that stands for its interface, and one-line errors for what is missing or foreign."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_export.artifact import (
    DRAFT_FILE,
    EXPORT_INFO_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    RANKS_FORMAT,
    READABLE_FORMATS,
)
from qwen_export.errors import QwenExportError
from qwen_export.targets import TARGETS


@dataclass
class Artifact:
    folder: Path
    info: dict[str, Any]
    model_path: Path
    target: str

    @classmethod
    def open(cls, folder: str | Path) -> Artifact:
        folder = Path(folder)
        for name in (MANIFEST_FILE, EXPORT_INFO_FILE):
            if (folder / name).is_file():
                info_path = folder / name
                break
        else:
            raise QwenExportError(
                f"{folder}: not an artifact folder (no {MANIFEST_FILE} or {EXPORT_INFO_FILE})"
            )
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise QwenExportError(f"{info_path}: malformed JSON ({e})") from None
        fmt = info.get("format")
        if fmt not in READABLE_FORMATS:
            raise QwenExportError(
                f"{info_path}: format {fmt!r} comes from another qwen-export version; "
                f"this one reads {', '.join(READABLE_FORMATS)} (rebuild the artifact)"
            )
        target = info.get("target", "onnx")
        model_entry = info.get("model", MODEL_FILE)  # engine manifests describe their source model instead
        model_path = folder / (model_entry if isinstance(model_entry, str) else MODEL_FILE)
        if fmt == RANKS_FORMAT:  # one graph per rank; rank 0's stands for the artifact's interface
            from qwen_export.runtime.ranks import check_ranks

            model_path = check_ranks(folder, info)[0] / MODEL_FILE
        known = TARGETS.get(target)
        onnx_target = known is not None and known.runs_on_onnxruntime
        if onnx_target and not model_path.is_file():
            raise QwenExportError(f"{folder}: {model_path.name} is missing (the artifact is incomplete)")
        if onnx_target and not (model_path.parent / (model_path.name + ".data")).is_file():
            raise QwenExportError(f"{folder}: {model_path.name}.data is missing (the artifact is incomplete)")
        for name in info.get("files", {}):  # everything the build wrote, the CPU kernel library included
            if not (folder / name).is_file():
                raise QwenExportError(f"{folder}: {name} is missing (the artifact is incomplete)")
        return cls(folder, info, model_path, target)

    @property
    def draft_path(self) -> Path | None:
        """The MTP draft graph beside an ONNX Runtime artifact's model, if it has one."""
        draft = self.info.get("draft")
        if not draft:
            return None
        path = self.model_path.parent / draft.get("graph", DRAFT_FILE)
        if not path.is_file():
            raise QwenExportError(f"{self.folder}: {path.name} is missing (the artifact is incomplete)")
        return path
