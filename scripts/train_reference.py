"""Train the committed trained reference: a small Qwen3.5-MoE (with its MTP layer) that has learned something.

Random-weight presets check that an export computes what transformers computes, but cannot say whether a
lower precision or a speculative decoder still does something useful. This script trains a small model on the
Python standard library's own source (whatever interpreter runs it), so the repository has a checkpoint whose
held-out perplexity and MTP draft acceptance mean something:

    python scripts/train_reference.py [--out golden/trained-qwen3.5-moe] [--minutes 15]

Everything is seeded and the step count is fixed by --minutes (never by wall time), so a run is reproducible
on the same software and CPU (byte for byte; another vector ISA rounds float sums differently: docs/mtp.md);
the output folder holds config.json, model.safetensors (main model + `mtp.*`), tokenizer.json, heldout.txt
and training_log.{json,md}. On a 2-core CPU the default run takes 16-20 minutes (19.8 on an AVX2 EPYC).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "golden" / "trained-qwen3.5-moe"

SEED = 20260505
THREADS = 2
VOCAB = 4096
EOS = "<|endoftext|>"  # id 0: separates files in the training stream
MAX_FILE_BYTES = 200_000  # a few huge generated tables (e.g. pydoc_data) would dominate the data
SKIP_DIRS = {"test", "tests", "idle_test"}
HELDOUT_MOD = 20  # sha1(relative path) % 20 == 0: about 5% of files, stable across runs
HELDOUT_BYTES = 58_000  # heldout.txt ~50 KB: ~14k tokens, ~55 windows of 256 (scored in seconds)

SEQ_LEN = 256
BATCH = 8
STEPS_PER_MINUTE = 80  # measured: ~0.74 s per step on an idle 2-core CPU (the pure-PyTorch DeltaNet)
PEAK_LR = 2e-3
MIN_LR_RATIO = 0.1
WARMUP = 60
WEIGHT_DECAY = 0.1
CLIP = 1.0
MTP_WEIGHT = 0.5  # CE of the MTP's t+2 prediction, trained jointly with the main model
# KL toward the main model's own (detached) t+2 distribution: acceptance is agreement with the main model's
# greedy choice, which the data's t+2 token only approximates.
DISTILL_WEIGHT = 1.0
AUX_WEIGHT = 1e-3  # the config's router_aux_loss_coef: keeps all experts in use
LOG_EVERY = 25
LOGGED_CONFIG_KEYS = """vocab_size hidden_size num_hidden_layers layer_types num_attention_heads
num_key_value_heads head_dim linear_num_key_heads linear_num_value_heads linear_key_head_dim
linear_value_head_dim num_experts num_experts_per_tok moe_intermediate_size shared_expert_intermediate_size
mtp_num_hidden_layers""".split()
MAX_FOLDER_BYTES = 25_000_000


@dataclass(frozen=True)
class SourceFile:
    rel: str
    text: str
    heldout: bool


def model_config() -> Any:
    """The reference's text config: Qwen3.5-MoE's layout (3 DeltaNet : 1 attention, 8 experts top-2 with a
    shared expert, partial rotary), shrunk to train on a CPU."""
    from transformers import Qwen3_5MoeTextConfig

    config = Qwen3_5MoeTextConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=8,
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        router_aux_loss_coef=AUX_WEIGHT,
        eos_token_id=0,
        mtp_num_hidden_layers=1,  # not a named argument; kept as an attribute and written to config.json
        dtype="float32",
    )
    config.architectures = ["Qwen3_5MoeForCausalLM"]
    return config


# --- data -------------------------------------------------------------------------------------------------
def stdlib_sources() -> tuple[Path, list[SourceFile], list[str]]:
    """The stdlib's *.py files (sorted by relative path) without site-packages, test directories and files
    over MAX_FILE_BYTES; files that are not UTF-8 are skipped and named."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[SourceFile] = []
    skipped: list[str] = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel.as_posix())
            continue
        digest = int(hashlib.sha1(rel.as_posix().encode()).hexdigest(), 16)
        files.append(SourceFile(rel.as_posix(), text, digest % HELDOUT_MOD == 0))
    return root, files, skipped


