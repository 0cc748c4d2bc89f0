"""qwen_export.golden."""
