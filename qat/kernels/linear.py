"""`QuantizedLinear`: the inference module holding a packed weight, dispatching to the fastest kernel.

It holds exactly what the compressed-tensors checkpoint holds (codes packed along in_features, bf16
scales, integer zero points kept unpacked as int8, the shape) and picks a backend per call:

  CUDA + Triton + 2/4/8 bits       -> the fused Triton kernel (reads the canonical words directly)
  CPU with AVX2, 4 bits, bf16 scales -> our GEMV (qat.native; canonical words, float32 math)
  CPU, 4 bits, supported shape      -> torch's int4 weight-only kernel
  CPU, 8 bits, per-channel          -> torch's int8 weight-only kernel
  anything else                     -> dequantize on the fly + F.linear (the reference; nothing cached)
  layer.backend = "reference"       -> the reference, whatever the device
  layer.backend = "torch"           -> torch's CPU kernels even where our GEMV is available

torch's CPU kernels need their own layouts. They are built once, lazily (or by `prepare()`), and *replace*
the canonical tensors, so memory really is ~4 bits per weight; `state_dict()` converts back to the
canonical layout, and loading a state dict or moving the module restores it first. Inference only: no
backward through the kernels.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from qat.format.pack import pack, packed_words
from qat import native
from qat.kernels import cpu
from qat.format.reference import linear_reference

CANONICAL, CPU_INT4, CPU_INT8, CPU_NATIVE = "canonical", "cpu_int4", "cpu_int8", "cpu_native"
BACKENDS = ("auto", "torch", "reference")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports (its kernel still needs CUDA tensors, or TRITON_INTERPRET=1 on CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class QuantizedLinear(nn.Module):
    """y = x @ ((q - zp) * scale).T + bias over a compressed-tensors packed weight.

    Buffers: weight_packed (out, ceil(in*bits/32)) int32, weight_scale (out, groups) bf16,
    weight_zero_point (out, groups) int8 or None (symmetric), weight_shape [out, in] int64, bias or None.
    """

    def __init__(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                 weight_zero_point: torch.Tensor | None, in_features: int, bits: int,
                 group_size: int | None, bias: torch.Tensor | None = None):
        super().__init__()
        out_features = weight_packed.shape[0]
        groups = 1 if group_size is None else in_features // group_size
        if group_size is not None and in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
        if weight_packed.shape[1] != packed_words(in_features, bits) or weight_packed.dtype != torch.int32:
            raise ValueError(f"weight_packed must be int32 ({out_features}, "
                             f"{packed_words(in_features, bits)}), got {tuple(weight_packed.shape)}")
        if tuple(weight_scale.shape) != (out_features, groups):
            raise ValueError(f"weight_scale must be ({out_features}, {groups}), "
                             f"got {tuple(weight_scale.shape)}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("weight_scale", weight_scale)
        zp = None
        if weight_zero_point is not None:  # |zp| <= 128 for any b <= 8: int8 holds it
            zp = weight_zero_point.reshape(out_features, groups).to(torch.int8)
        self.register_buffer("weight_zero_point", zp)
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        self.register_buffer("bias", bias)
        self.register_buffer("scale_zeros", None, persistent=False)  # CPU int4 only: replaces weight_scale
        self.layout = CANONICAL
        self.kernel_group = None
        self._cpu_call = None  # (kernel fn, its tensors) as plain attributes: a buffer lookup costs ~1.5 us
        self._backend = "auto"

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                       bits: int, group_size: int | None,
                       bias: torch.Tensor | None = None) -> QuantizedLinear:
        """Build from the fake quantizer's output.

        Args:
            q: (out, in) integer codes in [-2^(b-1), 2^(b-1) - 1].
            scale: (out, groups) float scales, already representable in bf16 (stored as bf16).
            zero_point: (out, groups) integer-valued, or None when symmetric.
            group_size: None for per-channel.
        """
        scale_bf16 = scale.to(torch.bfloat16)
        if not torch.equal(scale_bf16.float(), scale.float()):
            raise ValueError("scales must be rounded through bf16 before export "
                             "(see qat.format.grid.round_scale)")
        return cls(pack(q, bits), scale_bf16, zero_point, q.shape[1], bits, group_size, bias)

    # ---- dispatch ---------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """"auto" (fastest kernel for the device), "torch" (torch's CPU kernels, not our GEMV) or
        "reference" (float32 dequantize, exact, slow)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend={value!r} is not allowed; choose one of {list(BACKENDS)}")
        self._backend = value
        self._restore()  # drops any CPU layout; "auto" rebuilds it on the next CPU forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu_call = self._cpu_call
        if cpu_call is not None and x.is_cpu:  # the decode hot path first: microseconds count there
            return cpu_call[0](x, *cpu_call[1])
        if self._backend != "reference" and x.is_cuda:
            self._restore()
            if self.triton_supported() and triton_available():
                return self._forward_triton(x)
        elif self._backend != "reference" and x.is_cpu:
            self.prepare()
            if self._cpu_call is not None:
                return self._cpu_call[0](x, *self._cpu_call[1])
        self._restore()
        return linear_reference(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                                self.bits, self.group_size, self.in_features, self.bias)

    def _forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        from qat.kernels import triton_linear  # noqa: F401 (registers torch.ops.qat.quantized_linear)

        y = torch.ops.qat.quantized_linear(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                                           self.bits, self.group_size or -1, self.in_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def triton_supported(self) -> bool:
        """2/4/8 bits, and groups made of whole int32 words."""
        whole_words = self.group_size is None or self.group_size % (32 // self.bits) == 0
        return self.bits in (2, 4, 8) and whole_words

    # ---- backend layouts ----------------------------------------------------------------------------
    def cpu_backend(self) -> str:
        """Which CPU kernel this layer can use: cpu_native, cpu_int4, cpu_int8 or canonical
        (dequantize fallback)."""
        if self.layout != CANONICAL:
            return self.layout
        if (self._backend == "auto" and native.q4_supported(self.bits, self.in_features, self.group_size,
                                                            self.weight_scale.dtype)
                and native.available()):
            return CPU_NATIVE
        if self.weight_scale is not None and self.weight_scale.dtype not in cpu.KERNEL_DTYPES:
            return CANONICAL  # fp32 scales would be rounded by the bf16/fp16 kernels
        if self.bits == 4 and cpu.int4_kernel_group(self.out_features, self.in_features, self.group_size):
            return CPU_INT4
        if self.bits == 8 and cpu.int8_supported(self.in_features, self.group_size):
            return CPU_INT8
        return CANONICAL

    @torch.no_grad()
    def prepare(self) -> None:
        """Convert to the CPU kernel's layout now (a no-op off CPU, when done, or for "reference")."""
        if self.layout != CANONICAL or self.weight_packed.device.type != "cpu" or self._backend == "reference":
            return
        backend = self.cpu_backend()
        if backend == CPU_NATIVE:  # the canonical tensors themselves: nothing to convert
            self._cpu_call = (native.linear_q4, (self.weight_packed, self.weight_scale,
                                                 self.weight_zero_point, self.group_size,
                                                 self.in_features, self.bias))
        elif backend == CPU_INT4:
            self.weight_packed, self.scale_zeros, self.kernel_group = cpu.prepare_int4(
                self.weight_packed, self.weight_scale, self.weight_zero_point, self.in_features,
                self.group_size)
            self.weight_scale = None
            self._cpu_call = (cpu.linear_int4, (self.weight_packed, self.scale_zeros, self.kernel_group,
                                                self.bias))
        elif backend == CPU_INT8:
            self.weight_packed = cpu.prepare_int8(self.weight_packed, self.in_features)
            self._cpu_call = (cpu.linear_int8, (self.weight_packed, self.weight_scale,
                                                self.weight_zero_point, self.bias))
        self.layout = backend

    @torch.no_grad()
    def canonical_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight_packed, weight_scale) in the checkpoint layout, whatever layout is held."""
        if self.layout == CPU_INT4:
            return cpu.restore_int4(self.weight_packed, self.scale_zeros, self.in_features, self.group_size)
        if self.layout == CPU_INT8:
            return cpu.restore_int8(self.weight_packed), self.weight_scale
        return self.weight_packed, self.weight_scale

    def _restore(self) -> None:
        if self.layout != CANONICAL:
            self.weight_packed, self.weight_scale = self.canonical_tensors()
            self.scale_zeros, self.kernel_group, self.layout = None, None, CANONICAL
        self._cpu_call = None

    def weight_bytes(self) -> int:
        """Bytes held for the weight (codes in whatever layout, scales, zero points); bias not counted."""
        tensors = (self.weight_packed, self.weight_scale, self.weight_zero_point, self.scale_zeros)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # ---- state dict and device moves always see the canonical layout --------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != CANONICAL:
            packed, scale = self.canonical_tensors()
            destination[prefix + "weight_packed"], destination[prefix + "weight_scale"] = packed, scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._restore()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._restore()
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.weight_zero_point is None}, "
                f"bias={self.bias is not None}, layout={self.layout}")
