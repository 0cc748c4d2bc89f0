"""qwen_export.runtime."""
