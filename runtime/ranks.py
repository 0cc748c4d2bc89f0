"""A sharded ("ranks") artifact on ONNX Runtime: the N rank graphs run together in one process.

Each rank is its own InferenceSession. A step runs all of them at once, one thread per rank (ONNX Runtime
releases the GIL), and their loopback DistCollective nodes meet in memory (plugins/ort_cpu/dist_collective):
every rank ends with the same, whole logits. Each rank carries its own states (its heads' KV cache, conv
and recurrent state); they are kept here as `<suffix>@<rank>`, so the decode loop of OrtDecoder (prefill,
greedy) runs unchanged on top.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.collectives import LOOPBACK_GROUP_INPUT
from qwen_export.errors import QwenExportError
from qwen_export.runtime.ort_decoder import PAST_PREFIX, OrtDecoder, StepOutput

_groups = itertools.count(1)


def check_ranks(folder: Path, info: dict[str, Any]) -> list[Path]:
    """The rank folders of a ranks artifact, each checked to be present and from this build."""
    from qwen_export.ranks import RANK_INFO_FILE, rank_folder

    tp, build_id = info.get("tp"), info.get("build_id")
    if not isinstance(tp, int) or tp < 1 or not build_id:
        raise QwenExportError(f"{folder}: a ranks manifest needs tp and build_id (rebuild the artifact)")
    folders = []
    for rank in range(tp):
        path = rank_folder(folder, rank)
        rank_info = path / RANK_INFO_FILE
        if not rank_info.is_file():
            raise QwenExportError(
                f"{folder}: rank {rank} of {tp} is missing ({path} has no {RANK_INFO_FILE})"
            )
        stated = json.loads(rank_info.read_text())
        if stated.get("build_id") != build_id or stated.get("rank") != rank:
            raise QwenExportError(
                f"{path}: rank {stated.get('rank')} of build {stated.get('build_id')}, but the manifest "
                f"wants rank {rank} of build {build_id} (a rank folder copied from another build): "
                "rebuild or copy the whole artifact"
            )
        folders.append(path)
    return folders


class RankedDecoder(OrtDecoder):
    """The OrtDecoder interface over N rank sessions that meet at their collectives."""

    name = "onnxruntime (ranks)"

    def __init__(
        self,
        rank_folders: list[Path],
        optimize: bool = False,
        threads: int | None = None,
        state_layout: list[dict[str, Any]] | None = None,
    ):
        from qwen_export.artifact import MODEL_FILE

        # One intra-op thread per rank by default: the ranks already run in parallel.
        self.ranks = [
            OrtDecoder(folder / MODEL_FILE, optimize=optimize, threads=threads or 1)
            for folder in rank_folders
        ]
        first = self.ranks[0]
        self.emulated = any(r.emulated for r in self.ranks)
        self.inputs = {n: i for n, i in first.inputs.items() if n != LOOPBACK_GROUP_INPUT}
        self.output_names = first.output_names
        self.state_suffixes = [f"{s}@{r}" for r, d in enumerate(self.ranks) for s in d.state_suffixes]
        self.device = "cpu"
        self.vocab_size = first.vocab_size
        # One id per decoder: two of them in one process never meet at each other's collectives.
        self._group = np.array([os.getpid() * 1_000_003 + next(_groups)], np.int64)
        self._state_layout = {s["name"].removeprefix(PAST_PREFIX): s for s in state_layout or []}
        self._pool = ThreadPoolExecutor(max_workers=len(self.ranks), thread_name_prefix="qwen-rank")

    def empty_states(self, batch: int) -> dict[str, np.ndarray]:
        return {f"{s}@{r}": v for r, d in enumerate(self.ranks) for s, v in d.empty_states(batch).items()}

    def run_feeds(self, feeds: dict[str, np.ndarray], states: Mapping[str, np.ndarray]) -> StepOutput:
        feeds = {**feeds, LOOPBACK_GROUP_INPUT: self._group}

        def run(rank: int) -> StepOutput:
            mine = {k.rsplit("@", 1)[0]: v for k, v in states.items() if k.endswith(f"@{rank}")}
            return self.ranks[rank].run_feeds(feeds, mine)

        outs = list(self._pool.map(run, range(len(self.ranks))))
        present = {f"{s}@{r}": v for r, out in enumerate(outs) for s, v in out.states.items()}
        return StepOutput(outs[0].logits, present, outs[0].extra)

    def whole_states(self, states: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The ranks' state shards put back together as the unsharded model holds them (the layout cuts
        every state along its head or channel dimension, axis 1 after the batch)."""
        whole = {}
        for suffix, info in self._state_layout.items():
            shards = [states[f"{suffix}@{r}"] for r in range(len(self.ranks))]
            shape = list(shards[0].shape)
            shape[1] = info["shape"][0]
            out = np.zeros(shape, shards[0].dtype)
            for rank, shard in enumerate(shards):
                index = np.concatenate([np.arange(a, b) for a, b in _runs(info["splits"], rank, shape[1])])
                out[:, index] = shard
            whole[suffix] = out
        return whole

    # Bound execution (IOBinding) keeps states as ORT values; the ranks keep numpy states instead.
    def empty_bound_states(self, batch: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        return self.empty_states(batch)

    def step_bound(self, input_ids, attention_mask, position_ids, states):  # type: ignore[override]
        out = self.step(input_ids, attention_mask, position_ids, states)
        return out.logits[:, -1], out.states

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _runs(splits: list[dict[str, Any]], rank: int, size: int) -> tuple[tuple[int, int], ...]:
    """The [start, stop) runs of a state's dimension 0 that `rank` holds (qwen_export.layout.Split)."""
    from qwen_export.layout import Split

    if not splits:
        return ((0, size),)
    (split,) = splits
    assert split["dim"] == 0, split
    return Split(split["dim"], split["pieces"], tuple(split["sections"]), split["stride"]).ranges(rank)


def ranks_root(model_path: str | Path) -> Path | None:
    """The ranks artifact a rank's model file belongs to (OUT/ranks/<r>/model.onnx -> OUT), or None."""
    from qwen_export.artifact import MANIFEST_FILE, RANKS_FORMAT
    from qwen_export.ranks import RANKS_DIR

    path = Path(model_path)
    root = path.parent.parent.parent
    if path.parent.parent.name != RANKS_DIR or not (root / MANIFEST_FILE).is_file():
        return None
    info = json.loads((root / MANIFEST_FILE).read_text())
    return root if info.get("format") == RANKS_FORMAT else None


def open_decoder(
    model_path: str | Path,
    optimize: bool = False,
    providers: list[str] | None = None,
    threads: int | None = None,
) -> OrtDecoder:
    """The decoder for an ONNX artifact's model file: all ranks together when it is one rank of a sharded
    build, else the one graph."""
    from qwen_export.artifact import MANIFEST_FILE

    root = ranks_root(model_path)
    if root is None:
        return OrtDecoder(model_path, optimize=optimize, providers=providers, threads=threads)
    info = json.loads((root / MANIFEST_FILE).read_text())
    states = info.get("layout", {}).get("states", [])
    return RankedDecoder(check_ranks(root, info), optimize=optimize, threads=threads, state_layout=states)
