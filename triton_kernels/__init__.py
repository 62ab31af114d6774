"""Triton kernels, installed as `attnkit.triton_kernels` (one file per kernel family).

They run on CUDA GPUs, and on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set before triton is imported), which is how the test
suite checks the kernel code on machines without a GPU.
"""
