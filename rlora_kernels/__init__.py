"""Riemannian LoRA kernels."""
