"""Well-formedness: the ONNX checker with full_check (strict shape inference) on a saved model."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

from qwen_export.passes.numerics import saved_model

VERIFY_ENV = "QWEN_EXPORT_VERIFY_PASSES"  # "1": the pass manager checks the graph after every pass


def verify_by_default() -> bool:
    return os.environ.get(VERIFY_ENV, "") not in ("", "0")


def check_file(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)


def check_well_formed(model: ir.Model) -> None:
    """Raise onnx.checker.ValidationError (or an inference error) if the model is not valid ONNX."""
    with saved_model(model) as path:
        check_file(path)
