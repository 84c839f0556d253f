"""Kernels of the fp8fx ops, as plain functions of tensors (no op registration here).

:mod:`fp8fx.ops` registers the ops with ``torch.library`` and dispatches to these;
:mod:`fp8fx.kernels.linear` holds the definition of ``fp8fx::linear`` (``linear_reference``) and
its fast CPU kernel (``linear_fast``). Every fast kernel specializes the one quantization
family of :mod:`fp8fx.numerics` and the format table of :mod:`fp8fx.fp8`; ``tests/test_ops.py``
checks each specialization bit for bit against them. Importing this package has no side effects.
"""
