"""`build --multimodal`: the vision tower and the token embedding go through the target's passes beside the
text tower (qwen_export/targets.py declares each target's vision and embed pipelines).

The numeric check of a multimodal build runs every stage in ONNX Runtime (optimizations off):

- vision.onnx: `vision_embeds` for three grids (one image, a two-temporal-patch video, two images of
  different sizes in one call) against transformers' own vision tower and against the previous stage;
- model.onnx (inputs_embeds + mRoPE): the text check's cases with the prompt embedded by the checkpoint's
  table and equal positions on the three mRoPE axes (a text-only prompt), against the golden reference
  when there is one, else against transformers run live on the same prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from qwen_export.artifact import MODEL_FILE
from qwen_export.exporter.checkpoint import Checkpoint
from qwen_export.exporter.export import EMBED_FILE, VISION_FILE
from qwen_export.exporter.model import build_decoder
from qwen_export.exporter.spec import ModelSpec
from qwen_export.exporter.vision import build_vision_encoder
from qwen_export.exporter.vision_embed import build_token_embedder
from qwen_export.exporter.vision_spec import VisionSpec, vision_spec_from_config
from qwen_export.golden.store import make_prompt
from qwen_export.passes.numerics import TOLERANCE, CaseOutputs, NumericCheck, saved_model

if TYPE_CHECKING:
    from qwen_export.passes.manager import PipelineReport
    from qwen_export.targets import Target

# grid_thw per vision check case: every image or frame is its own attention segment.
VISION_CASES: dict[str, list[list[int]]] = {
    "image": [[1, 8, 12]],
    "video": [[2, 4, 4]],
    "two_images": [[1, 4, 6], [1, 2, 2]],
}


@dataclass
class MultimodalGraphs:
    text: ir.Model
    vision: ir.Model
    embed: ir.Model
    vspec: VisionSpec

    @property
    def text_vocab(self) -> int:
        return int(embed_table(self.embed).shape[0])


def build_multimodal_graphs(
    spec: ModelSpec, ckpt: Checkpoint, config: dict[str, Any], config_path: Path
) -> MultimodalGraphs:
    """The three graphs of a multimodal export (fp32), as exporter/export.py writes them."""
    vspec = vision_spec_from_config(config, config_path)
    text = build_decoder(spec, ckpt, multimodal=True, mrope_section=vspec.mrope_section)
    return MultimodalGraphs(text, build_vision_encoder(vspec, ckpt), build_token_embedder(spec, ckpt), vspec)


def vision_case_inputs(vspec: VisionSpec, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(pixel_values, grid_thw) per case: seeded normal pixels, the scale of normalised images."""
    rng = np.random.default_rng(seed)
    cases = {}
    for name, grid in VISION_CASES.items():
        grid_thw = np.array(grid, np.int64)
        patches = int(grid_thw.prod(axis=1).sum())
        cases[name] = (rng.standard_normal((patches, vspec.patch_dim)).astype(np.float32), grid_thw)
    return cases


def reference_vision_features(model: Any, vspec: VisionSpec) -> dict[str, np.ndarray]:
    """transformers' vision tower (`model.model.visual`, the merger's output) on the check's cases."""
    import torch

    features = {}
    with torch.no_grad():
        for name, (pixels, grid) in vision_case_inputs(vspec).items():
            out = model.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid))
            features[name] = out.pooler_output.float().numpy()
    return features


