"""Speculative-decoding benchmark: decode tokens/s at batch 1 with k = 0 (plain), 1, 2 and 3 MTP drafts a
round, acceptance per draft position, and the cost of a draft step and of a verify step relative to a plain
decode step, for the `ort` and `ort-cpu-int4` builds of a checkpoint with an MTP layer (by default the
trained reference model in golden/, on its held-out text).

Every configuration decodes the same prompts in the same process, configurations alternating within each
round (this machine is shared and noisy); the tokens of every speculative run are checked equal to the
plain run's. Plain decoding runs at one thread and at all of them, and speculative decoding is held to the
faster. Every rollback the artifact allows (runtime/speculative.py) is measured at every k, and a k = 1
verify run is taken apart: the main graph over 1 and 2 tokens against the verify graph over 2, and the
verify graph cut after each part of its MTP layer (run_costs, verify_cut).
Writes benchmarks/speculative.json and benchmarks/speculative.md.

    .venv/bin/python scripts/bench_speculative.py [--model golden/trained-qwen3.5-moe] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import REPO, produced_by, provenance, shown, write_results


def configs(session) -> list[tuple[int, str | None]]:
    """Plain decoding, then k = 1, 2 and 3 with every rollback the session's graphs allow ("snapshot", the
    default where it runs, needs per-token DeltaNet states: the qwen.cpu graphs)."""
    from qwen_export.runtime.speculative import ROLLBACKS

    default = session.speculative_decoder(1).rollback
    rollbacks = [r for r in ROLLBACKS if r != "snapshot" or default == "snapshot"]
    return [(0, None)] + [(k, rollback) for k in (1, 2, 3) for rollback in rollbacks]


def prompts_from_text(session, text_file: Path, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens spread over the text (random ids for a model without a
    tokenizer, such as the tiny presets)."""
    if session.tokenizer is None:
        return np.random.default_rng(0).integers(0, session.backend.vocab_size, (count, length)).tolist()
    ids = session.encode(text_file.read_text())
    stride = max((len(ids) - length) // count, 1)
    return [ids[i * stride : i * stride + length] for i in range(count)]


class OrtRunClock:
    """The start and duration of every ONNX Runtime run (both calls the runtime runs its graphs through),
    so that a decode loop's own Python is its decode time less the runs inside it."""

    def __init__(self) -> None:
        self.runs: list[tuple[float, float]] = []

    def __enter__(self) -> OrtRunClock:
        import onnxruntime as ort

        self._originals = {
            n: getattr(ort.InferenceSession, n) for n in ("run_with_iobinding", "run_with_ort_values")
        }
        for name, original in self._originals.items():
            setattr(ort.InferenceSession, name, self._timed(original))
        return self

    def __exit__(self, *exc) -> None:
        import onnxruntime as ort

        for name, original in self._originals.items():
            setattr(ort.InferenceSession, name, original)

    def _timed(self, original):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.runs.append((start, time.perf_counter() - start))

        return run

    def seconds_between(self, begin: float, end: float) -> float:
        return sum(d for s, d in self.runs if begin <= s and s + d <= end)


def run_config(session, prompts, new_tokens: int, k: int, rollback: str | None) -> dict:
    from qwen_export.runtime.speculative import SpeculativeStats

    stats = SpeculativeStats(k) if k else None
    tokens, decode_s, run_s, steps = [], 0.0, 0.0, 0
    for prompt in prompts:
        timings: dict[str, float] = {}
        ids = np.array([prompt])
        with OrtRunClock() as clock:
            if k:
                decoder = session.speculative_decoder(k, rollback=rollback)
                out = list(decoder.stream(ids, np.ones_like(ids), new_tokens, timings=timings, stats=stats))
            else:
                out = list(session.stream([prompt], new_tokens, timings=timings))
        tokens.append([int(t[0]) for t in out])
        decode_s += timings["decode_end"] - timings["decode_start"]
        run_s += clock.seconds_between(timings["decode_start"], timings["decode_end"])
        steps += len(out) - 1
    # The runtime's definition: the tokens after the first (which the prefill gives) over the decode time.
    result = {"tokens": tokens, "decode_tokens_per_s": steps / decode_s, "decode_s": decode_s}
    # the loop's own Python (binding, bookkeeping): per step of plain decoding, per round of speculative
    loops = stats.rounds if stats is not None else steps
    result["python_us_per_loop"] = 1e6 * (decode_s - run_s) / loops
    if stats is not None:
        result["speculative"] = stats.to_json()
        steps_run = stats.recompute_steps
        result["recompute_step_ms"] = 1e3 * stats.recompute_s / steps_run if steps_run else None
    return result


def _median_over(results: list[dict], key: str, plain_step_ms: float) -> float | None:
    """The median of a step cost over the rounds, relative to a plain step; None where no round ran one
    (k = 1 runs no separate draft step: its draft comes out of the verify run)."""
    values = [r["speculative"][key] for r in results if r["speculative"][key] is not None]
    return float(np.median(values)) / plain_step_ms if values else None


# Where the verify graph is cut to time its MTP layer part by part (verify_cut): each cut keeps the graph
# up to the output of the node named, the main graph and its states always.
VERIFY_CUTS = {
    "verify_main_us": None,  # predicted_ids and the main graph's states (and per-position states)
    "verify_input_projection_us": "mtp./mtp/fc/MatMul_0",  # + the pairs' embedding, norms and mtp.fc
    "verify_attention_us": "mtp./mtp/layers.0/self_attn/GatedAttention_0/MatMul_1",  # + its attention
    "verify_layer_us": "draft_hidden_states",  # + its MoE and mtp.norm
}


def verify_cut(main_path: Path, draft_path: Path, node_name: str | None):
    """The verify graph (runtime/verify_graph.py) cut after the node `node_name` of its MTP part (None: before
    it; "draft_hidden_states": before the draft's vocabulary projection): the main graph's outputs and
    states, and the cut's output; the MTP cache where the cut is past its attention."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from qwen_export.runtime.ort_decoder import PAST_PREFIX, PRESENT_PREFIX
    from qwen_export.runtime.verify_graph import DRAFT_LOGITS, MTP_STATES, compose_verify_graph

    model = compose_verify_graph(main_path, draft_path)
    graph = model.graph
    outputs = {v.name: v for v in graph.outputs}
    kept = [v for v in graph.outputs if v.name not in (DRAFT_LOGITS, "draft_hidden_states")]
    if node_name not in ("draft_hidden_states", VERIFY_CUTS["verify_attention_us"]):
        kept = [v for v in kept if not v.name.startswith(PRESENT_PREFIX + MTP_STATES)]
    if node_name == "draft_hidden_states":
        kept.append(outputs[node_name])
    elif node_name is not None:
        nodes = [n for n in graph if n.name == node_name]
        if len(nodes) != 1:
            raise SystemExit(f"verify_cut: {len(nodes)} nodes named {node_name!r} in the graph, not one")
        cut = nodes[0].outputs[0]
        hidden = outputs["draft_hidden_states"].shape[-1]  # both cuts are [batch, sequence, hidden]
        cut.dtype, cut.shape = ir.DataType.FLOAT, ir.Shape(["batch", "sequence", hidden])
        kept.append(cut)
    graph.outputs.clear()
    graph.outputs.extend(kept)
    RemoveUnusedNodesPass()(model)
    for value in list(graph.inputs):  # the MTP cache's inputs, where nothing reads them now
        if value.name.startswith(PAST_PREFIX + MTP_STATES) and not value.uses():
            graph.inputs.remove(value)
    return model


def run_costs(main, verify, draft_path: Path, context: int = 64, rounds: int = 7, runs: int = 100) -> dict:
    """Microseconds of one ONNX Runtime run, as the decode loops bind it, after a `context`-token prompt:
    the main graph's decoder `main` over 1 and 2 tokens, the verify graph's over 2 (k = 1: the main graph
    and the MTP layer beside it), and the verify graph cut before and inside its MTP layer (VERIFY_CUTS);
    the median over `rounds` alternating rounds of each one's median of `runs` runs. Their differences are
    what the second token, the verify graph's own ops and each part of the MTP layer cost, where `main` has
    the verify graph's intra-op threads."""
    from qwen_export.runtime.ort_decoder import OrtDecoder
    from qwen_export.runtime.verify_graph import NEXT_IDS

    def feeds(width: int, start: int, total: int, pairs: bool) -> dict[str, np.ndarray]:
        f = {
            "input_ids": np.full((1, width), 7, np.int64),
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(start, start + width)[None],
        }
        return f | ({NEXT_IDS: np.full((1, width), -1, np.int64)} if pairs else {})  # the MTP pairs' tokens

    threads = verify.session.get_session_options().intra_op_num_threads
    cut_decoders = {
        name: OrtDecoder(
            verify.model_path,
            optimize=True,
            threads=threads,
            graph=verify_cut(verify.model_path, draft_path, cut),
        )
        for name, cut in VERIFY_CUTS.items()
    }
    cases = {}  # name -> [decoder, the step's feeds, states after the prompt]
    for name, decoder, tokens, pairs in (
        ("main_1_token_us", main, 1, False),
        ("main_2_tokens_us", main, 2, False),
        *((name, decoder, 2, True) for name, decoder in cut_decoders.items()),
        ("verify_2_tokens_us", verify, 2, True),
    ):
        prompt = feeds(context, 0, context, pairs)
        if decoder.keeps_logits:
            prompt["logits_to_keep"] = np.array(1, np.int64)
        _, states = decoder.step_all_bound(prompt, decoder.empty_bound_states(1))
        # the same rows every run: in place, each run rewrites them
        cases[name] = [decoder, feeds(tokens, context, context + tokens, pairs), states]

    def median_run_us(case: list) -> float:
        decoder, step, states = case  # the first run after another case's on this decoder binds anew
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            if decoder.in_place:
                states = decoder.run_in_place(step, states, copy_outputs=False)[1]
            else:  # the copying path: every run from the prompt's states
                decoder.step_all_bound(step, states)
            times.append(time.perf_counter() - start)
        case[2] = states
        return 1e6 * float(np.median(times))

    for case in cases.values():
        median_run_us(case)  # warm up
    medians = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            medians[name].append(median_run_us(case))
    return {name: float(np.median(m)) for name, m in medians.items()}


def bench_target(source: dict, target: str, work: Path, args) -> dict:
    from qwen_export.build import BuildRequest, build_artifact
    from qwen_export.metrics import agreement_length
    from qwen_export.runtime.session import Session

    folder = work / target
    build_artifact(BuildRequest(out=folder, target=target, **source))
    session = Session.load(folder, threads=os.cpu_count())
    # Plain decoding at every thread count worth trying: a small model's step can be faster on one thread
    # than on two (the intra-op pool's hand-offs cost more than the second core gives), and speculative
    # decoding is held to the faster of them.
    plain_sessions = {os.cpu_count(): session}
    if os.cpu_count() > 1:
        plain_sessions[1] = Session.load(folder, threads=1)
    prompts = prompts_from_text(session, args.text, args.prompts, args.prompt_tokens)
    runs: dict[str, list[dict]] = {}
    measured = configs(session)
    for _ in range(args.rounds):
        for threads, plain_session in plain_sessions.items():
            runs.setdefault(f"0:None:{threads}", []).append(
                run_config(plain_session, prompts, args.new_tokens, 0, None)
            )
        for k, rollback in measured[1:]:
            runs.setdefault(f"{k}:{rollback}", []).append(
                run_config(session, prompts, args.new_tokens, k, rollback)
            )
    plain_key = max(
        (key for key in runs if key.startswith("0:")),
        key=lambda key: np.median([r["decode_tokens_per_s"] for r in runs[key]]),
    )
    plain = runs[plain_key]
    table = []
    for key, results in runs.items():
        k, rollback = key.split(":")[:2]
        # Leading tokens equal to the plain run's, over every prompt and round: exact on fp32 graphs; on a
        # quantized one, a k-token verify step can round an int8 activation differently from k one-token
        # steps, which may flip a near-tie.
        same = [
            agreement_length(ours, theirs) / len(theirs)
            for r in results
            for ours, theirs in zip(r["tokens"], plain[0]["tokens"], strict=True)
        ]
        rates = [r["decode_tokens_per_s"] for r in results]
        plain_rates = [p["decode_tokens_per_s"] for p in plain]
        row = {
            "k": int(k),
            "rollback": None if rollback == "None" else rollback,
            "decode_tokens_per_s": float(np.median(rates)),
            "speedup_vs_plain": float(np.median([a / b for a, b in zip(rates, plain_rates, strict=True)])),
            # the same round's ratio, lowest and highest over the rounds: this host's load moves whole runs
            "speedup_range": [
                float(f([a / b for a, b in zip(rates, plain_rates, strict=True)])) for f in (np.min, np.max)
            ],
            "tokens_equal_to_plain": float(np.mean(same)),
            "python_us_per_loop": float(np.median([r["python_us_per_loop"] for r in results])),
        }
        if not int(k):
            row["threads"] = int(key.split(":")[2])
            row["baseline"] = key == plain_key
        else:
            plain_step_ms = 1e3 / float(np.median(plain_rates))
            spec = results[-1]["speculative"]
            row |= {
                "acceptance_per_position": spec["acceptance_per_position"],
                "mean_accepted_per_round": spec["mean_accepted_per_round"],
                "draft_step_vs_plain": _median_over(results, "draft_step_ms", plain_step_ms),
                "verify_step_vs_plain": float(
                    np.median([r["speculative"]["verify_step_ms"] for r in results])
                )
                / plain_step_ms,
                "recompute_steps": spec["recompute_steps"],
            }
        table.append(row)
    best = max((r for r in table if r["k"]), key=lambda r: r["speedup_vs_plain"])
    drafts = [r["draft_step_vs_plain"] for r in table if r.get("draft_step_vs_plain") is not None]
    threads = {
        name: decoder.session.get_session_options().intra_op_num_threads
        for name, decoder in (("main", session.backend), ("verify", session.verify), ("draft", session.draft))
    }
    # the main graph with the verify graph's threads (session.py gives a small model's verify graph one), in a
    # session of its own: the plain runs' one-thread session, after nine rounds of decoding, ran the 2-token
    # step 46 us slower (377 against 331 us on ort-cpu-int4), which the parts below would have carried
    alike = Session.load(folder, threads=threads["verify"] or None)
    return {
        "target": target,
        "threads": threads,
        "run_costs": run_costs(alike.backend, session.verify, folder / "mtp.onnx"),
        "verify_in_place": bool(session.verify.in_place),
        "plain_step_ms": 1e3 / float(np.median([p["decode_tokens_per_s"] for p in plain])),
        "plain_threads": int(plain_key.split(":")[2]),
        "plain_thread_counts": sorted(plain_sessions),
        "draft_step_vs_plain": float(np.median(drafts)) if drafts else None,
        "rows": table,
        "best": best,
    }


def _ratio(row: dict) -> str:
    """The median ratio to plain decoding and its range over the rounds."""
    low, high = row["speedup_range"]
    return f"{row['speedup_vs_plain']:.2f} ({low:.2f}-{high:.2f})"


def _cost(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def render(result: dict) -> str:
    r = result
    lines = [
        "# Speculative decoding with the MTP layer: decode at batch 1",
        "",
        f"{produced_by(r)} Model: {r['source']}; {r['prompts']} prompts "
        f"of {r['prompt_tokens']} tokens from {r['text']}, {r['new_tokens']} new tokens each, greedy; "
        f"median of {r['rounds']} alternating rounds. ONNX Runtime CPU, graph optimizations on, one "
        "session per graph (main, verify, draft). 'same tokens' is the share of each prompt's tokens, up "
        "to the first difference, equal to the plain run's.",
        "",
        "Acceptance per position is vLLM's: the fraction of rounds whose j-th draft token was accepted. "
        "Draft and verify step costs are one step of mtp.onnx (the drafts after the first) and one run of "
        "the verify graph (the main graph over k+1 tokens plus any re-fed ones, and the MTP layer beside "
        "it: runtime/verify_graph.py), each over one plain decode step. 'loop Python' is the decode time "
        "spent outside ONNX Runtime's runs (binding inputs and states, the loop's bookkeeping), per step of "
        "plain decoding and per round of speculative decoding.",
        "",
    ]
    for t in result["targets"]:
        best = t["best"]
        threads = ", ".join(f"{name} {n}" for name, n in t["threads"].items())
        lines += [
            f"## `{t['target']}`: plain decode step {t['plain_step_ms']:.2f} ms; best k = {best['k']} "
            f"({best['rollback']}): {best['speedup_vs_plain']:.2f}x plain",
            "",
            f"Intra-op threads per graph (0: ONNX Runtime's default): {threads}. Plain decoding runs at "
            f"{' and '.join(map(str, t['plain_thread_counts']))} threads; 'vs plain' is against the faster, "
            f"{t['plain_threads']} thread{'s' if t['plain_threads'] > 1 else ''} (the same round's run).",
            "",
            "| k | rollback | tokens/s | vs plain (rounds) | same tokens | acceptance per position "
            "| accepted per round | draft step / plain | verify step / plain | recompute steps "
            "| loop Python (us) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in t["rows"]:
            python = f"{row['python_us_per_loop']:.0f}"
            if not row["k"]:
                plain = f"plain, {row['threads']} thread{'s' if row['threads'] > 1 else ''}"
                plain += " (the baseline)" if row["baseline"] else ""
                lines.append(
                    f"| 0 | {plain} | {row['decode_tokens_per_s']:.1f} | {_ratio(row)} | "
                    f"{row['tokens_equal_to_plain']:.0%} | | | | | | {python} |"
                )
                continue
            acc = ", ".join(f"{a:.2f}" for a in row["acceptance_per_position"])
            lines.append(
                f"| {row['k']} | {row['rollback']} | {row['decode_tokens_per_s']:.1f} | "
                f"{_ratio(row)} | {row['tokens_equal_to_plain']:.0%} | {acc} | "
                f"{row['mean_accepted_per_round']:.2f} | "
                f"{_cost(row['draft_step_vs_plain'])} | {row['verify_step_vs_plain']:.2f} | "
                f"{row['recompute_steps']} | {python} |"
            )
        lines.append("")
        tokens = 1 + best["mean_accepted_per_round"]
        draft = t["draft_step_vs_plain"]
        cost = (best["k"] - 1) * (best["draft_step_vs_plain"] or 0.0) + best["verify_step_vs_plain"]
        lines += [
            f"A round of the best configuration yields {tokens:.2f} tokens for one verify run (the main "
            f"graph over k+1 tokens and the MTP layer beside it, which drafts the next round's first token) "
            f"and k - 1 = {best['k'] - 1} draft steps: {cost:.2f} plain steps of work, {tokens / cost:.2f}x "
            "before the loop's own Python. A draft step of mtp.onnx (the k >= 2 rows) costs "
            f"{_cost(draft)} of a plain step. On this model a verify run costs well over one plain step, "
            "because a 5M-parameter model on a CPU is bound by per-op overhead and arithmetic, not by "
            "reading its weights.",
            "",
        ]
        c = t["run_costs"]
        main1, main2, verify2 = c["main_1_token_us"], c["main_2_tokens_us"], c["verify_2_tokens_us"]
        lines += [
            "Where a k = 1 verify run goes (one ONNX Runtime run as the loops bind it, 64 tokens of "
            "context, the verify graph's threads; the median of 7 alternating rounds of 100 runs each): "
            f"the main graph over 1 token {main1:.0f} us, over 2 tokens {main2:.0f} us (the second token: "
            f"{(main2 - main1) / main1:.2f} of a one-token run), the verify graph over 2 tokens "
            f"{verify2:.0f} us (the MTP layer beside the main graph: {(verify2 - main2) / main1:.2f}).",
            "",
        ]
        steps = [main2] + [c[name] for name in VERIFY_CUTS] + [verify2]
        parts = [
            "the verify graph's own ops (the greedy tokens, the pairs' tokens; per-position states where the "
            "rollback is snapshot)",
            "the pairs' embedding, two norms and mtp.fc",
            "the MTP layer's attention block",
            "its MoE block and mtp.norm",
            "the drafts' vocabulary projection",
        ]
        said = ", ".join(
            f"{part} {after - before:.0f} us"
            for part, before, after in zip(parts, steps[:-1], steps[1:], strict=True)
        )
        caveat = (
            ""
            if t["verify_in_place"]
            else " (these graphs run on the copying path, which copies every output of every run, and "
            "the cuts differ in their outputs: differences of a few tens of us are within that)"
        )
        lines += [
            f"The same rounds, the verify graph cut inside its MTP part (`verify_cut`), by difference: "
            f"{said}{caveat}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "golden" / "trained-qwen3.5-moe")
    parser.add_argument("--preset", default=None, help="A preset with an MTP layer instead of --model.")
    parser.add_argument(
        "--text", type=Path, default=None, help="Prompt text (default: the model's heldout.txt)."
    )
    parser.add_argument("--targets", nargs="+", default=["ort", "ort-cpu-int4"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()
    args.text = args.text or args.model / "heldout.txt"
    source = {"preset": args.preset} if args.preset else {"model_dir": args.model}
    with tempfile.TemporaryDirectory(prefix="bench-speculative-") as work:
        targets = [bench_target(source, t, Path(work), args) for t in args.targets]
    result = {
        **provenance(),
        "source": f"preset {args.preset}" if args.preset else shown(args.model),
        "text": shown(args.text),
        "prompts": args.prompts,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "targets": targets,
    }
    write_results(args.results, "speculative", result, render)


if __name__ == "__main__":
    main()
