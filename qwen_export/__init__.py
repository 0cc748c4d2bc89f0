"""qwen-export: export Qwen3.5-family hybrid-attention MoE models to validated deployments."""

__version__ = "0.1.0"
