"""The qwen op signatures the fusions emit are the ones docs/ops.md specifies: inputs in order, outputs,
attribute names and types (test_fusion_structure checks the fused functions carry these signatures)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qwen_export.passes.qwen_ops import OPS

OPS_DOC = Path(__file__).resolve().parents[1] / "docs" / "ops.md"


def parse_ops_doc(text: str) -> dict[str, dict]:
    """{op: {"inputs": [...], "outputs": [...], "int": [...], "float": [...]}} from the spec's tables."""
    specs: dict[str, dict] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        name = section.split("\n", 1)[0].strip()
        spec = {"inputs": [], "outputs": [], "int": [], "float": []}
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 2:
                continue
            kind = cells[0]
            if re.fullmatch(r"input \d+", kind):
                spec["inputs"].append(cells[1].split()[0])
            elif re.fullmatch(r"output \d+", kind):
                spec["outputs"].append(cells[1].split()[0])
            elif kind.startswith("attribute"):
                words = re.findall(r"[A-Za-z_]+", " ".join(cells[1:]))
                for i, word in enumerate(words):
                    if word not in ("int", "float"):
                        kind_of = next(w for w in words[i + 1 :] if w in ("int", "float"))
                        spec[kind_of].append(word)
        specs[name] = spec
    return specs


def test_every_spec_op_has_a_signature_and_back():
    assert set(parse_ops_doc(OPS_DOC.read_text())) == set(OPS)


@pytest.mark.parametrize("op", sorted(OPS))
def test_signature_matches_docs(op):
    spec = parse_ops_doc(OPS_DOC.read_text())[op]
    sig = OPS[op]
    assert list(sig.inputs) == spec["inputs"]
    assert list(sig.outputs) == spec["outputs"]
    assert list(sig.int_attributes) == spec["int"]
    assert list(sig.float_attributes) == spec["float"]
