"""Quantized linear layers: a block's weights kept as int8 or int4 in memory, and products that read them so.

Decode reads every weight once per token, so bytes per weight set its speed and a peer's memory sets
how many blocks it holds. The products are torch's weight-only CPU kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`). They are vectorized for bfloat16 activations only: with float32 or
float16 inputs they fall back to scalar loops 10-40x slower (docs/models.md has the measurements).
So a quantized product takes its input in bfloat16 and returns the compute precision; norms,
attention and the residual stream stay in the span's dtype.

int8: one symmetric scale per output channel. int4: groups of 32 inputs with a scale and a zero,
`w = (q - 8) * scale + zero`, which a GGUF's Q4_0 (`(q - 8) * d`) and Q4_1 (`q * d + m`) blocks are
exactly: their 4-bit values are kept as they are (`from_gguf_q4`). The kernel takes scales and zeros
in bfloat16, so those are rounded to it: far below the 4-bit step itself.
"""
from __future__ import annotations

import torch
from torch import nn

from swarm.dtypes import QuantName
from swarm.errors import QuantizationError, WeightsError

GROUP = 32  # inputs per int4 scale: a GGUF Q4 block
INT4_OUT_MULTIPLE = 16  # the int4 packing's tile of output channels
KERNEL_DTYPE = torch.bfloat16


class QuantizedLinear(nn.Module):
    """y = x W^T (+ b) with W held quantized; subclasses say how W is stored and multiplied."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        out = self.product(flat).to(x.dtype).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    weight: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out], bfloat16 bits
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """Quantize a float [out, in] weight: per output channel, the largest magnitude maps to 127."""
        super().__init__(weight.shape[1], weight.shape[0], bias)
        weight = weight.float()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.register_buffer("weight", (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", _as_bits(scales))

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(flat, self.weight, self.scales.view(KERNEL_DTYPE))


class Int4Linear(QuantizedLinear):
    packed: torch.Tensor  # the kernel's tiled layout of the 4-bit values
    scales_and_zeros: torch.Tensor  # [in / GROUP, out, 2], bfloat16 bits
    def __init__(self, values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None = None):
        """values: [out, in] integers 0..15; scales, zeros: [out, in / GROUP]; w = (values - 8) * scale + zero."""
        out_features, in_features = values.shape
        super().__init__(in_features, out_features, bias)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 2))
        self.register_buffer("scales_and_zeros", _as_bits(torch.stack([scales, zeros], dim=-1).transpose(0, 1)))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Quantize a float [out, in] weight per group of 32 inputs, from each group's minimum to its maximum."""
        out_features, in_features = weight.shape
        groups = weight.float().view(out_features, in_features // GROUP, GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        values = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15).view(out_features, in_features)
        return cls(values, scales, low + 8 * scales, bias)

    @classmethod
    def from_gguf_q4(cls, quants: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                     bias: torch.Tensor | None = None) -> "Int4Linear":
        """A GGUF Q4_0/Q4_1 tensor as stored: quants [out, in/32, 16] bytes holding element j in the low and
        j + 16 in the high nibble of byte j, d and m [out, in/32] (Q4_0: m = -8 d); w = q d + m."""
        values = _gguf_q4_values(quants).flatten(-2)
        d, m = d.float(), m.float()
        return cls(values, d, m + 8 * d, bias)

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_and_zeros.view(KERNEL_DTYPE))


def _as_bits(values: torch.Tensor) -> torch.Tensor:
    """The kernel's bfloat16 values kept as int16 bits, so that casting the block to its dtype leaves them alone."""
    return values.to(KERNEL_DTYPE).contiguous().view(torch.int16)


GGUF_Q4_PARTS = ("quants", "d", "m")  # suffixes of a GGUF Q4 weight's tensors in a block's state


