"""Graph passes: cleanup, fusion into the qwen op set (docs/ops.md), and lowering per target.

One pass per module. `pipeline.pipeline(target)` builds the list for a target; `manager.PassManager`
runs a list and records each pass (time, memory, graph size, op changes, numeric drift). The design of
the fused ops (model-local functions, nesting, naming) is described in `functions.py` and docs/passes.md.
"""
