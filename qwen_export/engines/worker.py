"""Engine builds in a child process: `python -m qwen_export.engines.worker REQUEST.json`.

TensorRT and TensorRT-RTX end the process on some internal errors (an uncaught C++ exception aborts);
building in a child turns that into an error message and leaves the parent's output folder clean.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_export.engines.spec import Profile
from qwen_export.engines.toolchain import (
    BuildOptions,
    EngineBuild,
    EngineBuildError,
    Toolchain,
    toolchain_for,
)


def build_engine(
    toolchain: Toolchain,
    onnx_path: Path,
    profiles: Sequence[Profile],
    sm: str,
    options: BuildOptions,
    engine_path: Path,
    isolate: bool = True,
) -> EngineBuild:
    """Build the `sm` engine into `engine_path`. With `isolate`, in a child process: the builders abort
    the whole process on some internal errors, and a crash must become an error message instead."""
    if not isolate:
        return toolchain.build_here(onnx_path, profiles, sm, options, engine_path)
    with tempfile.TemporaryDirectory(prefix="qwen-engine-build-") as folder:
        request = Path(folder) / "request.json"
        report = Path(folder) / "report.json"
        request.write_text(
            json.dumps(
                {
                    "toolchain": toolchain.spawn_args(),
                    "onnx": str(onnx_path),
                    "profiles": [p.to_json() for p in profiles],
                    "sm": sm,
                    "options": options.to_json(),
                    "engine": str(engine_path),
                    "report": str(report),
                }
            )
        )
        proc = subprocess.run(
            [sys.executable, "-m", "qwen_export.engines.worker", str(request)], capture_output=True, text=True
        )
        result: dict[str, Any] = json.loads(report.read_text()) if report.is_file() else {}
    if proc.returncode == 0 and "timings_s" in result:
        return EngineBuild(
            engine_path, result["timings_s"], result.get("warnings", []), result.get("info", {})
        )
    engine_path.unlink(missing_ok=True)
    if "error" in result:
        raise EngineBuildError(result["error"])
    how = _exit_description(proc.returncode)
    tail = " | ".join(line for line in proc.stderr.strip().splitlines()[-4:] if line.strip())
    raise EngineBuildError(
        f"{toolchain.target}: the builder crashed building the {sm} engine ({how}): {tail}"
    )


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    report = Path(request["report"])
    args = request["toolchain"]
    toolchain = toolchain_for(
        args["target"],
        Path(args["plugin_library"]) if args.get("plugin_library") else None,
        Path(args["timing_cache"]) if args.get("timing_cache") else None,
    )
    profiles = [
        Profile(p["name"], {k: tuple(tuple(d) for d in v) for k, v in p["shapes"].items()})  # type: ignore[misc]
        for p in request["profiles"]
    ]
    try:
        built = toolchain.build_here(
            Path(request["onnx"]),
            profiles,
            request["sm"],
            BuildOptions(**request["options"]),
            Path(request["engine"]),
        )
    except EngineBuildError as e:
        report.write_text(json.dumps({"error": str(e)}))
        return 1
    report.write_text(
        json.dumps({"timings_s": built.timings_s, "warnings": built.warnings, "info": built.info})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
