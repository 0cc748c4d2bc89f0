"""qwen_export.exporter."""
