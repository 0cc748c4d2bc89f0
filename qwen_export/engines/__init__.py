"""Per-GPU TensorRT / TensorRT-RTX engines: deployment spec, graph preparation, engine cache, manifest."""
