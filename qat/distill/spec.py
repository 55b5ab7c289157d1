"""`DistillSpec`: which teacher, which losses and their weights. Hydra fills it from conf/distill/."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

LOSSES = ("forward_kl", "reverse_kl", "jsd")
HIDDEN_LOSSES = ("mse", "cosine")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher: null name and path mean a frozen copy of the student's own float model."""

    name: str | None = None  # builtin or hub id of another causal LM with the same vocabulary
    path: str | None = None  # local Hugging Face model directory; wins over name
    dtype: str = "float32"  # bfloat16 halves its memory (and is fast on GPUs, slow on most CPUs)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for key in ("name", "path"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"distill.teacher.{key} must be null or a non-empty string, "
                                 f"got {value!r}")
        if self.dtype not in TEACHER_DTYPES:
            raise ValueError(f"distill.teacher.dtype={self.dtype!r} is not one of {TEACHER_DTYPES}")

    @property
    def is_self(self) -> bool:
        return self.name is None and self.path is None


@dataclass(frozen=True)
class DistillSpec:
    """Knowledge distillation from a frozen teacher into the quantized student.

    loss = kd_weight * divergence(student, teacher at `temperature`) * T^2
         + ce_weight * cross-entropy on the data + hidden_weight * hidden-state distance.
    """

    enabled: bool = False
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0  # > 1 softens both distributions; the T^2 factor keeps gradients sized
    jsd_beta: float = 0.5  # jsd only: weight of the teacher in the mixture
    kd_weight: float = 1.0
    ce_weight: float = 0.0  # mix in the plain next-token loss on the data
    hidden_weight: float = 0.0  # > 0 adds the hidden-state loss
    hidden_loss: str = "mse"  # mse | cosine
    # (student, teacher) indices into hidden_states (0 = embeddings, k = after block k);
    # null: every student block k maps to teacher block round(k * L_teacher / L_student)
    hidden_layers: tuple[tuple[int, int], ...] | None = None
    chunk_size: int | None = 1024  # tokens per vocabulary-sized loss chunk; null: all at once
    # > 0: the teacher's top-k log-probs over the training blocks, computed once before the
    # end-to-end stage (qat.distill.cache); its steps then never run the teacher
    cache_top_k: int = 0
    teacher: TeacherSpec = field(default_factory=TeacherSpec)

    def __post_init__(self) -> None:
        if isinstance(self.teacher, Mapping):
            object.__setattr__(self, "teacher", TeacherSpec(**dict(self.teacher)))
        if self.loss not in LOSSES:
            raise ValueError(f"distill.loss={self.loss!r} is not one of {LOSSES}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"distill.hidden_loss={self.hidden_loss!r} is not one of {HIDDEN_LOSSES}")
        if not _number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"distill.temperature={self.temperature!r} must be a number > 0")
        if not _number(self.jsd_beta) or not 0 < self.jsd_beta < 1:
            raise ValueError(f"distill.jsd_beta={self.jsd_beta!r} must be in (0, 1)")
        for key in ("kd_weight", "ce_weight", "hidden_weight"):
            value = getattr(self, key)
            if not _number(value) or value < 0:
                raise ValueError(f"distill.{key}={value!r} must be a number >= 0")
        if self.enabled and self.kd_weight + self.ce_weight + self.hidden_weight == 0:
            raise ValueError("distill.kd_weight, ce_weight and hidden_weight are all 0: nothing to "
                             "train on")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise ValueError(f"distill.chunk_size={self.chunk_size!r} must be a positive integer "
                             "or null")
        if not isinstance(self.cache_top_k, int) or isinstance(self.cache_top_k, bool) \
                or self.cache_top_k < 0:
            raise ValueError(f"distill.cache_top_k={self.cache_top_k!r} must be an integer >= 0 "
                             "(0: no cache, the teacher runs every step)")
        if self.cache_top_k and self.loss != "forward_kl":
            raise ValueError(f"distill.cache_top_k={self.cache_top_k} needs distill.loss="
                             f"forward_kl, got {self.loss!r}: the cache holds the teacher's top-k "
                             "tokens, which only the forward KL can use")
        if self.cache_top_k and self.hidden_weight > 0:
            raise ValueError(f"distill.cache_top_k={self.cache_top_k} caches logits, not hidden "
                             f"states: set distill.hidden_weight=0 (got {self.hidden_weight})")
        if self.hidden_layers is not None:
            pairs = tuple(tuple(p) for p in self.hidden_layers)
            if any(len(p) != 2 or not all(isinstance(i, int) and i >= 0 for i in p) for p in pairs):
                raise ValueError(f"distill.hidden_layers={self.hidden_layers!r} must be a list of "
                                 "[student_index, teacher_index] pairs of integers >= 0")
            object.__setattr__(self, "hidden_layers", pairs)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
