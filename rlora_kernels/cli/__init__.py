"""Command-line interface for rlora_kernels."""
