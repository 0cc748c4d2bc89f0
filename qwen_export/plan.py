"""Deployment planning: what a Qwen3.5-family model needs per GPU under a tensor/expert-parallel split, with
the arithmetic shown.

Every per-rank figure comes from `qwen_export.layout` (the same rules that shard the graph); this module
only applies bytes per element and the estimates below.

Precisions (weights; activations are bf16 in every case):

- bf16: 2 bytes per weight.
- fp8: Qwen's official FP8 release (`qwen_export.exporter.fp8`): every weight for which
  `fp8.is_quantized_weight` holds is e4m3 (1 byte) plus one fp32 scale per 128x128 block (ragged edge blocks
  count whole), computed per stored matrix (experts one per expert, gate and up separately); everything else
  (embedding, lm_head, norms, router, shared_expert_gate, DeltaNet in_proj_a/b/ba, conv1d, A_log, dt_bias)
  bf16. A shard's scales are counted on its own shape.
- int4: the project's ort-int4 format (passes/quantize_weights.py): every linear weight (attention,
  DeltaNet projections including in_proj_a/b, experts, shared expert, router, shared_expert_gate, lm_head)
  as 4-bit codes in blocks of 32 along the input dimension (the last block zero-padded) plus one fp16
  scale per block; the embedding table (a Gather), norms, conv1d, A_log and dt_bias stay bf16.
- nvfp4: the same coverage as int4; 4-bit codes in blocks of 16 along the input, one e4m3 scale per block,
  and one fp32 scale per stored matrix.

States: the KV cache of the full-attention layers in `kv_cache` (bf16 by default; fp8 is 1 byte per element,
its per-tensor scales not counted); the DeltaNet conv state in bf16 (the exported graph's dtype,
docs/precision.md) and the recurrent state in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from qwen_export.engines.spec import FP8_MIN_SM
from qwen_export.errors import QwenExportError
from qwen_export.exporter import fp8
from qwen_export.exporter.spec import ModelSpec
from qwen_export.gpus import GPUS, Gpu
from qwen_export.layout import Layout, LayoutError, WeightTensor, make_layout, valid_tp

PRECISIONS = ("bf16", "fp8", "int4", "nvfp4")
KV_CACHE_DTYPES: dict[str, int] = {"bf16": 2, "fp8": 1}
BF16 = 2
ACTIVATION_BYTES = 2  # bf16 activations
RESIDUAL_BYTES = 4  # engines keep the residual stream in fp32 (docs/precision.md)
CONV_STATE_BYTES = 2  # bf16
RECURRENT_STATE_BYTES = 4  # fp32
FP8_SCALE_BYTES = 4  # fp32 per 128x128 block
INT4_BLOCK, INT4_SCALE_BYTES = 32, 2  # fp16 scale per 32 weights along the input
NVFP4_BLOCK, NVFP4_SCALE_BYTES, NVFP4_TENSOR_SCALE_BYTES = 16, 1, 4  # e4m3 per 16, fp32 per matrix
RESERVE_FRACTION = 0.10  # of each GPU's memory: CUDA context, NCCL buffers, allocator fragmentation
DEFAULT_CONTEXT = 262_144
DEFAULT_PROMPT = 2048  # the deployment spec's default max_prompt (engines/spec.py)
DELTANET_CHUNK = 64  # chunked delta rule: one [64, 64] fp32 matrix per head and chunk
FP4_MIN_SM = 100  # FP4 tensor cores: Blackwell


class PlanError(QwenExportError):
    """The plan request itself is malformed (precision, sizes, GPU count against tp)."""


# --------------------------------------------------------------------------------------------------------
# bytes per weight
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightBytes:
    payload: int
    scales: int
    dtype: str  # "bf16", "fp8", "int4", "nvfp4": what the payload is stored as

    @property
    def total(self) -> int:
        return self.payload + self.scales


def weight_bytes(
    tensor: WeightTensor, shape: tuple[int, ...], precision: str, fp8_block: tuple[int, int] = fp8.BLOCK
) -> WeightBytes:
    """The bytes of `tensor` (or its shard of `shape`) stored in `precision`."""
    plain = WeightBytes(math.prod(shape) * BF16, 0, "bf16")
    matrices = tensor.matrices(shape)
    if precision == "bf16" or not matrices:
        return plain
    payload = scales = 0
    for m in matrices:
        rows, cols, n = m.out_features, m.in_features, m.count
        if precision == "fp8":
            if not fp8.is_quantized_weight(m.name, (rows, cols)):
                return plain
            grid = fp8.scale_grid((rows, cols), fp8_block)
            payload += n * rows * cols
            scales += n * grid[0] * grid[1] * FP8_SCALE_BYTES
        elif precision == "int4":
            blocks = rows * math.ceil(cols / INT4_BLOCK)
            payload += n * blocks * INT4_BLOCK // 2
            scales += n * blocks * INT4_SCALE_BYTES
        elif precision == "nvfp4":
            blocks = rows * math.ceil(cols / NVFP4_BLOCK)
            payload += n * blocks * NVFP4_BLOCK // 2
            scales += n * (blocks * NVFP4_SCALE_BYTES + NVFP4_TENSOR_SCALE_BYTES)
        else:
            raise PlanError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return WeightBytes(payload, scales, precision)


# --------------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the plan: a quantity per GPU and over all GPUs, with the arithmetic behind it."""

    key: str
    label: str
    per_gpu: float | None
    total: float | None
    unit: str  # bytes | seconds | tokens/s | ratio | count | tokens | flops
    arithmetic: str

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "per_gpu": self.per_gpu, "total": self.total, "unit": self.unit,
                "arithmetic": self.arithmetic}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    source: str
    spec: ModelSpec = field(repr=False)
    gpu: Gpu
    gpu_count: int
    tp: int
    ep: int
    precision: str
    kv_cache: str
    context: int
    batch: int
    prompt: int
    reserve: float
    weights_per_gpu: int
    weights_all_gpus: int
    weights_one_copy: int
    weights_by_component: dict[str, int]
    kv_per_token_per_gpu: int
    kv_per_token_model: int
    deltanet_per_sequence_per_gpu: int
    deltanet_per_sequence_model: int
    state_per_sequence_per_gpu: int
    state_per_sequence_model: int
    activations_per_gpu: int
    usable_per_gpu: int
    needed_per_gpu: int
    fits: bool
    max_batch: int
    max_context: int
    decode_bytes_per_gpu: int
    decode_seconds: float
    prefill_flops_per_gpu: float
    prefill_seconds: float
    state_ratio: float
    rows: tuple[Row, ...] = field(default=(), repr=False)
    suggestions: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def replicas(self) -> int:
        return self.gpu_count // self.tp

    @property
    def decode_tokens_per_s(self) -> float:
        return self.replicas * self.batch / self.decode_seconds

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "architecture": self.spec.architecture,
            "gpus": {"count": self.gpu_count, **self.gpu.to_json()},
            "tp": self.tp,
            "ep": self.ep,
            "replicas": self.replicas,
            "precision": self.precision,
            "kv_cache": self.kv_cache,
            "context": self.context,
            "batch": self.batch,
            "prompt": self.prompt,
            "reserve_fraction": self.reserve,
            "weights": {
                "per_gpu": self.weights_per_gpu,
                "all_gpus": self.weights_all_gpus,
                "one_copy": self.weights_one_copy,
                "per_gpu_by_component": self.weights_by_component,
            },
            "kv_cache_per_token": {"per_gpu": self.kv_per_token_per_gpu, "model": self.kv_per_token_model},
            "deltanet_state_per_sequence": {
                "per_gpu": self.deltanet_per_sequence_per_gpu,
                "model": self.deltanet_per_sequence_model,
            },
            "state_per_sequence": {
                "per_gpu": self.state_per_sequence_per_gpu,
                "model": self.state_per_sequence_model,
            },
            "activations_per_gpu": self.activations_per_gpu,
            "usable_per_gpu": self.usable_per_gpu,
            "needed_per_gpu": self.needed_per_gpu,
            "fits": self.fits,
            "max_batch": self.max_batch,
            "max_context": self.max_context,
            "decode": {
                "bytes_per_step_per_gpu": self.decode_bytes_per_gpu,
                "seconds_per_step": self.decode_seconds,
                "tokens_per_s": self.decode_tokens_per_s,
            },
            "prefill": {"flops_per_gpu": self.prefill_flops_per_gpu, "seconds": self.prefill_seconds},
            "state_ratio_vs_full_attention": self.state_ratio,
            "rows": {r.key: r.to_json() for r in self.rows},
            "suggestions": list(self.suggestions),
            "notes": list(self.notes),
        }

    def render(self, console) -> None:
        from rich.markup import escape
        from rich.table import Table

        split = f"tp {self.tp}" + (f", ep {self.ep}" if self.ep > 1 else "")
        if self.replicas > 1:
            split += f", {self.replicas} replicas"
        title = (
            f"{self.source} on {self.gpu_count}x{self.gpu.name} ({split}), {self.precision} weights, "
            f"{self.kv_cache} KV, context {self.context:,}, batch {self.batch}, prompt {self.prompt:,}"
        )
        table = Table("", "per GPU", "all GPUs", "arithmetic", title=title, show_lines=True)
        for r in self.rows:
            table.add_row(
                escape(r.label), _show(r.per_gpu, r.unit), _show(r.total, r.unit), escape(r.arithmetic)
            )
        console.print(table)
        verdict = "[green]fits[/green]" if self.fits else "[bold red]does not fit[/bold red]"
        console.print(
            f"{verdict}: {_gb(self.needed_per_gpu)} needed per GPU of {_gb(self.usable_per_gpu)} usable "
            f"({self.gpu.memory_bytes / 1e9:g} GB less {self.reserve:.0%} reserve)",
            highlight=False,
        )
        for s in self.suggestions:
            console.print(f"  would fit: {escape(s)}", highlight=False)
        for n in self.notes:
            console.print(f"[dim]note: {escape(n)}[/dim]", highlight=False)


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def _show(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "bytes":
        return _gb(value) if value >= 1e7 else f"{value:,.0f} B"
    if unit == "seconds":
        return f"{value * 1e3:,.2f} ms"
    if unit == "tokens/s":
        return f"{value:,.0f} tok/s"
    if unit == "ratio":
        return f"{value:.3f}"
    if unit == "flops":
        return f"{value / 1e12:,.1f} TFLOP"
    return f"{value:,.0f}"


def _dims(shape: Iterable[int]) -> str:
    return "x".join(str(d) for d in shape)


# --------------------------------------------------------------------------------------------------------
# what each part costs per rank
# --------------------------------------------------------------------------------------------------------

COMPONENTS = (
    ("attention", "full attention"),
    ("deltanet", "Gated DeltaNet"),
    ("experts", "routed experts"),
    ("shared_expert", "shared expert"),
    ("mlp", "dense MLP"),
    ("router", "router + shared_expert_gate"),
    ("norm", "norms"),
    ("embedding", "embed_tokens"),
    ("lm_head", "lm_head"),
)


def _component_bytes(
    layout: Layout, component: str, precision: str, block: tuple[int, int], shard: bool = True
) -> tuple[int, str]:
    """(bytes, arithmetic) of one component on rank 0 (shard) or unsharded: the tensors of its first
    layer times the number of layers, plus its global tensors."""
    tensors = [t for t in layout.weights if t.component == component]
    if not tensors:
        return 0, ""

    def shape(t: WeightTensor) -> tuple[int, ...]:
        return t.shard_shape(0) if shard else t.shape

    def size(t: WeightTensor) -> WeightBytes:
        return weight_bytes(t, shape(t), precision, block)

    total = sum(size(t).total for t in tensors)
    layers = sorted({t.layer for t in tensors if t.layer is not None})
    first = [t for t in tensors if layers and t.layer == layers[0]]
    rest = [t for t in tensors if t.layer is None]
    layered = total - sum(size(t).total for t in rest)
    if layers and sum(size(t).total for t in first) * len(layers) != layered:  # layers differ
        return total, f"{len(tensors)} tensors = {total:,} B"

    def terms(group: list[WeightTensor]) -> str:
        by_dtype: dict[str, list[str]] = {}
        scales = 0
        for t in group:
            b = size(t)
            note = ""
            if shard and t.rule == "kv" and t.copies(layout.tp) > 1:
                heads = layout.spec.num_key_value_heads
                note = f" (1 of {heads} kv heads, on {t.copies(layout.tp)} GPUs)"
            elif shard and t.rule == "replicated" and layout.tp > 1:
                note = " (replicated)"
            name = t.short.removesuffix(".weight")
            by_dtype.setdefault(b.dtype, []).append(f"{name} {_dims(shape(t))}{note}")
            scales += b.scales
        text = " + ".join(f"({' + '.join(v)}) x {BYTES_LABEL[dtype]}" for dtype, v in by_dtype.items())
        return text + (f" + scales {scales:,} B" if scales else "")

    parts = []
    if layers:
        parts.append(f"{len(layers)} layers x [{terms(first)}]")
    if rest:
        parts.append(terms(rest))
    return total, " + ".join(parts) + f" = {total:,} B"


BYTES_LABEL = {"bf16": "2 B", "fp8": "1 B", "int4": "0.5 B", "nvfp4": "0.5 B"}


@dataclass(frozen=True)
class _Costs:
    """Everything per rank that does not depend on batch or context, plus the per-token/sequence units."""

    weights: int
    weights_one_copy: int
    by_component: dict[str, int]
    component_text: dict[str, str]
    kv_per_token: int
    kv_per_token_model: int
    deltanet_per_seq: int
    deltanet_per_seq_model: int
    expert_bytes: int  # routed experts on this rank
    embedding_row: int  # one embedding row on this rank


def _costs(layout: Layout, precision: str, kv_bytes: int, block: tuple[int, int]) -> _Costs:
    by_component, text = {}, {}
    one_copy = 0
    for component, _ in COMPONENTS:
        nbytes, arithmetic = _component_bytes(layout, component, precision, block)
        if nbytes:
            by_component[component], text[component] = nbytes, arithmetic
        one_copy += _component_bytes(layout, component, precision, block, shard=False)[0]
    kv = sum(math.prod(s.shard_shape(0)) for s in layout.states if s.per_token) * kv_bytes
    kv_model = sum(math.prod(s.shape) for s in layout.states if s.per_token) * kv_bytes

    def deltanet(shard: bool) -> int:
        out = 0
        for s in layout.states:
            shape = s.shard_shape(0) if shard else s.shape
            if s.kind == "conv":
                out += math.prod(shape) * CONV_STATE_BYTES
            elif s.kind == "recurrent":
                out += math.prod(shape) * RECURRENT_STATE_BYTES
        return out

    embed = next(t for t in layout.weights if t.component == "embedding")
    row = weight_bytes(embed, embed.shard_shape(0), precision, block).total // embed.shard_shape(0)[0]
    return _Costs(
        weights=sum(by_component.values()),
        weights_one_copy=one_copy,
        by_component=by_component,
        component_text=text,
        kv_per_token=kv,
        kv_per_token_model=kv_model,
        deltanet_per_seq=deltanet(True),
        deltanet_per_seq_model=deltanet(False),
        expert_bytes=by_component.get("experts", 0),
        embedding_row=row,
    )


def activation_bytes(layout: Layout, batch: int, prompt: int) -> tuple[int, str]:
    """Estimated peak activations and workspace on one rank during a prefill step of `batch` sequences of
    `prompt` tokens (N = batch x prompt), and the formula:

        N*H*(4 + 2)                       fp32 residual stream + bf16 normed input
      + N*H*2                             the all-reduce buffer (tp > 1)
      + max(mixer, feed-forward)          the larger of a layer's two halves (they are not live together)
      + B*V/tp*4 + B*V*4                  fp32 logits of each sequence's last token: the vocab shard and its
                                          all-gather
    mixer: attention  N*(2*Hq/tp*D + 2*Hkv_r*D)*2 [q|gate, k, v] + N*Hq/tp*D*2 [output]; fused (flash)
                      attention, so no N x N scores;
           DeltaNet   N*conv/tp*2*2 [projection, conv output] + N*Vd/tp*2*2 [z, core output]
                      + N*Vh/tp*4*2 [g, beta fp32] + N*Vh/tp*64*4 [chunk-local 64x64 fp32 matrices];
    feed-forward: MoE N*E*4 [router logits fp32] + N*k*8 [top-k ids, weights]
                      + n*(H + 2*I/mtp + I/mtp + H)*2 with n = N*k/ep token copies per rank (balanced
                      routing) [dispatched inputs, gate|up, SwiGLU, expert outputs]
                      + N*(2*Is/tp + Is/tp)*2 [shared expert];
                  dense N*(2*I/tp + I/tp)*2.
    cuBLAS/NCCL workspaces and allocator slack are left to the reserve."""
    spec, tp = layout.spec, layout.tp
    n, h, a = batch * prompt, spec.hidden_size, ACTIVATION_BYTES
    base = n * h * (RESIDUAL_BYTES + a) + (n * h * a if tp > 1 else 0)
    mixer = ffn = 0
    parts = []
    if spec.attention_layers():
        hq, hkv, d = spec.num_attention_heads // tp, layout.kv_heads_per_rank(), spec.head_dim
        attn = n * (2 * hq * d + 2 * hkv * d) * a + n * hq * d * a
        mixer = max(mixer, attn)
        parts.append(f"attention {n}*({2 * hq * d}+{2 * hkv * d}+{hq * d})*2 = {attn:,}")
    if spec.linear_layers():
        conv, vd, vh = spec.conv_dim // tp, spec.value_dim // tp, spec.linear_num_value_heads // tp
        dn = n * conv * a * 2 + n * vd * a * 2 + n * vh * 4 * 2 + n * vh * DELTANET_CHUNK * 4
        mixer = max(mixer, dn)
        parts.append(f"DeltaNet {n}*({conv}*4+{vd}*4+{vh}*8+{vh}*{DELTANET_CHUNK}*4) = {dn:,}")
    if "moe" in spec.mlp_types:
        e, k, inter = spec.num_experts, spec.num_experts_per_tok, spec.moe_intermediate_size
        mtp = layout.moe_tp
        copies = -(-n * k // layout.ep)
        shared = spec.shared_expert_intermediate_size // tp
        moe = n * e * 4 + n * k * 8 + copies * (h + 3 * inter // mtp + h) * a + n * 3 * shared * a
        ffn = max(ffn, moe)
        routed = f"{copies}*({h}+{3 * inter // mtp}+{h})*2"
        parts.append(f"MoE {n}*{e}*4 + {n}*{k}*8 + {routed} + {n}*{3 * shared}*2 = {moe:,}")
    if "dense" in spec.mlp_types:
        dense = n * 3 * (spec.intermediate_size // tp) * a
        ffn = max(ffn, dense)
        parts.append(f"MLP {n}*{3 * (spec.intermediate_size // tp)}*2 = {dense:,}")
    v = spec.vocab_size
    logits = batch * (v // tp) * 4 + batch * v * 4
    total = base + max(mixer, ffn) + logits
    text = (
        f"N = {batch}x{prompt} tokens: residual+norm+all-reduce {base:,} + max({'; '.join(parts)}) "
        f"+ logits {batch}*({v // tp}+{v})*4 = {logits:,}; total {total:,} B"
    )
    return total, text


def _decode(layout: Layout, costs: _Costs, batch: int, context: int, bandwidth: float) -> tuple[int, str]:
    """Bytes one rank reads per decode step at `batch` sequences of `context` tokens."""
    spec = layout.spec
    dense_weights = costs.weights - costs.expert_bytes - costs.by_component.get("embedding", 0)
    touched = 0.0
    if spec.num_experts:
        k, e = spec.num_experts_per_tok, spec.num_experts
        touched = 1 - (1 - k / e) ** batch  # expected share of a layer's experts that some token picks
    experts = round(costs.expert_bytes * touched)
    embed_rows = min(batch, spec.vocab_size // layout.tp) * costs.embedding_row
    kv = batch * context * costs.kv_per_token
    states = 2 * batch * costs.deltanet_per_seq  # read and written
    total = dense_weights + experts + embed_rows + kv + states
    text = f"weights except experts/embedding {dense_weights:,}"
    if spec.num_experts:
        hit = f"1-(1-{k}/{e})^{batch}: the expected share of experts some token picks"
        text += f" + experts {costs.expert_bytes:,} x {touched:.4g} [{hit}]"
    text += (
        f" + embedding rows {embed_rows:,} + KV {batch}x{context:,}x{costs.kv_per_token:,}"
        f" + DeltaNet states read+written 2x{batch}x{costs.deltanet_per_seq:,} = {total:,} B"
        f" / {bandwidth / 1e12:g} TB/s"
    )
    return total, text


def _prefill_flops(layout: Layout, batch: int, prompt: int) -> tuple[float, str]:
    """Matmul FLOPs of one rank for a prefill step: 2 x tokens x active weight elements (experts at k/E of
    the rank's experts, balanced), lm_head for the last token only, and causal attention scores and values
    (2 x 2 x B x P^2/2 x Hq/tp x D per layer). DeltaNet's chunked state math is left out (small)."""
    spec, tp = layout.spec, layout.tp
    n = batch * prompt

    def elements(component: str) -> int:
        tensors = (t for t in layout.weights if t.component == component and t.linear)
        return sum(math.prod(t.shard_shape(0)) for t in tensors)

    dense = sum(elements(c) for c in ("attention", "deltanet", "shared_expert", "mlp", "router"))
    experts = elements("experts")
    share = spec.num_experts_per_tok / spec.num_experts if spec.num_experts else 0.0
    lm_head = (spec.vocab_size // tp) * spec.hidden_size
    attention = 2 * 2 * batch * (prompt * prompt / 2) * (spec.num_attention_heads // tp) * spec.head_dim
    attention *= len(spec.attention_layers())
    flops = 2 * n * (dense + experts * share) + 2 * batch * lm_head + attention
    text = (
        f"2 x {n:,} tokens x ({dense:,} + {experts:,} x {share:.4g} expert) weights"
        f" + 2 x {batch} x {lm_head:,} lm_head + {attention:.4g} attention = {flops:.4g} FLOP"
    )
    return flops, text


def _peak_tflops(gpu: Gpu, precision: str) -> tuple[float, str]:
    sm = int(gpu.sm.removeprefix("sm"))
    if precision == "fp8" and gpu.fp8_tflops and sm >= FP8_MIN_SM:
        return gpu.fp8_tflops, "fp8"
    if precision == "nvfp4" and gpu.fp4_tflops and sm >= FP4_MIN_SM:
        return gpu.fp4_tflops, "fp4"
    return gpu.bf16_tflops, "bf16"


# --------------------------------------------------------------------------------------------------------
# make_plan
# --------------------------------------------------------------------------------------------------------


def make_plan(
    spec: ModelSpec,
    gpus: tuple[int, Gpu],
    precision: str = "bf16",
    tp: int | None = None,
    ep: int = 1,
    context: int = DEFAULT_CONTEXT,
    batch: int = 1,
    prompt: int | None = None,
    kv_cache: str = "bf16",
    reserve: float = RESERVE_FRACTION,
    fp8_block: tuple[int, int] = fp8.BLOCK,
    source: str = "model",
    suggest: bool = True,
) -> Plan:
    """Plan `spec` on `gpus` = (count, Gpu). tp defaults to the GPU count (count/tp data-parallel replicas
    otherwise); prompt to min(2048, context). Raises LayoutError/PlanError for requests that cannot be
    planned at all; a plan that does not fit is returned with fits False and `suggestions`."""
    count, gpu = gpus
    tp = count if tp is None else tp
    prompt = min(DEFAULT_PROMPT, context) if prompt is None else prompt
    _check_request(count, tp, precision, kv_cache, context, batch, prompt, reserve)
    try:
        layout = make_layout(spec, tp, ep)
    except LayoutError as e:
        copies = [t for t in valid_tp(spec, ep, upto=count) if count % t == 0]
        if not copies:
            raise
        choices = ", ".join(f"--tp {t} ({count // t} cop{'y' if t == count else 'ies'})" for t in copies)
        raise LayoutError(f"{e}; on {count} GPUs: {choices}") from None
    kv_bytes = KV_CACHE_DTYPES[kv_cache]
    costs = _costs(layout, precision, kv_bytes, fp8_block)
    usable = int(gpu.memory_bytes * (1 - reserve))

    def needed(b: int, ctx: int) -> int:
        return (
            costs.weights
            + b * (ctx * costs.kv_per_token + costs.deltanet_per_seq)
            + activation_bytes(layout, b, min(prompt, ctx))[0]
        )

    act, act_text = activation_bytes(layout, batch, prompt)
    state_seq = context * costs.kv_per_token + costs.deltanet_per_seq
    state_seq_model = context * costs.kv_per_token_model + costs.deltanet_per_seq_model
    need = costs.weights + batch * state_seq + act
    fits = need <= usable
    max_batch = _largest(lambda b: needed(b, context) <= usable)
    room = usable - costs.weights - act - batch * costs.deltanet_per_seq
    max_context = max(0, room // (batch * costs.kv_per_token)) if costs.kv_per_token else 0
    decode_bytes, decode_text = _decode(layout, costs, batch, context, gpu.bandwidth_bytes_per_s)
    decode_s = decode_bytes / gpu.bandwidth_bytes_per_s
    flops, flops_text = _prefill_flops(layout, batch, prompt)
    peak, peak_kind = _peak_tflops(gpu, precision)
    prefill_s = flops / (peak * 1e12)
    full_kv_token = spec.num_layers * 2 * spec.num_key_value_heads * spec.head_dim * kv_bytes
    ratio = state_seq_model / (context * full_kv_token)

    plan = Plan(
        source=source, spec=spec, gpu=gpu, gpu_count=count, tp=tp, ep=ep, precision=precision,
        kv_cache=kv_cache, context=context, batch=batch, prompt=prompt, reserve=reserve,
        weights_per_gpu=costs.weights, weights_all_gpus=costs.weights * count,
        weights_one_copy=costs.weights_one_copy, weights_by_component=costs.by_component,
        kv_per_token_per_gpu=costs.kv_per_token, kv_per_token_model=costs.kv_per_token_model,
        deltanet_per_sequence_per_gpu=costs.deltanet_per_seq,
        deltanet_per_sequence_model=costs.deltanet_per_seq_model,
        state_per_sequence_per_gpu=state_seq, state_per_sequence_model=state_seq_model,
        activations_per_gpu=act, usable_per_gpu=usable, needed_per_gpu=need, fits=fits,
        max_batch=max_batch, max_context=max_context, decode_bytes_per_gpu=decode_bytes,
        decode_seconds=decode_s, prefill_flops_per_gpu=flops, prefill_seconds=prefill_s,
        state_ratio=ratio, notes=tuple(_notes(spec, gpu, precision, kv_cache)),
    )  # fmt: skip
    prefill_text = f"{flops_text} / {peak:g} TFLOPS dense"
    texts = {"activations": act_text, "decode": decode_text, "prefill": prefill_text}
    plan = replace(plan, rows=tuple(_rows(plan, layout, costs, texts, peak_kind, full_kv_token)))
    if suggest and not fits:
        plan = replace(plan, suggestions=tuple(_suggestions(plan, fp8_block)))
    return plan


def _check_request(count, tp, precision, kv_cache, context, batch, prompt, reserve) -> None:
    if precision not in PRECISIONS:
        raise PlanError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if kv_cache not in KV_CACHE_DTYPES:
        raise PlanError(f"unknown kv-cache dtype {kv_cache!r}; use one of {', '.join(KV_CACHE_DTYPES)}")
    for name, value in (("context", context), ("batch", batch), ("prompt", prompt), ("tp", tp)):
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    if prompt > context:
        raise PlanError(f"prompt {prompt} is above context {context}: a prompt must fit in the context")
    if tp > count or count % tp:
        raise PlanError(
            f"tp {tp} does not divide the GPU count {count} (each model copy spans tp GPUs); "
            f"use --gpus {tp}x<gpu> or a tp that divides {count}"
        )
    if not 0 <= reserve < 1:
        raise PlanError(f"reserve must be a fraction in [0, 1), got {reserve!r}")


def _largest(ok: Callable[[int], bool], limit: int = 1 << 40) -> int:
    """The largest n >= 1 with ok(n) (ok monotone decreasing), 0 if ok(1) fails."""
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi < limit and ok(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _rows(
    plan: Plan, layout: Layout, costs: _Costs, texts: dict[str, str], peak_kind: str, full_kv_token: int
) -> list[Row]:
    spec, tp, count, gpu = layout.spec, layout.tp, plan.gpu_count, plan.gpu
    copies = count // tp
    rows: list[Row] = []

    def add(key: str, label: str, per_gpu: float, unit: str, text: str, total: float | None = None) -> None:
        rows.append(Row(key, label, per_gpu, per_gpu * count if total is None and unit == "bytes" else total,
                        unit, text))  # fmt: skip

    for component, label in COMPONENTS:
        if component in costs.by_component:
            text = costs.component_text[component]
            add(f"weights.{component}", f"weights: {label}", costs.by_component[component], "bytes", text)
    replicated = costs.weights * tp - costs.weights_one_copy
    add("weights", "weights", costs.weights, "bytes",
        f"sum of the above; one unsharded copy is {costs.weights_one_copy:,} B: the split adds "
        f"{replicated:,} B of replicas over the {tp} GPUs of a copy")  # fmt: skip
    kv_bytes = KV_CACHE_DTYPES[plan.kv_cache]
    attn, kv_r, d = len(spec.attention_layers()), layout.kv_heads_per_rank(), spec.head_dim
    add("kv_per_token", f"KV cache per token ({plan.kv_cache})", costs.kv_per_token, "bytes",
        f"{attn} full-attention layers x 2 (K,V) x {kv_r} kv head{'s' * (kv_r > 1)} x {d} x {kv_bytes} B "
        f"= {costs.kv_per_token:,} B per GPU (model: {attn} x 2 x {spec.num_key_value_heads} x {d} x "
        f"{kv_bytes} = {costs.kv_per_token_model:,} B)")  # fmt: skip
    k1, dk, dv = spec.linear_conv_kernel_dim - 1, spec.linear_key_head_dim, spec.linear_value_head_dim
    conv, vh = f"[{spec.conv_dim // tp}, {k1}]", f"[{spec.linear_num_value_heads // tp}, {dk}, {dv}]"
    add("deltanet_per_sequence", "DeltaNet state per sequence", costs.deltanet_per_seq, "bytes",
        f"{len(spec.linear_layers())} DeltaNet layers x (conv {conv} x {CONV_STATE_BYTES} B bf16 + recurrent "
        f"{vh} x {RECURRENT_STATE_BYTES} B fp32) = {costs.deltanet_per_seq:,} B per GPU (model: conv "
        f"[{spec.conv_dim}, {k1}], recurrent [{spec.linear_num_value_heads}, {dk}, {dv}]: "
        f"{costs.deltanet_per_seq_model:,} B)")  # fmt: skip
    seq = plan.state_per_sequence_per_gpu
    add("state_per_sequence", f"state per sequence at {plan.context:,}", seq, "bytes",
        f"{plan.context:,} x {costs.kv_per_token:,} + {costs.deltanet_per_seq:,} = {seq:,} B per GPU "
        f"(model: {plan.state_per_sequence_model:,} B)")  # fmt: skip
    add("state", f"state at batch {plan.batch}", plan.batch * seq, "bytes", f"{plan.batch} x {seq:,}")
    add("activations", "activations + workspace (estimate)", plan.activations_per_gpu, "bytes",
        texts["activations"])  # fmt: skip
    add(
        "needed",
        "needed",
        plan.needed_per_gpu,
        "bytes",
        f"weights {costs.weights:,} + state {plan.batch * seq:,} + activations {plan.activations_per_gpu:,}",
    )
    add(
        "usable",
        "usable memory",
        plan.usable_per_gpu,
        "bytes",
        f"{gpu.memory_bytes:,} B x (1 - {plan.reserve:g} reserve: CUDA context, NCCL, fragmentation)",
    )
    on_all = f"{copies} cop{'y' if copies == 1 else 'ies'} on all GPUs"
    add("max_batch", f"largest batch at {plan.context:,}", plan.max_batch, "count",
        "largest B with weights + B x state per sequence + activations(B x prompt) <= usable, per model "
        f"copy; {on_all}", plan.max_batch * copies)  # fmt: skip
    add("decode_bytes", f"decode step reads (batch {plan.batch})", plan.decode_bytes_per_gpu, "bytes",
        texts["decode"])  # fmt: skip
    add("decode_floor", "decode step floor (HBM)", plan.decode_seconds, "seconds",
        f"{plan.decode_bytes_per_gpu:,} B / {gpu.bandwidth_bytes_per_s / 1e12:g} TB/s; at best "
        f"{plan.decode_tokens_per_s:,.0f} tokens/s over all GPUs")  # fmt: skip
    add("prefill_floor", f"prefill compute floor ({peak_kind} peak)", plan.prefill_seconds, "seconds",
        texts["prefill"])  # fmt: skip
    add("state_ratio", "state vs all-full-attention", plan.state_ratio, "ratio",
        f"per sequence at {plan.context:,}: {plan.state_per_sequence_model:,} B / ({spec.num_layers} layers "
        f"x 2 x {spec.num_key_value_heads} x {d} x {kv_bytes} B x {plan.context:,} = "
        f"{full_kv_token * plan.context:,} B): {1 / plan.state_ratio:.2f}x less")  # fmt: skip
    return rows


def _notes(spec: ModelSpec, gpu: Gpu, precision: str, kv_cache: str) -> list[str]:
    sm = int(gpu.sm.removeprefix("sm"))
    notes = [
        "text tower only: the vision tower and the MTP (multi-token prediction) layer are not counted",
        f"KV cache in {kv_cache}; DeltaNet conv state bf16, recurrent state fp32",
    ]
    if spec.num_experts:
        notes.append("expert reads and MoE buffers assume balanced routing (uniform, independent picks)")
    if precision == "fp8" and sm < FP8_MIN_SM:
        notes.append(f"{gpu.name} ({gpu.sm}) has no FP8 tensor cores: FP8 weights are dequantized to bf16")
    if precision == "nvfp4" and sm < FP4_MIN_SM:
        notes.append(f"{gpu.name} ({gpu.sm}) has no FP4 tensor cores: NVFP4 weights are dequantized to bf16")
    return notes


def _emulated(gpu: Gpu, precision: str) -> str:
    sm = int(gpu.sm.removeprefix("sm"))
    if (precision == "fp8" and sm < FP8_MIN_SM) or (precision == "nvfp4" and sm < FP4_MIN_SM):
        return f" (weight-only: {gpu.sm} has no {precision} tensor cores)"
    return ""


BITS_PER_WEIGHT = {"bf16": 16, "fp8": 8, "nvfp4": 4.5, "int4": 4.5}  # for ordering suggestions only


def _suggestions(plan: Plan, fp8_block: tuple[int, int]) -> list[str]:
    """What would fit instead, one change at a time: more GPUs, a smaller precision, an fp8 KV cache, another
    GPU, a shorter context, a smaller batch."""
    spec, gpu = plan.spec, plan.gpu
    kw = dict(
        precision=plan.precision, tp=plan.tp, ep=plan.ep, context=plan.context, batch=plan.batch,
        prompt=plan.prompt, kv_cache=plan.kv_cache, reserve=plan.reserve, fp8_block=fp8_block,
        source=plan.source, suggest=False,
    )  # fmt: skip

    def fits(gpus: tuple[int, Gpu] = (plan.gpu_count, gpu), **changes: Any) -> bool:
        try:
            return make_plan(spec, gpus, **{**kw, **changes}).fits
        except (LayoutError, PlanError):
            return False

    out = []
    for tp in valid_tp(spec, plan.ep, upto=256):
        if tp > plan.tp and fits((tp, gpu), tp=tp):
            out.append(f"--gpus {tp}x{gpu.name} --tp {tp}" + (f" --ep {plan.ep}" if plan.ep > 1 else ""))
            break
    total = plan.batch * plan.replicas
    if 1 <= plan.max_batch < plan.batch:  # data-parallel copies share the sequences out
        copies = -(-total // plan.max_batch)
        each = -(-total // copies)
        if fits((copies * plan.tp, gpu), batch=each):
            split = f"--gpus {copies * plan.tp}x{gpu.name} --tp {plan.tp} --batch {each}"
            out.append(f"{split} ({copies} copies serve the {total} sequences)")
    smaller = [p for p in PRECISIONS if BITS_PER_WEIGHT[p] < BITS_PER_WEIGHT[plan.precision]]
    fitting = [p for p in smaller if fits(precision=p)]
    if fitting:
        best = max(BITS_PER_WEIGHT[p] for p in fitting)
        options = [p + _emulated(gpu, p) for p in fitting if BITS_PER_WEIGHT[p] == best]
        out.append(f"--precision {' or '.join(options)} on {plan.gpu_count}x{gpu.name}")
    if plan.kv_cache != "fp8" and fits(kv_cache="fp8"):
        out.append("--kv-cache fp8")
    others = [g.name for g in GPUS.values() if g.name != gpu.name and fits((plan.gpu_count, g))]
    if others:
        out.append(f"--gpus {plan.gpu_count}x<{'|'.join(others)}>")
    if plan.max_context >= 1 and fits(context=plan.max_context, prompt=min(plan.prompt, plan.max_context)):
        out.append(f"--context {plan.max_context} (the largest at batch {plan.batch})")
    if plan.batch > 1 and plan.max_batch >= 1:
        out.append(f"--batch {plan.max_batch} (the largest at context {plan.context:,})")
    if not out:
        out.append("nothing nearby: no single change tried (GPUs, precision, KV dtype, GPU, context) fits")
    return out