def heldout_sample(files: list[SourceFile], budget: int = HELDOUT_BYTES) -> str:
    """About `budget` bytes of held-out text: from each held-out file (in order) a block of whole lines around
    its middle, where real code is (file heads are mostly licences and docstrings)."""
    chosen = [f for f in files if f.heldout and f.text.strip()]
    per_file = budget // max(len(chosen), 1)
    blocks: list[str] = []
    for f in chosen:
        lines = f.text.splitlines(keepends=True)
        start = len(lines) // 2
        while start > 0 and sum(len(x) for x in lines[start:]) < per_file:
            start -= 1  # a short file: back up so the block still fills its share
        block: list[str] = []
        for line in lines[start:]:
            if block and sum(len(x) for x in block) + len(line) > per_file:
                break
            block.append(line)
        blocks.append("".join(block))
    return "\n".join(b if b.endswith("\n") else b + "\n" for b in blocks)


def train_tokenizer(texts: list[str]):
    """Byte-level BPE (every byte is a token, so any text round-trips), trained on the training split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def check_round_trip(path: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    for text in texts:
        if tokenizer.decode(tokenizer.encode(text).ids) != text:
            raise SystemExit(f"{path}: the tokenizer does not round-trip a text of {len(text)} characters")


# --- training ---------------------------------------------------------------------------------------------
def lr_at(step: int, steps: int) -> float:
    """Linear warmup, then cosine decay to MIN_LR_RATIO of the peak."""
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(steps - WARMUP, 1)
    return PEAK_LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def losses(model, mtp, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """batch [B, T + 2]: the main model reads tokens 0..T-1 and predicts 1..T; the MTP layer at t reads
    (h_t, token t+1) and predicts t+2."""
    length = batch.shape[1] - 2
    inputs = batch[:, :length]
    out = model(input_ids=inputs, output_hidden_states=True, output_router_logits=True, use_cache=False)
    hidden = out.hidden_states[-1]  # after the final norm: what the MTP layer reads
    vocab = out.logits.shape[-1]
    main = F.cross_entropy(out.logits.reshape(-1, vocab), batch[:, 1 : length + 1].reshape(-1))
    positions = torch.arange(length)[None].expand(batch.shape[0], length)
    _, mtp_logits = mtp(model, batch[:, 1 : length + 1], hidden, positions)
    mtp_ce = F.cross_entropy(mtp_logits.reshape(-1, vocab), batch[:, 2:].reshape(-1))
    # The main model's t+2 prediction is its logits at t+1, so the last MTP position has no teacher.
    teacher = torch.log_softmax(out.logits[:, 1:].detach(), -1)
    student = torch.log_softmax(mtp_logits[:, :-1], -1)
    distill = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
    total = main + MTP_WEIGHT * mtp_ce + DISTILL_WEIGHT * distill + AUX_WEIGHT * out.aux_loss
    return {"total": total, "main": main, "mtp": mtp_ce, "distill": distill}


def param_groups(modules: list[torch.nn.Module]) -> list[dict[str, Any]]:
    """Weight decay on matrices only; norms, A_log and dt_bias (1-D) are left alone."""
    decay, keep = [], []
    for module in modules:
        for param in module.parameters():
            (decay if param.dim() >= 2 else keep).append(param)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": keep, "weight_decay": 0.0}]


def train(model, mtp, stream: torch.Tensor, steps: int, log: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(SEED + 1)  # window order: fixed, independent of the model's RNG
    optimizer = torch.optim.AdamW(param_groups([model, mtp]), lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    offsets = torch.arange(SEQ_LEN + 2)
    sums = {"main": 0.0, "mtp": 0.0, "distill": 0.0}
    curve: list[dict[str, float]] = log["loss_curve"]
    started = time.perf_counter()
    model.train()
    mtp.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        starts = torch.randint(0, len(stream) - SEQ_LEN - 2, (BATCH,), generator=gen)
        batch = stream[starts[:, None] + offsets]
        parts = losses(model, mtp, batch)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        for key in sums:
            sums[key] += float(parts[key].detach())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            span = (step % LOG_EVERY) + 1
            elapsed = time.perf_counter() - started
            row = {"step": step + 1, "lr": lr_at(step, steps), "elapsed_s": round(elapsed, 1)}
            row.update({key: round(value / span, 4) for key, value in sums.items()})
            curve.append(row)
            sums = dict.fromkeys(sums, 0.0)
            print(
                f"step {step + 1}/{steps}  main {row['main']:.3f}  mtp {row['mtp']:.3f}  "
                f"distill {row['distill']:.3f}  lr {row['lr']:.2e}  {elapsed / (step + 1):.2f} s/step",
                flush=True,
            )
    log["train_seconds"] = round(time.perf_counter() - started, 1)


# --- saving and evaluation ---------------------------------------------------------------------------------
def save(model, mtp, out: Path) -> None:
    """transformers' own config.json and weights, then the MTP layer's `mtp.*` tensors (experts one per
    expert, as Qwen's checkpoints store them) merged into the same model.safetensors."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)  # transformers' defaults; nothing reads it
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    tensors.update({k: v.contiguous() for k, v in mtp.to_checkpoint().items()})
    save_file(tensors, weights, metadata={"format": "pt"})


def unigram_nll(train_counts: np.ndarray, windows: np.ndarray) -> tuple[float, int]:
    """Add-one-smoothed unigram NLL of exactly the tokens reference_nll scores (each window's 1..L-1)."""
    probs = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    targets = windows[:, 1:].reshape(-1)
    return float(-np.log(probs[targets]).sum()), int(targets.size)


def write_markdown(path: Path, log: dict[str, Any]) -> None:
    final = log["final"]
    lines = [
        "# Trained Qwen3.5-MoE reference",
        "",
        "A small Qwen3.5-MoE with an MTP layer, trained on the Python standard library's source by "
        "`scripts/train_reference.py` (deterministic: fixed seeds, data order and step count).",
        "",
        f"Command: `{log['command']}`",
        "",
        "| | |",
        "|---|---|",
        f"| Python (data) | {log['python']} (stdlib at `{log['data']['stdlib']}`) |",
        f"| torch / transformers / tokenizers | {log['versions']['torch']} / "
        f"{log['versions']['transformers']} / {log['versions']['tokenizers']} |",
        f"| files train / held-out | {log['data']['train_files']} / {log['data']['heldout_files']} |",
        f"| tokens train / held-out | {log['data']['train_tokens']:,} / {log['data']['heldout_tokens']:,} |",
        f"| parameters main / MTP | {log['model']['parameters_main']:,} / "
        f"{log['model']['parameters_mtp']:,} |",
        f"| steps x batch x length | {log['steps']} x {BATCH} x {SEQ_LEN} |",
        f"| tokens seen | {log['tokens_seen']:,} |",
        f"| wall time | {log['wall_seconds'] / 60:.1f} min (training {log['train_seconds'] / 60:.1f} min) |",
        "",
        "## Final evaluation (heldout.txt, windows of 256 tokens)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| held-out perplexity | {final['heldout_perplexity']:.4f} |",
        f"| unigram baseline perplexity (add-one, train counts) | {final['unigram_perplexity']:.2f} |",
        f"| MTP agreement with the main model's greedy t+2 | {final['mtp_agreement_with_main_greedy']:.4f} |",
        f"| MTP top-1 accuracy (t+2) | {final['mtp_top1_accuracy_t_plus_2']:.4f} |",
        f"| main top-1 accuracy (t+1) | {final['main_top1_accuracy_t_plus_1']:.4f} |",
        f"| scored tokens / windows | {final['heldout_tokens_scored']:,} / {final['heldout_windows']} |",
        "",
        "## Loss curve (mean over each logging interval)",
        "",
        "| step | lr | main CE | MTP CE (t+2) | MTP KL to main | elapsed s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in log["loss_curve"]:
        lines.append(
            f"| {row['step']} | {row['lr']:.2e} | {row['main']:.4f} | {row['mtp']:.4f} | "
            f"{row['distill']:.4f} | {row['elapsed_s']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=15.0,
        help=f"nominal training budget; fixes the step count (minutes x {STEPS_PER_MINUTE}), never read from "
        "a clock",
    )
    args = parser.parse_args(argv)
    import tokenizers
    import transformers
    from transformers import Qwen3_5MoeForCausalLM
    from transformers.utils import logging as hf_logging

    from qwen_export.golden.mtp import MtpReference, load_mtp_reference
    from qwen_export.golden.perplexity import (
        WINDOW,
        draft_agreement,
        perplexity,
        reference_nll,
        token_windows,
    )

    hf_logging.set_verbosity_error()  # the slow-DeltaNet fallback notice, once per layer, is noise here
    wall = time.perf_counter()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    steps = max(1, round(args.minutes * STEPS_PER_MINUTE))
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    # Data and tokenizer.
    stdlib, files, skipped = stdlib_sources()
    train_texts = [f.text for f in files if not f.heldout]
    heldout_files = [f for f in files if f.heldout]
    print(f"python {platform.python_version()}: {len(train_texts)} train, {len(heldout_files)} heldout files")
    started = time.perf_counter()
    tokenizer = train_tokenizer(train_texts)
    tokenizer.save(str(out / "tokenizer.json"))
    heldout = heldout_sample(files)
    (out / "heldout.txt").write_text(heldout, encoding="utf-8")
    check_round_trip(out / "tokenizer.json", [heldout, *(f.text for f in heldout_files)])
    tokenizer_seconds = time.perf_counter() - started
    eos = tokenizer.token_to_id(EOS)
    stream_ids: list[int] = []
    for encoding in tokenizer.encode_batch(train_texts):
        stream_ids.extend(encoding.ids)
        stream_ids.append(eos)
    stream = torch.tensor(stream_ids, dtype=torch.long)
    train_counts = np.bincount(np.asarray(stream_ids), minlength=VOCAB).astype(np.float64)
    heldout_ids = tokenizer.encode(heldout).ids
    print(f"tokenizer {tokenizer_seconds:.0f} s; tokens {len(stream):,} train, {len(heldout_ids):,} held out")

    # Model.
    config = model_config()
    model = Qwen3_5MoeForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    mtp = MtpReference(model)
    mtp.init_weights(config.initializer_range, torch.Generator().manual_seed(SEED + 2))
    n_main = sum(p.numel() for p in model.parameters())
    n_mtp = sum(p.numel() for p in mtp.parameters())
    log: dict[str, Any] = {
        "command": shlex.join(["python", "scripts/train_reference.py", *sys.argv[1:]]),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "seed": SEED,
        "threads": THREADS,
        "data": {
            "stdlib": str(stdlib),
            "train_files": len(train_texts),
            "heldout_files": len(heldout_files),
            "skipped_not_utf8": skipped,
            "train_bytes": sum(len(t.encode()) for t in train_texts),
            "heldout_file_bytes": sum(len(f.text.encode()) for f in heldout_files),
            "heldout_txt_bytes": len(heldout.encode()),
            "train_tokens": len(stream),
            "heldout_tokens": len(heldout_ids),
            "tokenizer": {"kind": "byte-level BPE", "vocab_size": tokenizer.get_vocab_size(), "eos": EOS},
        },
        "model": {
            "config": {k: getattr(config, k) for k in LOGGED_CONFIG_KEYS},
            "parameters_main": n_main,
            "parameters_mtp": n_mtp,
        },
        "training": {
            "steps": steps,
            "batch": BATCH,
            "seq_len": SEQ_LEN,
            "optimizer": "AdamW(betas=(0.9, 0.95))",
            "peak_lr": PEAK_LR,
            "min_lr_ratio": MIN_LR_RATIO,
            "warmup_steps": WARMUP,
            "weight_decay": WEIGHT_DECAY,
            "grad_clip": CLIP,
            "loss": f"CE(main, t+1) + {MTP_WEIGHT:g}*CE(mtp, t+2) + {DISTILL_WEIGHT:g}*KL(main t+2 || mtp) "
            f"+ {AUX_WEIGHT:g}*router_aux",
            "log_every": LOG_EVERY,
        },
        "steps": steps,
        "tokens_seen": steps * BATCH * SEQ_LEN,
        "tokenizer_seconds": round(tokenizer_seconds, 1),
        "loss_curve": [],
    }
    print(f"model: {n_main:,} + MTP {n_mtp:,} parameters; {steps} steps of {BATCH}x{SEQ_LEN} tokens")

    train(model, mtp, stream, steps, log)
    save(model, mtp, out)

    # Evaluate what was saved, loaded the way the test loads it, so the logged numbers are the folder's.
    reloaded = Qwen3_5MoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reloaded_mtp = load_mtp_reference(out, reloaded)
    windows = token_windows(heldout_ids, WINDOW)
    nll, count = reference_nll(reloaded, windows)
    uni_nll, uni_count = unigram_nll(train_counts, windows)
    final: dict[str, Any] = {
        "heldout_perplexity": perplexity(nll, count),
        "heldout_nll_per_token": nll / count,
        "unigram_perplexity": perplexity(uni_nll, uni_count),
        "heldout_windows": int(windows.shape[0]),
        "window": WINDOW,
        "heldout_tokens_scored": count,
    }
    final.update(draft_agreement(reloaded, reloaded_mtp, windows))
    log["final"] = final
    log["wall_seconds"] = round(time.perf_counter() - wall, 1)
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    write_markdown(out / "training_log.md", log)
    size = folder_bytes(out)
    print(json.dumps(final, indent=2))
    print(f"{out}: {size / 1e6:.2f} MB; wall {log['wall_seconds'] / 60:.1f} min")
    if size > MAX_FOLDER_BYTES:
        print(f"error: {out} holds {size} bytes, over the {MAX_FOLDER_BYTES} limit", file=sys.stderr)
        return 1
    if final["mtp_agreement_with_main_greedy"] < 0.5:
        print("warning: MTP agreement below 0.5; train the MTP layer harder", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
