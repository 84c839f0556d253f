"""Modules that a converted model holds.

:class:`Fp8Linear` keeps its FP8 weight and scales *on the module*, as parameters/buffers that
``state_dict`` shows with the names FP8 checkpoints use (``weight`` float8 ``[out, in]``,
``weight_scale``, ``input_scale``). Memory savings are therefore real, a checkpoint export is a
``state_dict`` walk, and the weight is cast once, at convert, never per call. Its forward is
one call of the ``fp8fx::linear`` op, so eager runs, dynamo graphs and later backends all see
the same op.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers torch.ops.fp8fx.*)

__all__ = ["Fp8Linear"]


class Fp8Linear(nn.Linear):
    """A Linear with an FP8 weight and a static FP8 activation scale.

    It subclasses ``nn.Linear`` so that code which checks ``isinstance(m, nn.Linear)`` (and
    ``in_features``/``out_features``) keeps working. The output has the input's dtype (the
    model's high-precision dtype, INC's ``hp_dtype``); the bias keeps the model's dtype.
    """

    def __init__(self, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
                 bias: Tensor | None, fp8_max: float) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a high-precision weight
        self.out_features, self.in_features = weight.shape
        self.fp8_max = float(fp8_max)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.detach().to(torch.float32))
        self.register_buffer("input_scale", input_scale.detach().to(torch.float32).reshape(()))

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        """``.to(device)`` moves the FP8 weight and the scales; ``.to(dtype)``/``.half()`` leave
        their dtypes alone (a cast would silently undo the quantization). The bias follows."""
        keep = {id(self.weight), id(self.weight_scale), id(self.input_scale)}

        def guarded(t):  # noqa: ANN001, ANN202
            out = fn(t)
            if id(t) in keep and isinstance(out, torch.Tensor) and out.dtype != t.dtype:
                out = t.to(out.device)
            return out

        return super()._apply(guarded, recurse)

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.dim() > 0

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.fp8fx.linear(x, self.weight, self.weight_scale, self.input_scale,
                                      self.bias, self.fp8_max)

    def extra_repr(self) -> str:
        fmt = str(self.weight.dtype).replace("torch.", "")
        gran = "per_channel" if self.per_channel else "per_tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={fmt}, weight_scale={gran}, "
                f"input_scale={self.input_scale.item():.4g}")
