"""`qwen-export plan` (qwen_export/plan.py, cli_plan.py): the 397B's numbers against a hand calculation on
its published shapes, weight formats per tensor, what an impossible plan suggests, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import typer
from typer.testing import CliRunner

from qwen_export.cli_plan import plan as plan_command
from qwen_export.exporter.spec import spec_from_config
from qwen_export.gpus import GPUS, GpuError, get_gpu, parse_gpus
from qwen_export.layout import make_layout
from qwen_export.plan import PlanError, make_plan, weight_bytes
from qwen_export.presets import get_preset

# ---- Qwen3.5-397B-A17B as published (config.json of Qwen/Qwen3.5-397B-A17B) -----------------------------
LAYERS, FULL, LINEAR = 60, 15, 45  # 15 x (3 DeltaNet + 1 full attention)
HIDDEN = 4096
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 2, 256
LIN_K_HEADS, LIN_V_HEADS, LIN_DIM = 16, 64, 128
KERNEL = 4
EXPERTS, TOP_K, EXPERT_I, SHARED_I = 512, 10, 1024, 1024
VOCAB = 248_320  # lm_head untied: tie_word_embeddings is false in the config
CONTEXT = 262_144
TP = 8
H200_BYTES, H200_BANDWIDTH = 141e9, 4.8e12


def fp8(rows: int, cols: int) -> int:
    """Qwen's FP8 release: 1 byte per weight + one fp32 scale per 128x128 block."""
    return rows * cols + math.ceil(rows / 128) * math.ceil(cols / 128) * 4


def bf16(*shape: int) -> int:
    return math.prod(shape) * 2


@pytest.fixture(scope="module")
def spec_397b():
    """The config-only preset: the published config.json byte for byte."""
    spec = spec_from_config(get_preset("qwen3.5-397b-a17b").config_dict())
    published = (spec.num_layers, len(spec.attention_layers()), len(spec.linear_layers()), spec.hidden_size,
                 spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim, spec.linear_num_key_heads,
                 spec.linear_num_value_heads, spec.linear_key_head_dim, spec.linear_conv_kernel_dim,
                 spec.num_experts, spec.num_experts_per_tok, spec.moe_intermediate_size,
                 spec.shared_expert_intermediate_size, spec.vocab_size, spec.tie_word_embeddings)  # fmt: skip
    assert published == (LAYERS, FULL, LINEAR, HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, LIN_K_HEADS, LIN_V_HEADS,
                         LIN_DIM, KERNEL, EXPERTS, TOP_K, EXPERT_I, SHARED_I, VOCAB, False)  # fmt: skip
    return spec


