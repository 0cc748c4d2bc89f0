"""Fixtures shared by more than one test module. Helper functions and constants stay in the helper
modules (passes_support.py, checkpoints.py, ...) and are imported normally; fixtures live here so that no
test module has to import one."""

from __future__ import annotations

import os

import pytest

# The Triton kernel tests run under Triton's interpreter, which must be on before anything imports triton
# (torch and transformers do): triton.language's own helpers are decorated at import. The ahead-of-time
# compile tests run their compiler in child processes without it.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Each pytest-xdist worker runs torch's and OpenBLAS's thread pools on its share of the cores (both read
# OMP_NUM_THREADS at their import, which comes later): two workers with pools as wide as the machine
# oversubscribe its two cores: on the 2-core CI machine, fresh clones, the suite took 877-887 s with two
# threads a worker and 637-749 s with one (ONNX Runtime's pools at one thread as well gained nothing more).
# Set in the workers only: the controlling process loads this file first, and the workers inherit its
# environment.
if "PYTEST_XDIST_WORKER" in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))

from checkpoints import MULTIMODAL_CLASSES  # noqa: E402  (after the interpreter switch)


@pytest.fixture(scope="module")
def verify_every_pass():
    """Every PassManager run in a module that opts in checks each graph with onnx.checker (full_check) after
    each pass. Not autouse: a module opts in with `pytestmark = pytest.mark.usefixtures("verify_every_pass")`
    (usefixtures names are set up before a test's own arguments, so at module scope this still comes before
    the module-scoped fixtures that run pipelines)."""
    # Imported here, not at the top: conftest is loaded for every test module, and only the modules that opt
    # in should pull in the pass package.
    from qwen_export.passes.verify import VERIFY_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(VERIFY_ENV, "1")
        yield


@pytest.fixture(scope="module")
def tiny_moe_export(tmp_path_factory):
    """An export of the tiny MoE preset, per module (diff, profile and runtime tests read it)."""
    from qwen_export.exporter.export import export_model

    return export_model(tmp_path_factory.mktemp("a") / "tiny", preset="tiny-qwen3.5-moe").out_dir


@pytest.fixture(scope="session")
def plugin_library():
    """The plugin library built with CMake for every SM, and the recording CUDA driver
    (tests/plugin_library.py); skipped, with the reason, where cmake or the CUDA toolkit's headers are
    missing."""
    from plugin_library import build_library, why_not_buildable

    reason = why_not_buildable()
    if reason:
        pytest.skip(f"{reason}: the plugin library is built where they are (CI has both)")
    return build_library()


@pytest.fixture(scope="session")
def plugin_replay(plugin_library):
    """The plugin library driven by the recording driver: its launches replay under Triton's interpreter."""
    from qwen_export.plugins.launch_replay import launch_replay

    return launch_replay(plugin_library.library, plugin_library.driver)


@pytest.fixture(scope="session")
def gpu_check():
    """scripts/gpu_check.py as a module: the launch parameter mirrors and the PyTorch references."""
    from plugin_library import load_gpu_check

    return load_gpu_check("gpu_check_fixture")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread while the interpreter replays launches (on 2 cores torch's pool and numpy contend).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def interpreted_kernels(one_torch_thread):
    """What a module of interpreter kernel tests needs: bf16 dots upcast (the interpreter multiplies raw
    bf16 bits; triton_support.upcast_bf16_dots) and one torch thread. A module opts in with
    `pytestmark = [..., pytest.mark.usefixtures("interpreted_kernels")]`."""
    from qwen_export.plugins.triton_support import upcast_bf16_dots

    upcast_bf16_dots()


@pytest.fixture(scope="session")
def multimodal_images(tmp_path_factory):
    """Seeded random PNGs: two 48x32 images (a, b) and two 40x40 video frames (f0, f1); name -> path."""
    from multimodal_support import write_images

    sizes = {"a": (32, 48), "b": (32, 48), "f0": (40, 40), "f1": (40, 40)}
    return write_images(tmp_path_factory.mktemp("images"), sizes)


@pytest.fixture(scope="session", params=MULTIMODAL_CLASSES)
def multimodal_export(request, tmp_path_factory):
    """A local multimodal checkpoint of each class (with processor files) and its multimodal export:
    (checkpoint folder, ExportResult)."""
    from multimodal_support import make_multimodal_checkpoint

    from qwen_export.exporter.export import export_model

    root = tmp_path_factory.mktemp(request.param)
    folder = make_multimodal_checkpoint(request.param, root / "ckpt")
    return folder, export_model(root / "out", model_dir=folder, multimodal=True)
