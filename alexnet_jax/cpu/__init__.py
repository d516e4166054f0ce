"""CPU kernels: oneDNN convolutions and fused kernels as XLA FFI calls, with the
XLA and malloc settings of CPU runs.

Everything here is an alternative implementation of `alexnet_jax.ops` for
JAX's CPU backend, or a process setting for it; `alexnet_jax.backend` is the
only module of the package that imports it. README.md in this folder says why
each kernel exists and what it gained.
"""