def load_block(layer: nn.Module, state: dict[str, torch.Tensor], quant: QuantName) -> None:
    """Load a block's weights into its (meta) layer, its nn.Linear layers replaced by quantized ones.

    A linear whose weight came as a GGUF Q4 tensor (`<name>.weight.quants`, `.d`, `.m`) keeps its
    4-bit values under int4; every other weight is quantized from its float values.
    """
    rest = state
    if quant != "none":  # copied: a tensor left pointing into the memory-mapped file keeps all of the file resident
        rest = {name: tensor.clone() for name, tensor in _quantize_linears(layer, dict(state), quant).items()}
    quantized = {f"{name}.{buffer}" for name, module in layer.named_modules() if isinstance(module, QuantizedLinear)
                 for buffer, _ in module.named_buffers(recurse=False)}
    missing, unexpected = layer.load_state_dict(rest, strict=False, assign=True)
    if unexpected or set(missing) - quantized:
        raise WeightsError(f"a block's weights do not fit its layer: missing {sorted(set(missing) - quantized)}, "
                           f"unexpected {sorted(unexpected)}")


def _quantize_linears(layer: nn.Module, state: dict[str, torch.Tensor], quant: QuantName) -> dict[str, torch.Tensor]:
    """Replace the nn.Linear layers by quantized ones built from `state`; return the tensors left to load."""
    for name in [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
        key = f"{name}.weight"
        bias = state.pop(f"{name}.bias", None)
        gguf = [f"{key}.{part}" for part in GGUF_Q4_PARTS]
        if quant == "int4" and all(part in state for part in gguf):
            quants, d, m = (state.pop(part) for part in gguf)
            module: QuantizedLinear = Int4Linear.from_gguf_q4(quants, d, m, bias)
        else:
            weight = state.pop(key) if key in state else _dequantized(state, key)
            module = Int8Linear(weight, bias) if quant == "int8" else Int4Linear.from_float(weight, bias)
        parent, _, child = name.rpartition(".")
        layer.get_submodule(parent).register_module(child, module)
    for key in [k.removesuffix(".quants") for k in state if k.endswith(".quants")]:
        state[key] = _dequantized(state, key)  # a 4-bit weight outside the linear layers (stacked experts)
    return state


def dequantize_gguf_q4(quants: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The float32 weight of a GGUF Q4 tensor, computed as gguf-py does (q d + m in float32)."""
    return (d.float()[..., None] * _gguf_q4_values(quants).float() + m.float()[..., None]).flatten(-2)


def _gguf_q4_values(quants: torch.Tensor) -> torch.Tensor:
    """[out, in/32, 32] 4-bit values of a Q4 tensor's [out, in/32, 16] bytes: element j low, j + 16 high nibble."""
    return torch.cat([quants & 0x0F, quants >> 4], dim=-1)


def _dequantized(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if f"{key}.quants" not in state:
        raise QuantizationError(f"the block's weights have no {key}")
    return dequantize_gguf_q4(*(state.pop(f"{key}.{part}") for part in GGUF_Q4_PARTS))


def check_quantizable(layer: nn.Module, quant: QuantName, device: torch.device) -> None:
    """Raise QuantizationError before loading if the device or a block's linear shapes do not fit the kernels."""
    if quant == "none":
        return
    if device.type != "cpu":
        raise QuantizationError(f"--quant {quant} runs on a CPU only in this version (its kernels are torch's CPU "
                                f"ones): serve {device} with --quant none")
    if quant != "int4":
        return
    for name, linear in layer.named_modules():
        if isinstance(linear, nn.Linear) and (linear.in_features % GROUP or linear.out_features % INT4_OUT_MULTIPLE):
            raise QuantizationError(
                f"--quant int4 needs linear layers with inputs divisible by {GROUP} and outputs by "
                f"{INT4_OUT_MULTIPLE}; {name} is {linear.in_features} -> {linear.out_features}: use --quant int8")


def weight_bytes(layer: nn.Module, quant: QuantName, itemsize: int) -> int:
    """Bytes a block's weights take in memory under `quant`, the rest at `itemsize` bytes per value."""
    total = 0
    for module in layer.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.Linear) and quant != "none":
            out_features, in_features = module.weight.shape
            if quant == "int8":
                total += out_features * in_features + out_features * KERNEL_DTYPE.itemsize
            else:
                total += out_features * in_features // 2 + 2 * out_features * (in_features // GROUP) * KERNEL_DTYPE.itemsize
            own = [p for p in own if p is not module.weight]
        total += sum(p.numel() for p in own) * itemsize
    return total
