"""qwen_export.passes."""