def test_397b_fp8_tp8_at_256k_matches_the_hand_calculation(spec_397b):
    plan = make_plan(spec_397b, parse_gpus("8xh200"), precision="fp8", tp=TP, context=CONTEXT)

    # --- weights per GPU. Each GPU holds 1/8 of the heads and intermediate dims, a copy of everything
    # replicated, and one of the 2 kv heads (tp 8 > 2 kv heads: each is copied on 4 GPUs).
    q_rows = Q_HEADS * 2 * HEAD_DIM // TP  # query + output gate: 2048
    attention = (
        fp8(q_rows, HIDDEN)  # q_proj 2048 x 4096
        + 2 * fp8(HEAD_DIM, HIDDEN)  # k_proj, v_proj: 1 kv head = 256 x 4096 each
        + fp8(HIDDEN, Q_HEADS * HEAD_DIM // TP)  # o_proj 4096 x 1024 (row-parallel)
        + 2 * bf16(HEAD_DIM)  # q_norm, k_norm (replicated)
    )
    assert attention == 8_390_656 + 2 * 1_048_832 + 4_195_328 + 1_024
    conv_rows = (2 * LIN_K_HEADS * LIN_DIM + LIN_V_HEADS * LIN_DIM) // TP  # q|k|v channels: 1536
    v_heads = LIN_V_HEADS // TP  # 8
    deltanet = (
        fp8(conv_rows, HIDDEN)  # in_proj_qkv 1536 x 4096
        + fp8(v_heads * LIN_DIM, HIDDEN)  # in_proj_z 1024 x 4096
        + 2 * bf16(v_heads, HIDDEN)  # in_proj_b, in_proj_a: kept bf16
        + bf16(conv_rows, 1, KERNEL)  # conv1d
        + 2 * bf16(v_heads)  # dt_bias, A_log
        + bf16(LIN_DIM)  # gated norm weight (replicated)
        + fp8(HIDDEN, v_heads * LIN_DIM)  # out_proj 4096 x 1024 (row-parallel)
    )
    assert deltanet == 6_292_992 + 4_195_328 + 131_072 + 12_288 + 32 + 256 + 4_195_328
    i_rank = EXPERT_I // TP  # 128: tp alone cuts each expert's intermediate dimension
    expert = 2 * fp8(i_rank, HIDDEN) + fp8(HIDDEN, i_rank)  # gate, up, down, stored one per expert
    moe = (
        bf16(EXPERTS, HIDDEN)  # router (replicated)
        + EXPERTS * expert
        + 2 * fp8(SHARED_I // TP, HIDDEN)
        + fp8(HIDDEN, SHARED_I // TP)  # shared expert
        + bf16(1, HIDDEN)  # shared_expert_gate (replicated)
    )
    norms = LAYERS * 2 * bf16(HIDDEN) + bf16(HIDDEN)  # input/post-attention norms + final norm
    vocab = 2 * bf16(VOCAB // TP, HIDDEN)  # embed_tokens and lm_head, vocab-parallel, bf16
    per_gpu = FULL * attention + LINEAR * deltanet + LAYERS * moe + norms + vocab
    assert per_gpu == 50_073_772_192  # 50.07 GB
    assert plan.weights_per_gpu == per_gpu
    assert plan.weights_all_gpus == 8 * per_gpu == 400_590_177_536
    assert plan.weights_by_component["experts"] == LAYERS * EXPERTS * expert == 48_330_178_560

    # --- one unsharded copy (what the FP8 checkpoint holds)
    one_copy = (
        FULL * (fp8(2 * Q_HEADS * HEAD_DIM, HIDDEN) + 2 * fp8(KV_HEADS * HEAD_DIM, HIDDEN)
                + fp8(HIDDEN, Q_HEADS * HEAD_DIM) + 2 * bf16(HEAD_DIM))
        + LINEAR * (fp8(8 * conv_rows, HIDDEN) + fp8(LIN_V_HEADS * LIN_DIM, HIDDEN)
                    + 2 * bf16(LIN_V_HEADS, HIDDEN) + bf16(8 * conv_rows, 1, KERNEL)
                    + 2 * bf16(LIN_V_HEADS) + bf16(LIN_DIM) + fp8(HIDDEN, LIN_V_HEADS * LIN_DIM))
        + LAYERS * (bf16(EXPERTS, HIDDEN) + EXPERTS * (2 * fp8(EXPERT_I, HIDDEN) + fp8(HIDDEN, EXPERT_I))
                    + 2 * fp8(SHARED_I, HIDDEN) + fp8(HIDDEN, SHARED_I) + bf16(1, HIDDEN))
        + norms + 2 * bf16(VOCAB, HIDDEN)
    )  # fmt: skip
    assert plan.weights_one_copy == one_copy == 398_629_212_672

    # --- KV cache per token: only the 15 full-attention layers, bf16; each GPU holds its one kv head
    assert plan.kv_per_token_per_gpu == FULL * 2 * 1 * HEAD_DIM * 2 == 15_360
    assert plan.kv_per_token_model == FULL * 2 * KV_HEADS * HEAD_DIM * 2 == 30_720

    # --- state per sequence at 256K: KV + 45 DeltaNet layers' conv state [conv_dim, 3] bf16 and recurrent
    # state [64 v heads, 128, 128] fp32, cut by heads
    deltanet_gpu = LINEAR * (conv_rows * (KERNEL - 1) * 2 + v_heads * LIN_DIM * LIN_DIM * 4)
    deltanet_model = LINEAR * (8 * conv_rows * (KERNEL - 1) * 2 + LIN_V_HEADS * LIN_DIM * LIN_DIM * 4)
    assert plan.deltanet_per_sequence_per_gpu == deltanet_gpu == 24_007_680
    assert plan.deltanet_per_sequence_model == deltanet_model == 192_061_440
    assert plan.state_per_sequence_per_gpu == CONTEXT * 15_360 + deltanet_gpu == 4_050_539_520
    assert plan.state_per_sequence_model == CONTEXT * 30_720 + deltanet_model == 8_245_125_120

    # --- fits, with 10% of 141 GB kept back
    assert plan.usable_per_gpu == int(H200_BYTES * 0.9) and plan.fits
    assert plan.needed_per_gpu == per_gpu + 4_050_539_520 + plan.activations_per_gpu
    # the largest batch: at most (usable - weights) / state per sequence = 18.97 before activations
    assert plan.max_batch == 17
    at_max = make_plan(spec_397b, parse_gpus("8xh200"), precision="fp8", tp=TP, context=CONTEXT, batch=17)
    over = make_plan(spec_397b, parse_gpus("8xh200"), precision="fp8", tp=TP, context=CONTEXT, batch=18)
    assert at_max.fits and not over.fits

    # --- decode floor, batch 1: every weight but the experts and the embedding table, 10 of 512 experts,
    # one embedding row, the KV cache at 256K, the DeltaNet states read and written
    decode = (
        per_gpu - LAYERS * EXPERTS * expert - bf16(VOCAB // TP, HIDDEN)
        + LAYERS * EXPERTS * expert * TOP_K / EXPERTS
        + bf16(HIDDEN)
        + CONTEXT * 15_360
        + 2 * deltanet_gpu
    )  # fmt: skip
    assert plan.decode_bytes_per_gpu == decode == 6_507_818_144
    assert plan.decode_seconds == pytest.approx(decode / H200_BANDWIDTH)  # 1.36 ms
    assert plan.decode_tokens_per_s == pytest.approx(H200_BANDWIDTH / decode)

    # --- state against a same-size model with full attention on all 60 layers
    all_full = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2 * CONTEXT
    assert plan.state_ratio == pytest.approx(8_245_125_120 / all_full)  # 0.256: 3.9x less
    assert plan.suggestions == ()


def test_bf16_weights_are_two_bytes_per_parameter_of_transformers_model(spec_397b):
    """One bf16 copy = 2 x the text tower's parameters as transformers' model counts them (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(**get_preset("qwen3.5-397b-a17b").config_dict())
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text = sum(v.numel() for k, v in model.state_dict().items() if ".visual." not in f".{k}")
    plan = make_plan(spec_397b, parse_gpus("16xh200"), precision="bf16", context=4096)
    assert plan.weights_one_copy == 2 * text
    assert plan.weights_per_gpu * 16 - plan.weights_one_copy > 0  # kv heads, norms, router replicated


def test_weight_formats_per_tensor(spec_397b):
    layout = make_layout(spec_397b)

    def tensor(suffix):
        return next(t for t in layout.weights if t.name.endswith(suffix))

    q = tensor("layers.3.self_attn.q_proj.weight")  # [16384, 4096]
    assert weight_bytes(q, q.shape, "bf16").total == 16384 * 4096 * 2
    assert weight_bytes(q, q.shape, "fp8").total == 16384 * 4096 + 128 * 32 * 4
    # int4: 4 bits + an fp16 scale per 32 inputs; nvfp4: 4 bits + an e4m3 scale per 16 + an fp32 per matrix
    assert weight_bytes(q, q.shape, "int4").total == 16384 * 4096 // 2 + 16384 * (4096 // 32) * 2
    assert weight_bytes(q, q.shape, "nvfp4").total == 16384 * 4096 // 2 + 16384 * (4096 // 16) + 4
    down = tensor("layers.0.mlp.experts.down_proj")  # [512, 4096, 1024]: 512 matrices [4096, 1024]
    assert weight_bytes(down, down.shape, "fp8").total == 512 * (4096 * 1024 + 32 * 8 * 4)
    assert weight_bytes(down, down.shape, "nvfp4").total == 512 * (4096 * 1024 // 2 + 4096 * 64 + 4)
    router = tensor("layers.0.mlp.gate.weight")
    assert weight_bytes(router, router.shape, "fp8").total == 512 * 4096 * 2  # the release keeps it bf16
    assert weight_bytes(router, router.shape, "int4").total == 512 * 4096 // 2 + 512 * 128 * 2  # ort-int4
    embed = tensor("embed_tokens.weight")
    assert weight_bytes(embed, embed.shape, "int4").total == VOCAB * HIDDEN * 2  # a Gather, kept bf16
    lm_head = tensor("lm_head.weight")
    assert weight_bytes(lm_head, lm_head.shape, "fp8").total == VOCAB * HIDDEN * 2
    conv = tensor("layers.0.linear_attn.conv1d.weight")
    assert weight_bytes(conv, conv.shape, "int4").total == 12288 * 4 * 2


def test_fp8_scales_of_ragged_blocks_count_whole():
    spec = spec_from_config(get_preset("tiny-qwen3.5-moe").config_dict())  # hidden 64: blocks are ragged
    o_proj = next(t for t in make_layout(spec).weights if t.name.endswith("self_attn.o_proj.weight"))
    assert o_proj.shape == (64, 128)
    assert weight_bytes(o_proj, o_proj.shape, "fp8").total == 64 * 128 + 1 * 1 * 4
    assert weight_bytes(o_proj, o_proj.shape, "int4").total == 64 * 4 * 16 + 64 * 4 * 2


def test_expert_parallel_moves_experts_not_bytes(spec_397b):
    tp_only = make_plan(spec_397b, parse_gpus("8xh200"), precision="fp8", context=CONTEXT)
    ep = make_plan(spec_397b, parse_gpus("8xh200"), precision="fp8", ep=8, context=CONTEXT)
    # each GPU: 64 whole experts instead of a 1/8 slice of 512; the 128x128 blocks divide either way
    assert ep.weights_by_component["experts"] == LAYERS * 64 * (2 * fp8(1024, 4096) + fp8(4096, 1024))
    assert ep.weights_per_gpu == tp_only.weights_per_gpu
    assert ep.ep == 8 and ep.to_json()["ep"] == 8


def test_a_plan_that_does_not_fit_says_what_would(spec_397b):
    plan = make_plan(spec_397b, parse_gpus("4xh100"), precision="bf16", context=CONTEXT)
    assert not plan.fits and plan.max_batch == 0
    assert "--gpus 16xh100 --tp 16" in plan.suggestions
    assert any(s.startswith("--precision int4 or nvfp4") for s in plan.suggestions), plan.suggestions
    for suggestion in plan.suggestions[:1]:  # the suggested split does fit
        assert make_plan(spec_397b, parse_gpus("16xh100"), precision="bf16", context=CONTEXT).fits, suggestion
    long = make_plan(spec_397b, parse_gpus("8xh200"), precision="fp8", context=CONTEXT, batch=64)
    assert not long.fits
    assert f"--batch {long.max_batch} (the largest at context 262,144)" in long.suggestions
    assert "--gpus 32xh200 --tp 8 --batch 16 (4 copies serve the 64 sequences)" in long.suggestions
    assert make_plan(spec_397b, parse_gpus("32xh200"), tp=8, precision="fp8", context=CONTEXT, batch=16).fits
    context = next(s for s in long.suggestions if s.startswith("--context"))
    largest = int(context.split()[1])
    assert make_plan(spec_397b, parse_gpus("8xh200"), precision="fp8", context=largest, batch=64).fits
    assert not make_plan(
        spec_397b, parse_gpus("8xh200"), precision="fp8", context=largest + 64, batch=64
    ).fits


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tp=3), "tp 3 does not divide the GPU count 8"),
        (dict(precision="fp4"), "unknown precision 'fp4'"),
        (dict(kv_cache="int8"), "unknown kv-cache dtype"),
        (dict(prompt=4096, context=2048), "prompt 4096 is above context 2048"),
        (dict(batch=0), "batch must be a positive integer"),
    ],
)
def test_malformed_requests_raise(spec_397b, kwargs, message):
    with pytest.raises(PlanError, match=message):
        make_plan(spec_397b, parse_gpus("8xh200"), **kwargs)


def test_gpu_table_reuses_the_projects_sm_names():
    from qwen_export.engines.spec import GPU_NAMES, KNOWN_SMS

    assert get_gpu("H200").sm == "sm90" == GPU_NAMES["h200"]
    assert {g.sm for g in GPUS.values()} <= set(KNOWN_SMS)
    assert parse_gpus("8xh200") == (8, GPUS["h200"]) and parse_gpus(" 2 x RTX 4090 ") == (2, GPUS["rtx-4090"])
    for bad in ("h200", "8-h200", "0xh200", "8x"):
        with pytest.raises(GpuError):
            parse_gpus(bad)
    with pytest.raises(GpuError, match="a100-80gb or a100-40gb"):
        get_gpu("a100")


# --------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------

app = typer.Typer()
app.command()(plan_command)


@app.callback()
def _group() -> None:  # keeps `plan` a subcommand, as in qwen-export's own app
    pass


runner = CliRunner()


def test_cli_json_output():
    args = ["plan", "--preset", "qwen3.5-397b-a17b", "--gpus", "8xh200", "--precision", "fp8", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fits"] is True and report["tp"] == 8 and report["context"] == CONTEXT
    assert report["weights"]["per_gpu"] == 50_073_772_192
    assert report["kv_cache_per_token"] == {"per_gpu": 15_360, "model": 30_720}
    assert report["state_per_sequence"]["per_gpu"] == 4_050_539_520
    assert report["gpus"]["sm"] == "sm90" and report["gpus"]["count"] == 8
    assert (
        "15 full-attention layers x 2 (K,V) x 1 kv head x 256 x 2 B"
        in report["rows"]["kv_per_token"]["arithmetic"]
    )


def test_cli_table_shows_the_arithmetic():
    args = ["plan", "--preset", "qwen3.5-397b-a17b", "--gpus", "8xh200", "--precision", "fp8"]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "fits: 54.55 GB needed per GPU of 126.90 GB usable" in result.stdout
    assert "(1 of 2 kv heads, on 4 GPUs)" in result.stdout


def test_cli_impossible_plan_suggests_and_exits_1():
    args = ["plan", "--preset", "qwen3.5-397b-a17b", "--gpus", "4xh100", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["fits"] is False and "--gpus 16xh100 --tp 16" in report["suggestions"]


def test_cli_reads_a_local_fp8_checkpoint_config(tmp_path):
    config = get_preset("qwen3.5-35b-a3b").config_dict()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["plan", "--model", str(tmp_path), "--gpus", "1xh100", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["precision"] == "fp8"  # the checkpoint's own precision by default


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "8xh999"], "unknown GPU 'h999'"),
        (["--gpus", "8-h200"], "expected <count>x<name>"),
        (["--gpus", "6xh200"], "tp 6 does not divide num_attention_heads 32"),
        (["--gpus", "8xh200", "--tp", "3"], "tp 3 does not divide the GPU count 8"),
        (["--gpus", "8xh200", "--ep", "3"], "ep 3 does not divide tp 8"),
        (["--gpus", "8xh200", "--precision", "fp4"], "unknown precision 'fp4'"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, message):
    result = runner.invoke(app, ["plan", "--preset", "qwen3.5-397b-a17b", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_cli_suggests_the_tp_that_divides_the_gpus():
    result = runner.invoke(app, ["plan", "--preset", "qwen3.5-397b-a17b", "--gpus", "6xh200"])
    assert result.exit_code == 2
    assert "on 6 GPUs: --tp 1 (6 copies), --tp 2 (3 copies)" in result.output


def test_cli_needs_exactly_one_model():
    result = runner.invoke(app, ["plan", "--gpus", "8xh200"])
    assert result.exit_code == 2 and "exactly one of --preset NAME or --model DIR" in result.output