class VisionCheck(NumericCheck):
    """The numeric check of vision.onnx stages (the pass manager's `check`): `vision_embeds` per case
    against the reference features and the previous stage (reported in the logits columns)."""

    def __init__(
        self, vspec: VisionSpec, reference: dict[str, np.ndarray] | None, tolerance: float = TOLERANCE
    ):
        self.vspec = vspec
        self.reference = reference
        self.golden = None
        self.tolerance = tolerance

    def run(self, model: ir.Model) -> dict[str, CaseOutputs]:
        import onnxruntime as ort

        from qwen_export.runtime.multimodal_inputs import vision_graph_feeds
        from qwen_export.runtime.ort_decoder import session_options

        with saved_model(model) as path:
            options = session_options(False)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            wanted = {i.name for i in session.get_inputs()}
            outputs = {}
            for name, (pixels, grid) in vision_case_inputs(self.vspec).items():
                feeds = vision_graph_feeds(pixels, grid, self.vspec)
                features = session.run(None, {k: v for k, v in feeds.items() if k in wanted})[0]
                outputs[name] = CaseOutputs(np.asarray(features, np.float32), {})
            del session  # it holds the stage's files open
        return outputs

    def _golden(self, case: str) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        return (None if self.reference is None else self.reference[case]), {}


