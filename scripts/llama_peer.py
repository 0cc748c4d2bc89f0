"""llama.cpp as a peer in the runtime benchmark: GGUF conversion of our checkpoints, and its runtime.

Runs inside its own virtual environment (`scripts/setup_llama_env.sh` builds llama-cpp-python from source
there, CPU only, GGML_NATIVE=ON), driven by scripts/bench_runtime.py through subprocesses; prints JSON.

    llama_peer.py convert  CHECKPOINT CACHE [--types f32 q8_0 q4_0]
    llama_peer.py bench    GGUF --ids JSON --new-tokens N --threads T
    llama_peer.py profile  GGUF --ids JSON --decode-steps N --threads T

convert: the vendored llama.cpp's convert_hf_to_gguf.py writes f32 (its `qwen35moe` architecture; `--no-mtp`),
then llama.cpp's own quantizer (`llama_model_quantize`, as `llama-quantize` with default options) writes
Q8_0 and Q4_0 from it. Random-weight presets carry no tokenizer; the benchmark feeds token ids, so the GGUF
gets a synthetic byte-level BPE vocabulary of the checkpoint's vocab_size (256 byte tokens, one merge,
numbered fillers) instead of converter's hash-detected one. Files are cached under CACHE/<checkpoint
folder name>/ and reused.

bench: in a fresh process, loads the GGUF, then runs the prompt (one llama_decode over all prompt tokens,
logits of the last) and greedy-decodes N-1 more tokens one llama_decode each, twice: the first run is
`cold` (first use after load), the second, after clearing the memory (KV cache and recurrent states),
`warm`. Time to first token is prefill + argmax of the first token; decode tokens/s is (N-1) / time of the
remaining steps, as ours (runtime/session.py). Also returns the greedy tokens and llama_perf_context.

profile: per-op time of the decode steps: a ggml scheduler eval callback asks for every graph node, so
ggml computes the graph one node at a time and the callback times each node (compute + one thread-pool
dispatch per node, so the profiled step is slower than an unprofiled one; shares are what matters).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

TYPES = {"f32": 0, "q8_0": 7, "q4_0": 2}  # llama_ftype: ALL_F32, MOSTLY_Q8_0, MOSTLY_Q4_0


def vendored_llama_cpp() -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist setup_llama_env.sh built from (its converter)."""
    found = sorted(
        (Path(sys.prefix) / "src").glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py")
    )
    if not found:
        raise SystemExit(
            f"{sys.prefix}/src: no vendored convert_hf_to_gguf.py; run scripts/setup_llama_env.sh"
        )
    return found[-1].parent


# --- conversion -------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 characters a byte-level BPE vocabulary spells bytes with."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _synthetic_vocab(self) -> None:
    """set_vocab for a checkpoint without a tokenizer: byte-level BPE over vocab_size ids."""
    import gguf

    size = int(self.hparams.get("vocab_size") or self.hparams["text_config"]["vocab_size"])
    space = _bytes_to_unicode()[ord(" ")]
    tokens = _bytes_to_unicode() + [space * 2]
    tokens += [f"<|filler_{i}|>" for i in range(size - len(tokens))]
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_tokenizer_pre("qwen2")
    self.gguf_writer.add_token_list(tokens[:size])
    self.gguf_writer.add_token_types([gguf.TokenType.NORMAL] * size)
    self.gguf_writer.add_token_merges([f"{space} {space}"])


