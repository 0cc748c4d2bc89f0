"""The loopback DistCollective of our ONNX Runtime CPU kernel library (plugins/ort_cpu/dist_collective):
N sessions in one process, one thread each, against NumPy. all_reduce must give every rank the same bits."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qwen_export import cpu_kernels
from qwen_export.collectives import ALL_GATHER, ALL_REDUCE, LOOPBACK_DOMAIN, LOOPBACK_GROUP_INPUT, LOOPBACK_OP

_ids = itertools.count(1000)


def _rank_model(path, rank: int, nb_rank: int, ops: list[str]):
    """x -> (x * (rank + 1) -> collective) per op in `ops`, chained; tags 0, 1, ... in order."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["n", 3]))
    group = ir.Value(name=LOOPBACK_GROUP_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
    scale = ir.Value(name="scale", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
    scale.const_value = ir.tensor(np.float32(rank + 1), name="scale")
    nodes, value = [], x
    for tag, op in enumerate(ops):
        mul = ir.Node("", "Mul", [value, scale], name=f"mul{tag}")
        attrs = [
            ir.AttrString("collective_operation", op),
            ir.AttrString("reduce_op", "sum" if op == ALL_REDUCE else "none"),
            ir.AttrInt64("nb_rank", nb_rank),
            ir.AttrInt64("rank", rank),
            ir.AttrInt64("tag", tag),
        ]
        inputs = [mul.outputs[0], group]
        coll = ir.Node(LOOPBACK_DOMAIN, LOOPBACK_OP, inputs, attributes=attrs, name=f"c{tag}")
        nodes += [mul, coll]
        value = coll.outputs[0]
    value.name = "y"
    opsets = {"": 23, LOOPBACK_DOMAIN: 1}
    graph = ir.Graph([x, group], [value], nodes=nodes, initializers=[scale], opset_imports=opsets)
    ir.save(ir.Model(graph, ir_version=10), path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.register_custom_ops_library(str(cpu_kernels.library_path()))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _sessions(tmp_path, nb_rank: int, ops: list[str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return [_rank_model(tmp_path / f"r{r}-{'-'.join(ops)}.onnx", r, nb_rank, ops) for r in range(nb_rank)]


def _run_all(sessions, inputs, group: int):
    def run(rank):
        feeds = {"x": inputs[rank], LOOPBACK_GROUP_INPUT: np.array([group], np.int64)}
        return sessions[rank].run(None, feeds)[0]

    with ThreadPoolExecutor(len(sessions)) as pool:
        return list(pool.map(run, range(len(sessions))))


def _expected(inputs, ops):
    values = [np.asarray(x, np.float32) for x in inputs]
    for op in ops:
        scaled = [v * np.float32(r + 1) for r, v in enumerate(values)]
        if op == ALL_REDUCE:
            total = scaled[0].copy()
            for v in scaled[1:]:
                total += v
            values = [total] * len(values)
        else:
            values = [np.concatenate(scaled, axis=0)] * len(values)
    return values


@pytest.mark.parametrize("nb_rank", [2, 4])
@pytest.mark.parametrize("ops", [[ALL_REDUCE], [ALL_GATHER], [ALL_REDUCE, ALL_GATHER]])
def test_loopback_matches_numpy_over_repeated_runs(tmp_path, nb_rank, ops):
    sessions = _sessions(tmp_path, nb_rank, ops)
    rng = np.random.default_rng(nb_rank)
    group = next(_ids)
    for rows in (1, 5, 0, 64, 7, 3, 2, 9, 1, 33):  # ten runs in a row on one group, shapes changing
        inputs = [rng.standard_normal((rows, 3)).astype(np.float32) for _ in range(nb_rank)]
        outs = _run_all(sessions, inputs, group)
        for rank, (out, want) in enumerate(zip(outs, _expected(inputs, ops), strict=True)):
            np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6, err_msg=f"rank {rank}")
        for out in outs[1:]:  # every rank gets the same bits
            assert out.tobytes() == outs[0].tobytes()


def test_two_groups_at_once_do_not_mix(tmp_path):
    first, second = _sessions(tmp_path / "a", 2, [ALL_REDUCE]), _sessions(tmp_path / "b", 2, [ALL_REDUCE])
    a = [np.full((4, 3), 1, np.float32), np.full((4, 3), 2, np.float32)]
    b = [np.full((4, 3), 10, np.float32), np.full((4, 3), 20, np.float32)]
    with ThreadPoolExecutor(2) as pool:
        ra = pool.submit(_run_all, first, a, next(_ids))
        rb = pool.submit(_run_all, second, b, next(_ids))
        assert np.all(ra.result()[0] == 1 + 2 * 2) and np.all(rb.result()[1] == 10 + 20 * 2)


def test_a_rank_that_never_runs_fails_the_others_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_CPU_COLLECTIVE_TIMEOUT_S", "1")
    sessions = _sessions(tmp_path, 2, [ALL_REDUCE])
    feeds = {"x": np.ones((2, 3), np.float32), LOOPBACK_GROUP_INPUT: np.array([next(_ids)], np.int64)}
    with pytest.raises(Exception, match=r"rank 0 of 2\): waited 1\.0+ s, 1 of 2 ranks arrived"):
        sessions[0].run(None, feeds)


def test_ranks_that_disagree_on_the_shape_all_fail(tmp_path):
    sessions = _sessions(tmp_path, 2, [ALL_REDUCE])
    inputs = [np.ones((2, 3), np.float32), np.ones((3, 3), np.float32)]
    group = next(_ids)
    with ThreadPoolExecutor(2) as pool:
        ids = np.array([group], np.int64)
        futures = [
            pool.submit(sessions[r].run, None, {"x": inputs[r], LOOPBACK_GROUP_INPUT: ids}) for r in range(2)
        ]
        for future in futures:
            with pytest.raises(Exception, match=r"has shape \[\d, 3\], this rank \[\d, 3\]"):
                future.result()
