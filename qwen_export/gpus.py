"""GPUs a deployment is planned for: memory, HBM bandwidth and dense tensor-core peaks, by product name.

The compute capability of each GPU is not restated here: it is looked up in the project's one product-name
table (`qwen_export.engines.spec.GPU_NAMES`, the names `build --gpu` takes), so a plan and an engine build
agree on what an "h200" is.

Figures are the vendors' datasheet numbers for one GPU: memory in decimal GB (10^9 bytes; what the driver
reports may differ by a few percent, which the planner's reserve absorbs), bandwidth in decimal TB/s, and
dense (no 2:4 sparsity) tensor-core peaks in TFLOPS with fp32 accumulation; None where the GPU has no
tensor cores for that type. Sources:

- H200 SXM: NVIDIA H200 Tensor Core GPU datasheet (141 GB HBM3e, 4.8 TB/s; BF16 1,979 / FP8 3,958 TFLOPS
  with sparsity, halved here).
- H100 SXM5 80 GB: NVIDIA H100 datasheet (80 GB HBM3, 3.35 TB/s; same tensor peaks as H200).
- A100 SXM4 80 GB / 40 GB: NVIDIA A100 datasheet (2,039 / 1,555 GB/s; BF16 312 TFLOPS dense; no FP8).
- L40S: NVIDIA L40S datasheet (48 GB GDDR6, 864 GB/s; BF16 362.05 / FP8 733 TFLOPS dense).
- RTX 4090: NVIDIA Ada Lovelace architecture whitepaper (24 GB GDDR6X, 1,008 GB/s; BF16 165.2 and FP8
  330.3 TFLOPS dense with fp32 accumulation).
- RTX 5090: NVIDIA RTX Blackwell GPU architecture whitepaper (32 GB GDDR7, 1,792 GB/s; FP16 838 / FP8 1,676 /
  FP4 3,352 TFLOPS with sparsity and fp16 accumulation). Halved for density and, for BF16 and FP8, halved
  again for fp32 accumulation as on GeForce Ada; approximate.
- B200 (HGX B200, 1,000 W): NVIDIA DGX/HGX B200 specifications (1,440 GB and 64 TB/s per 8 GPUs; BF16 2,250 /
  FP8 4,500 / FP4 9,000 TFLOPS dense).
- GB200 (one Blackwell GPU of GB200 NVL72, 1,200 W): NVIDIA GB200 NVL72 specifications (13.4 TB HBM3e per 72
  GPUs, 8 TB/s; BF16 2,500 / FP8 5,000 / FP4 10,000 TFLOPS dense).

B300/GB300 are left out: their compute capability (sm103) is not in the project's SM table yet.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from qwen_export.engines.spec import GPU_NAMES
from qwen_export.errors import QwenExportError

GB = 10**9
TB = 10**12


class GpuError(QwenExportError):
    """An unknown GPU name or a malformed `--gpus` value."""


@dataclass(frozen=True)
class Gpu:
    name: str  # the key users type: "h200"
    description: str
    memory_bytes: int
    bandwidth_bytes_per_s: float
    bf16_tflops: float
    fp8_tflops: float | None
    fp4_tflops: float | None
    product: str  # the key of engines.spec.GPU_NAMES this GPU builds as

    @property
    def sm(self) -> str:
        return GPU_NAMES[self.product]

    def to_json(self) -> dict:
        return {**asdict(self), "sm": self.sm}


GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("h200", "NVIDIA H200 SXM 141 GB", 141 * GB, 4.8 * TB, 989.5, 1979.0, None, "h200"),
        Gpu("h100", "NVIDIA H100 SXM5 80 GB", 80 * GB, 3.35 * TB, 989.5, 1979.0, None, "h100"),
        Gpu("a100-80gb", "NVIDIA A100 SXM4 80 GB", 80 * GB, 2.039 * TB, 312.0, None, None, "a100"),
        Gpu("a100-40gb", "NVIDIA A100 SXM4 40 GB", 40 * GB, 1.555 * TB, 312.0, None, None, "a100"),
        Gpu("l40s", "NVIDIA L40S 48 GB", 48 * GB, 0.864 * TB, 362.05, 733.0, None, "l40s"),
        Gpu("rtx-4090", "NVIDIA GeForce RTX 4090 24 GB", 24 * GB, 1.008 * TB, 165.2, 330.3, None, "rtx4090"),
        Gpu("rtx-5090", "NVIDIA GeForce RTX 5090 32 GB", 32 * GB, 1.792 * TB, 209.5, 419, 1676, "rtx5090"),
        Gpu("b200", "NVIDIA B200 (HGX B200) 180 GB", 180 * GB, 8.0 * TB, 2250.0, 4500.0, 9000.0, "b200"),
        Gpu("gb200", "NVIDIA GB200 (NVL72), one GPU, 186 GB", 186 * GB, 8.0 * TB, 2500, 5000, 10000, "gb200"),
    )
}


def _key(name: str) -> str:
    """The spelling-insensitive key: 'RTX 4090', 'rtx_4090', 'NVIDIA RTX-4090' -> 'rtx4090'."""
    return re.sub(r"[\s_\-]", "", name.strip().lower()).removeprefix("nvidia")


_BY_KEY = {_key(name): gpu for name, gpu in GPUS.items()}


def get_gpu(name: str) -> Gpu:
    key = _key(name)
    if key in _BY_KEY:
        return _BY_KEY[key]
    if key == "a100":
        raise GpuError("GPU 'a100' comes in two sizes: use a100-80gb or a100-40gb")
    raise GpuError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")


def parse_gpus(text: str) -> tuple[int, Gpu]:
    """'8xh200' -> (8, H200). A malformed value or an unknown name raises GpuError."""
    match = re.fullmatch(r"\s*(\d+)\s*[x×*]\s*([A-Za-z][\w\- ]*?)\s*", text or "")
    if not match:
        raise GpuError(f"--gpus {text!r}: expected <count>x<name>, for example 8xh200")
    count = int(match.group(1))
    if count < 1:
        raise GpuError(f"--gpus {text!r}: the GPU count must be at least 1")
    return count, get_gpu(match.group(2))