def convert_f32(checkpoint: Path, out: Path) -> None:
    """convert_hf_to_gguf.py --outtype f32 --no-mtp, in this process (synthetic vocab when no tokenizer)."""
    vendor = vendored_llama_cpp()
    sys.path[:0] = [str(vendor), str(vendor / "gguf-py")]
    import convert_hf_to_gguf
    from conversion import qwen

    has_tokenizer = any((checkpoint / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
    if not has_tokenizer:
        for cls in (qwen.Qwen3_5MoeTextModel, qwen.Qwen3_5TextModel, qwen.Qwen3NextModel):
            cls.set_vocab = _synthetic_vocab
    argv = sys.argv
    sys.argv = [
        "convert_hf_to_gguf.py",
        str(checkpoint),
        "--outfile",
        str(out),
        "--outtype",
        "f32",
        "--no-mtp",
    ]
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.argv = argv


def quantize(src: Path, out: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc:
        raise SystemExit(f"llama_model_quantize({src} -> {out}) failed: {rc}")


def convert(checkpoint: Path, cache: Path, types: list[str], threads: int) -> dict:
    folder = cache / checkpoint.resolve().name
    folder.mkdir(parents=True, exist_ok=True)
    result: dict = {"folder": str(folder), "files": {}, "seconds": {}}
    f32 = folder / "model-f32.gguf"
    for kind in ["f32", *[t for t in types if t != "f32"]]:
        path = folder / f"model-{kind}.gguf"
        if not path.is_file():
            start = time.perf_counter()
            tmp = path.with_suffix(".tmp")
            if kind == "f32":
                convert_f32(checkpoint, tmp)
            else:
                quantize(f32, tmp, TYPES[kind], threads)
            tmp.rename(path)
            result["seconds"][kind] = time.perf_counter() - start
        if kind in types:
            result["files"][kind] = str(path)
    return result


# --- runtime ----------------------------------------------------------------------------------------------
_KEEP: list = []  # ctypes callbacks must outlive the calls that use them


def _quiet() -> None:
    import llama_cpp

    cb = llama_cpp.llama_log_callback(lambda level, text, user: None)
    _KEEP.append(cb)
    llama_cpp.llama_log_set(cb, None)


class Runner:
    def __init__(self, gguf: Path, n_ctx: int, n_batch: int, threads: int, cb_eval=None):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        start = time.perf_counter()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise SystemExit(f"{gguf}: llama.cpp could not load it")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = False
        if cb_eval is not None:
            cparams.cb_eval = cb_eval
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise SystemExit(f"{gguf}: llama_init_from_model failed")
        self.load_s = time.perf_counter() - start
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))

    def _decode(self, ids: list[int]) -> int:
        lc = self.lc
        arr = (lc.llama_token * len(ids))(*ids)
        rc = lc.llama_decode(self.ctx, lc.llama_batch_get_one(arr, len(ids)))
        if rc:
            raise SystemExit(f"llama_decode failed: {rc}")
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        self.last_logits = logits
        return int(logits.argmax())

    def reset(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        self.lc.llama_perf_context_reset(self.ctx)

    def generate(self, ids: list[int], new_tokens: int, step_hook=None) -> dict:
        self.reset()
        start = time.perf_counter()
        token = self._decode(ids)
        first = time.perf_counter()
        prefill_logits = self.last_logits.copy()
        tokens = [token]
        for _ in range(new_tokens - 1):
            if step_hook:
                step_hook(len(tokens))
            token = self._decode([token])
            tokens.append(token)
        end = time.perf_counter()
        perf = self.lc.llama_perf_context(self.ctx)
        return {
            "time_to_first_token_s": first - start,
            "decode_tokens_per_s": (new_tokens - 1) / (end - first),
            "tokens": tokens,
            "prefill_logits": prefill_logits,
            "perf": {"prompt_eval_ms": perf.t_p_eval_ms, "eval_ms": perf.t_eval_ms, "n_eval": perf.n_eval},
        }


def bench(gguf: Path, ids: list[int], new_tokens: int, threads: int, logits_out: Path | None) -> dict:
    _quiet()
    runner = Runner(gguf, n_ctx=len(ids) + new_tokens + 16, n_batch=max(len(ids), 64), threads=threads)
    cold = runner.generate(ids, new_tokens)
    warm = runner.generate(ids, new_tokens)
    if logits_out is not None:
        np.save(logits_out, cold["prefill_logits"])
    out = {}
    for name, r in (("cold", cold), ("warm", warm)):
        r.pop("prefill_logits")
        out[name] = r
    out["load_s"] = runner.load_s
    out["same_tokens_cold_warm"] = cold["tokens"] == warm["tokens"]
    return out


def profile(gguf: Path, ids: list[int], decode_steps: int, threads: int) -> dict:
    """Per-op time over `decode_steps` decode steps (after a prompt of len(ids)); see the module doc."""
    _quiet()
    lib = Path(__import__("llama_cpp").__file__).parent / "lib"
    base = ctypes.CDLL(str(next(lib.glob("libggml-base.so*"))))
    base.ggml_op_desc.restype = ctypes.c_char_p
    base.ggml_op_desc.argtypes = [ctypes.c_void_p]
    base.ggml_get_name.restype = ctypes.c_char_p
    base.ggml_get_name.argtypes = [ctypes.c_void_p]
    state = {"on": False, "t": 0.0}
    by_op: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def on_eval(tensor, ask, _user):
        now = time.perf_counter()
        if ask:
            state["t"] = now
            return True
        if state["on"]:
            dt = now - state["t"]
            op = base.ggml_op_desc(tensor).decode()
            name = base.ggml_get_name(tensor).decode().rsplit("-", 1)[0]
            by_op[op] += dt
            by_name[f"{op} {name}"] += dt
            calls[op] += 1
        return True

    from llama_cpp import ggml_backend_sched_eval_callback

    cb = ggml_backend_sched_eval_callback(on_eval)
    _KEEP.append(cb)
    runner = Runner(
        gguf, n_ctx=len(ids) + decode_steps + 16, n_batch=max(len(ids), 64), threads=threads, cb_eval=cb
    )
    runner.generate(ids, decode_steps + 1)  # warm-up

    def hook(step: int) -> None:
        state["on"] = True

    start = time.perf_counter()
    runner.generate(ids, decode_steps + 1, step_hook=hook)
    state["on"] = False
    wall = time.perf_counter() - start
    total = sum(by_op.values())
    steps = decode_steps
    return {
        "decode_steps": steps,
        "profiled_wall_s": wall,
        "op_time_ms_per_step": total * 1e3 / steps,
        "ops": {
            op: {"ms_per_step": t * 1e3 / steps, "share": t / total, "nodes_per_step": calls[op] / steps}
            for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])
        },
        "top_nodes": {
            k: {"ms_per_step": t * 1e3 / steps, "share": t / total}
            for k, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
        },
    }


def system_info() -> dict:
    import llama_cpp

    return {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("cache", type=Path)
    c.add_argument("--types", nargs="+", default=["f32", "q8_0", "q4_0"], choices=list(TYPES))
    c.add_argument("--threads", type=int, default=2)
    for name in ("bench", "profile"):
        p = sub.add_parser(name)
        p.add_argument("gguf", type=Path)
        p.add_argument("--ids", required=True, help="prompt token ids, a JSON list")
        p.add_argument("--threads", type=int, default=2)
        if name == "bench":
            p.add_argument("--new-tokens", type=int, default=32)
            p.add_argument("--logits-out", type=Path, help="save the prompt's last-position logits (.npy)")
        else:
            p.add_argument("--decode-steps", type=int, default=16)
    sub.add_parser("info")
    args = parser.parse_args()
    if args.cmd == "convert":
        result = convert(args.checkpoint, args.cache, args.types, args.threads)
    elif args.cmd == "bench":
        result = bench(args.gguf, json.loads(args.ids), args.new_tokens, args.threads, args.logits_out)
    elif args.cmd == "profile":
        result = profile(args.gguf, json.loads(args.ids), args.decode_steps, args.threads)
    else:
        result = system_info()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