class LiveReference:
    """What the text check reads from a golden reference, computed by transformers on the spot (a local
    multimodal checkpoint has no stored golden): prefill logits, the greedy prompt's first token and the
    next step's logits. No states (the check then compares states stage to stage only)."""

    def __init__(self, model: Any, vocab_size: int):
        import torch

        self._prefill: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        with torch.no_grad():
            for length in (65, 200):
                ids = make_prompt(vocab_size, length)
                self._prefill[length] = (ids, model(input_ids=torch.from_numpy(ids)).logits.float().numpy())
            self.greedy_prompt = make_prompt(vocab_size, 16, seed=1)
            first = model(input_ids=torch.from_numpy(self.greedy_prompt)).logits[:, -1:].argmax(-1)
            both = np.concatenate([self.greedy_prompt, first.numpy()], axis=1)
            step = model(input_ids=torch.from_numpy(both)).logits[:, -1:].float().numpy()
        self.greedy_tokens = first.numpy()
        # golden.greedy_logits[:, 1:2] is the step after the first greedy token
        self.greedy_logits = np.concatenate([np.zeros_like(step), step], axis=1)
        self.manifest = {"source": "transformers (live)"}

    def prefill(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        return self._prefill[length]

    def final_states(self) -> dict[str, np.ndarray]:
        return {}


class EmbedsCheck(NumericCheck):
    """NumericCheck for the multimodal text graph: each prompt embedded with the checkpoint's token table
    (what embed.onnx computes) and the same position on the three mRoPE axes."""

    def __init__(self, reference: Any, embed_table: np.ndarray, tolerance: float = TOLERANCE):
        super().__init__(reference, vocab_size=embed_table.shape[0], tolerance=tolerance)
        self.table = embed_table

    def decoder(self, path: Path) -> Any:
        from qwen_export.multimodal_tools import TextEmbedsDecoder
        from qwen_export.runtime.multimodal import EmbedsDecoder

        return TextEmbedsDecoder.wrap(EmbedsDecoder(path), self.table.__getitem__)


def embed_table(embed: ir.Model) -> np.ndarray:
    """The token table embed.onnx gathers from (fp32)."""
    gather = next(n for n in embed.graph if n.op_type == "Gather")
    table = gather.inputs[0]
    assert table is not None and table.const_value is not None, "embed.onnx's table is not an initializer"
    return table.const_value.numpy().astype(np.float32)


class MultimodalBuild:
    """The vision tower and token embedding of one `build --multimodal`, beside the text tower's pipeline:
    `export` -> (`checks`) -> `run_passes` -> `save` -> `manifest`."""

    def __init__(self, graphs: MultimodalGraphs, target: Target, source_dir: Path):
        self.graphs = graphs
        self.target = target
        self.source_dir = source_dir
        self.pipelines = target.vision_passes()
        self.vision_check: VisionCheck | None = None
        self.reports: dict[str, PipelineReport] = {}

    @classmethod
    def export(
        cls, spec: ModelSpec, ckpt: Checkpoint, config: dict[str, Any], source_dir: Path, target: Target
    ) -> MultimodalBuild:
        return cls(
            build_multimodal_graphs(spec, ckpt, config, source_dir / "config.json"), target, source_dir
        )

    def checks(self, golden: Any, log: Callable[[str], None] | None) -> EmbedsCheck:
        """The text tower's check (returned, for the text pipeline) and the vision tower's (kept): both
        against transformers' reference, the stored golden's for text where there is one."""
        from qwen_export.golden.reference import load_reference

        reference = load_reference(self.source_dir)
        if golden is None:
            if log:
                log("no stored golden for this model: the check runs transformers' reference on the spot")
            golden = LiveReference(reference, self.graphs.text_vocab)
        self.vision_check = VisionCheck(
            self.graphs.vspec, reference_vision_features(reference, self.graphs.vspec)
        )
        return EmbedsCheck(golden, embed_table(self.graphs.embed))

    def run_passes(
        self, verify: bool | None, on_start: Callable | None = None, on_end: Callable | None = None
    ) -> None:
        from qwen_export.passes.manager import PassManager

        vision = PassManager(
            self.pipelines.vision, check=self.vision_check, verify=verify, on_start=on_start, on_end=on_end
        )
        self.graphs.vision, self.reports["vision"] = vision.run(self.graphs.vision)
        embed = PassManager(self.pipelines.embed, verify=verify, on_start=on_start, on_end=on_end)
        self.graphs.embed, self.reports["embed"] = embed.run(self.graphs.embed)

    @property
    def check_passed(self) -> bool | None:
        report = self.reports.get("vision")
        if report is None or not report.checked:
            return None
        return report.first_failure is None

    def merge_into(self, text: PipelineReport) -> None:
        """A vision stage out of tolerance fails the build's check as a text stage would."""
        vision = self.reports["vision"]
        if text.first_failure is None and vision.first_failure is not None:
            text.first_failure = f"{VISION_FILE} {vision.first_failure}"

    def save(self, folder: Path) -> list[str]:
        """Write vision.onnx and embed.onnx (each with its .data file); returns the files written."""
        from qwen_export.exporter.export import save_model

        files = []
        for name, model in ((VISION_FILE, self.graphs.vision), (EMBED_FILE, self.graphs.embed)):
            save_model(model, folder / name)
            files += [name, name + ".data"]
        return files

    def manifest(self) -> dict[str, Any]:
        """The manifest's "multimodal" section: what the runtime reads (graphs, vision spec, I/O) as an
        export writes it, plus each tower's passes and fused ops."""
        return {
            "graphs": {"text": MODEL_FILE, "vision": VISION_FILE, "embed": EMBED_FILE},
            "vision_spec": self.graphs.vspec.to_json(),
            "io": {"vision": graph_io(self.graphs.vision), "embed": graph_io(self.graphs.embed)},
            "passes": {
                tower: [{"name": r.name, "modified": r.modified, "fired": r.stats.fired} for r in rep.records]
                for tower, rep in self.reports.items()
            },
            "fused_ops": {
                tower: {k: v for r in rep.records for k, v in r.stats.fired.items() if v}
                for tower, rep in self.reports.items()
            },
            "nodes": {VISION_FILE: len(self.graphs.vision.graph), EMBED_FILE: len(self.graphs.embed.graph)},
            "check": {tower: rep.to_json() if rep.checked else None for tower, rep in self.reports.items()},
        }


def graph_io(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    """A graph's inputs and outputs as the manifests list them (name, dtype, shape with symbolic dims)."""

    def entry(value: ir.Value) -> dict[str, Any]:
        shape = [] if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
        dtype = value.type.dtype.name.lower() if value.type is not None else None
        return {"name": value.name, "dtype": dtype, "shape": shape}

    return {
        "inputs": [entry(v) for v in model.graph.inputs],
        "outputs": [entry(v) for v in model.graph.outputs],
    }
