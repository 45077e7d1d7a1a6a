"""Triton helpers the kernels share (imported only by the *_triton.py modules: it needs triton)."""
import triton
import triton.language as tl


@triton.jit
def tanh_cap(x, cap):
    """cap tanh(x / cap) in float32, with tanh(y) = 2 sigmoid(2y) - 1."""
    return cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0)
