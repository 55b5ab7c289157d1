"""Our own CPU kernels (csrc/*.c): the 4-bit decode GEMV, the int8 embedding head, and fused fake
quantization for QAT.

Why: at batch 1 torch's int4 kernel is blocked for GEMM and runs in bf16, which this kind of CPU
emulates; a row-by-row AVX2 GEMV over the canonical compressed-tensors words needs no layout
conversion, computes in float32 (so served == reference up to summation order) and is as fast or
faster. The C file is compiled once with the system C compiler into the qat cache (atomically) and
called through ctypes, which releases the GIL. No compiler, no AVX2/FMA, or QAT_NATIVE=0: not
`available()`, and QuantizedLinear falls back to torch's kernels.

Fake quantization (csrc/fake_quant.c) runs the forward grid and the straight-through mask in one
pass each, bit-identical to the torch ops it replaces (tests/test_native.py).

Calls with more than MAX_ROWS rows of x (prefill of long prompts, evaluation) are GEMM-shaped: they
dequantize to float32 and use F.linear instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("gemv.c", "decode_step.c",
                                                                "fake_quant.c", "team.c")]
HEADERS = [Path(__file__).parent / "csrc" / name for name in ("q4.h", "team.h")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-DTHREADED_MIN=200000", "-shared",
         "-fPIC"]
MAX_ROWS = 16  # rows of x above which a dequantize + F.linear (GEMM) is faster than M GEMVs


def _cache_dir() -> Path:
    return Path(os.environ.get("QAT_CACHE", "~/.cache/qat")).expanduser() / "kernels"


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return "avx2" in flags and "fma" in flags


def build(directory: Path | None = None) -> Path:
    """Compile csrc/*.c (once per source and flags) and return the shared library's path."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)
                            + " ".join(FLAGS).encode()).hexdigest()[:16]
    directory = directory or _cache_dir()
    target = directory / f"qat-native-{digest}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # never a half-written library
        partial = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, "-o", str(partial), *map(str, SOURCES)],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed on {SOURCES}: {done.stderr[-2000:]}")
        os.replace(partial, target)
    return target


class Q4Linear(ctypes.Structure):
    """csrc/decode_step.c's Q4Linear: one 4-bit Linear's canonical tensors (pointers) and shape."""
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zp", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("K", ctypes.c_int64), ("N", ctypes.c_int64),
                ("group", ctypes.c_int64)]


class Q4Layer(ctypes.Structure):
    """csrc/decode_step.c's Q4Layer: a decoder layer's Linears, RMSNorm weights and KV cache."""
    _fields_ = [(name, Q4Linear) for name in ("q", "k", "v", "o", "gate", "up", "down")] + [
        (name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "k_cache", "v_cache")]


class Q4Config(ctypes.Structure):
    """csrc/decode_step.c's Q4Config."""
    _fields_ = [(name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim",
                                                     "intermediate", "max_len")] + [
        ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float)]


class Q8Head(ctypes.Structure):
    """csrc/decode_step.c's Q8Head: the int8 head, with the final RMSNorm before it."""
    _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("norm", ctypes.c_void_p),
                ("vocab", ctypes.c_int64), ("eps", ctypes.c_float)]


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("QAT_NATIVE", "1") == "0" or not _cpu_has_avx2_fma():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError):
        return None
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.q4_gemv.argtypes = [p, i, i, p, p, p, i, p, i]
    lib.q4_gemv.restype = ctypes.c_int
    lib.q8_gemv.argtypes = [p, i, i, p, p, p, i]
    lib.q8_gemv.restype = None
    lib.q4_decode_step.argtypes = [ctypes.POINTER(Q4Layer), i, ctypes.POINTER(Q4Config), p, i, p, p,
                                   ctypes.POINTER(Q8Head), p, p, ctypes.c_int]
    lib.q4_decode_step.restype = ctypes.c_int
    lib.q4_step_buffer_floats.argtypes = [ctypes.POINTER(Q4Config), i]
    lib.q4_step_buffer_floats.restype = i
    lib.qat_team_patience.argtypes = [i]
    lib.qat_team_patience.restype = None
    lib.qat_team_quiesce.argtypes = []
    lib.qat_team_quiesce.restype = None
    lib.qat_set_threads.argtypes = [ctypes.c_int]
    lib.qat_set_threads.restype = None
    lib.qat_max_threads.argtypes = []
    lib.qat_max_threads.restype = ctypes.c_int
    lib.fq_minmax.argtypes = [p, p, p, i, i]
    lib.fq_minmax.restype = None
    lib.fq_codes.argtypes = [p, ctypes.c_int, p, p, p, i, i, ctypes.c_float, ctypes.c_int]
    lib.fq_codes.restype = None
    f = ctypes.c_float
    for name in ("fq_forward", "fq_mask_grad"):
        getattr(lib, name).argtypes = [p, p, p, p, i, i, f, f]
        getattr(lib, name).restype = None
    return lib


def set_threads(n: int) -> None:
    """Team size of our kernels' parallel loops (for the calling thread)."""
    if (lib := _library()) is not None:
        lib.qat_set_threads(n)


def max_threads() -> int:
    """Our kernels' current team size (OpenMP's default: OMP_NUM_THREADS or the cores)."""
    lib = _library()
    return lib.qat_max_threads() if lib is not None else 1


def team_patience(ns: int | None) -> None:
    """How long a team thread waits for another's chunk before computing it itself (csrc/team.h);
    None restores the default, 0 makes every wait a steal (for tests of the commit protocol)."""
    if (lib := _library()) is not None:
        lib.qat_team_patience(-1 if ns is None else ns)


def available() -> bool:
    """True when the GEMV library is built and loaded for this CPU."""
    return _library() is not None


def q4_supported(bits: int, in_features: int, group_size: int | None,
                 scale_dtype: torch.dtype) -> bool:
    """4-bit codes, bf16 scales, whole 32-code steps per group (the kernel's inner loop)."""
    group = group_size or in_features
    return (bits == 4 and scale_dtype == torch.bfloat16 and in_features % 32 == 0
            and group % 32 == 0 and in_features % group == 0)


def linear_q4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
              zero_point: torch.Tensor | None, group_size: int | None, in_features: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ ((q - zp) * scale).T + bias over canonical 4-bit words, float32 math.

    Args:
        x: (..., in_features) any float dtype. packed: (out, in/8) int32 compressed-tensors words.
        scale: (out, groups) bf16. zero_point: (out, groups) int8 or None.
    Returns:
        (..., out) in x.dtype.
    """
    rows = x.numel() // x.shape[-1]
    if rows > MAX_ROWS:
        from qat.format.reference import linear_reference

        return linear_reference(x, packed, scale, zero_point, 4, group_size, in_features,
                                bias).to(x.dtype)
    x2 = x.reshape(rows, in_features)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    out_features = packed.shape[0]
    y = torch.empty(rows, out_features)
    if _library().q4_gemv(x2.data_ptr(), rows, in_features, packed.data_ptr(), scale.data_ptr(),
                          None if zero_point is None else zero_point.data_ptr(),
                          group_size or in_features, y.data_ptr(), out_features):
        raise MemoryError("q4_gemv: out of memory")
    if bias is not None:
        y += bias.float()
    y = y.view(*x.shape[:-1], out_features)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def linear_q8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = (x @ codes.T) * scale per output row, float32 math (an int8 embedding used as head).

    Args:
        x: (..., K) any float dtype. codes: (N, K) int8, contiguous. scale: (N,) float32.
    Returns:
        (..., N) float32.
    """
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    if rows > MAX_ROWS:  # GEMM-shaped (evaluation): dequantize once, F.linear
        return torch.nn.functional.linear(x.float(), codes.float() * scale[:, None])
    x2 = x.reshape(rows, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    n = codes.shape[0]
    y = torch.empty(rows, n)
    _library().q8_gemv(x2.data_ptr(), rows, k, codes.data_ptr(), scale.data_ptr(), y.data_ptr(), n)
    return y.view(*x.shape[:-1], n)


def fake_quant_supported(w: torch.Tensor, scale: torch.Tensor,
                         zero_point: torch.Tensor | None) -> bool:
    """Contiguous float32 CPU tensors, one scale (and zero point) per row of the grouped view."""
    if not (_plain(w) and w.is_cpu and w.dtype == torch.float32 and w.is_contiguous()
            and w.dim() >= 2):
        return False
    groups = w.numel() // w.shape[-1]
    for t in (scale, zero_point):
        if t is not None and not (_plain(t) and t.dtype == torch.float32 and t.is_contiguous()
                                  and t.is_cpu and t.numel() == groups):
            return False
    return available()


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               qmin: int, qmax: int) -> torch.Tensor:
    """(clamp(round(w / s + zp), qmin, qmax) - zp) * s over (..., size) groups, one pass."""
    out = torch.empty_like(w)
    _library().fq_forward(w.data_ptr(), out.data_ptr(), scale.data_ptr(),
                          None if zero_point is None else zero_point.data_ptr(),
                          w.numel() // w.shape[-1], w.shape[-1], float(qmin), float(qmax))
    return out


def codes_supported(codes: torch.Tensor, scale: torch.Tensor,
                    zero_point: torch.Tensor | None) -> bool:
    """Contiguous CPU codes (int8, or uint8 two per byte) grouped as (..., size) with one float32
    scale (and zero point) per group, shaped (..., 1)."""
    if not (_plain(codes) and codes.is_cpu and codes.dtype in (torch.int8, torch.uint8)
            and codes.is_contiguous() and codes.dim() >= 2):
        return False
    for t in (scale, zero_point):
        if t is not None and not (_plain(t) and t.dtype == torch.float32 and t.is_cpu
                                  and t.is_contiguous()
                                  and t.shape == (*codes.shape[:-1], 1)):
            return False
    return available()


def _codes_call(codes: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None,
                zero_point: torch.Tensor | None, code_min: int, mode: int) -> torch.Tensor:
    packed = codes.dtype == torch.uint8
    size = codes.shape[-1] * (2 if packed else 1)
    if not (out.dtype == torch.float32 and out.is_contiguous() and out.is_cpu
            and out.numel() == codes.numel() // codes.shape[-1] * size):
        raise ValueError(f"frozen codes {tuple(codes.shape)} ({codes.dtype}) need a contiguous "
                         f"float32 CPU out of {codes.numel() // codes.shape[-1] * size} elements")
    _library().fq_codes(codes.data_ptr(), int(packed), out.data_ptr(),
                        None if scale is None else scale.data_ptr(),
                        None if zero_point is None else zero_point.data_ptr(),
                        codes.numel() // codes.shape[-1], size, float(code_min), mode)
    return out


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                     code_min: int, out: torch.Tensor) -> torch.Tensor:
    """out = (q - zp) * scale from frozen codes (`codes_supported`), one pass; uint8 codes are
    two per byte, stored as q - code_min (ste.pack_codes). Bit-identical to the torch ops."""
    return _codes_call(codes, out, scale, zero_point, code_min, 0)


def mul_codes_(grad: torch.Tensor, codes: torch.Tensor, zero_point: torch.Tensor | None,
               code_min: int) -> torch.Tensor:
    """grad *= (q - zp) in place: dL/dw_hat times the codes, what dL/dscale sums per group."""
    return _codes_call(codes, grad, None, zero_point, code_min, 1)


def minmax_supported(w: torch.Tensor) -> bool:
    """A contiguous float32 CPU tensor with non-empty groups along its last dim."""
    return (_plain(w) and w.is_cpu and w.dtype == torch.float32 and w.is_contiguous()
            and w.dim() >= 1 and w.numel() > 0 and w.shape[-1] > 0 and available())


def _plain(t: torch.Tensor) -> bool:
    """A tensor whose data_ptr is its elements': not a subclass such as FSDP2's sharded DTensor,
    whose pointer is no array the C code may read."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def minmax(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amin, amax) over the last dim, keepdim, in one pass; NaN where a group holds one."""
    shape = (*w.shape[:-1], 1)
    lo, hi = torch.empty(shape), torch.empty(shape)
    _library().fq_minmax(w.data_ptr(), lo.data_ptr(), hi.data_ptr(), w.numel() // w.shape[-1],
                         w.shape[-1])
    return lo, hi


def mask_grad_(w: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor,
               zero_point: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    """grad *= (qmin <= w / s + zp <= qmax), in place: the straight-through estimator's mask."""
    if not (grad.dtype == torch.float32 and grad.is_contiguous() and grad.shape == w.shape):
        raise ValueError("mask_grad_ needs a contiguous float32 grad shaped like w")
    _library().fq_mask_grad(w.data_ptr(), grad.data_ptr(), scale.data_ptr(),
                            None if zero_point is None else zero_point.data_ptr(),
                            w.numel() // w.shape[-1], w.shape[-1], float(qmin), float(qmax))
    return grad


class DecodeStep:
    """Every decoder layer of one new token in one native call (csrc/decode_step.c), and with an
    int8 head (codes, scale, final-norm weight, eps) the token itself.

    Built by qat.serve.decode from a Llama-style model whose decoder Linears are all 4-bit GEMV layers;
    it keeps the tensors it points to alive. Calling it runs the layers on h (hidden,) float32 in
    place, writes the token's k and v into the caches at `pos` and returns the next token (the
    argmax of the head's logits) or None without a head. `threads`: the team's size (csrc/team.h:
    no thread waits for another, so a busy machine slows the step down, it does not stall it).
    `close()` waits until no helper thread still reads these tensors.
    """

    def __init__(self, layers: list[dict], config: dict, cos: torch.Tensor, sin: torch.Tensor,
                 head: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None):
        self._keep = [cos, sin]
        self.layers = (Q4Layer * len(layers))()
        for slot, layer in zip(self.layers, layers):
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                setattr(slot, name, self._linear(*layer[name]))
            for name in ("input_norm", "post_norm", "k_cache", "v_cache"):
                setattr(slot, name, self._pointer(layer[name]))
        self.config = Q4Config(**config)
        self.cos, self.sin, self.dim = cos, sin, config["head_dim"]
        self.head = None
        if head is not None:
            codes, scale, norm, eps = head
            if codes.shape[1] != config["hidden"] or codes.shape[0] >= 2 ** 24:
                raise ValueError(f"DecodeStep: head codes {tuple(codes.shape)} need (vocab < 2**24, "
                                 f"hidden {config['hidden']})")
            self.head = Q8Head(self._pointer(codes), self._pointer(scale), self._pointer(norm),
                               codes.shape[0], eps)
        lib = _library()
        vocab = 0 if self.head is None else self.head.vocab
        self.buffer = torch.empty(lib.q4_step_buffer_floats(ctypes.byref(self.config), vocab))
        self.token = torch.zeros(1, dtype=torch.int64)

    def _pointer(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        if not (t.dtype in (torch.float32, torch.int32, torch.int8, torch.bfloat16)
                and t.is_contiguous() and t.is_cpu):
            raise ValueError(f"DecodeStep needs contiguous CPU tensors, got {t.dtype} {tuple(t.shape)}")
        self._keep.append(t)
        return t.data_ptr()

    def _linear(self, packed, scale, zero_point, bias, in_features, group_size) -> Q4Linear:
        return Q4Linear(self._pointer(packed), self._pointer(scale), self._pointer(zero_point),
                        self._pointer(bias), in_features, packed.shape[0],
                        group_size or in_features)

    def __call__(self, h: torch.Tensor, pos: int, threads: int = 1) -> int | None:
        if not (h.dtype == torch.float32 and h.is_contiguous() and h.numel() == self.config.hidden):
            raise ValueError("DecodeStep runs one token: h must be contiguous float32 (hidden,)")
        if not 0 <= pos < self.config.max_len:
            raise ValueError(f"position {pos} is outside the cache (max_len {self.config.max_len})")
        offset = pos * self.dim * 4  # bytes into the (max_len, head_dim) float32 rotary tables
        done = _library().q4_decode_step(
            self.layers, len(self.layers), ctypes.byref(self.config), h.data_ptr(), pos,
            self.cos.data_ptr() + offset, self.sin.data_ptr() + offset,
            None if self.head is None else ctypes.byref(self.head), self.buffer.data_ptr(),
            self.token.data_ptr(), max(1, threads))
        if done == -1:
            raise MemoryError("q4_decode_step: out of memory")
        if done:
            raise ValueError("q4_decode_step: a phase has more chunks than a team job holds")
        return None if self.head is None else int(self.token)

    def close(self) -> None:
        _library().qat_team_quiesce()

    def __del__(self) -> None:
        if _library is not None and _library() is not None:
            self.close()
