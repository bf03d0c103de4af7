"""Triton kernels of maefast, shipped as `maefast.kernels`. Importing this package does not import
triton; each kernel module does, and is imported only when a Triton impl is chosen."""
