"""Fused, chunked reductions: each op with a reference, a torch and a Triton implementation."""
