"""The frozen teacher and `Distiller`, which turns a batch into the distillation losses.

The teacher is deliberately not an `nn.Module` attribute of the LightningModule: it is then never
saved in the student's checkpoint, never wrapped by DDP and never seen by the optimizer.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from qat.distill.cache import TeacherCache, head_of
from qat.distill.losses import (DIVERGENCES, IGNORE_INDEX, HiddenStateLoss, chunked_student_loss,
                                chunked_token_loss, shifted_targets, topk_kl)
from qat.distill.spec import DistillSpec, TeacherSpec


def freeze(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Eval mode, no gradients, optionally cast: a model that can only be read."""
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(spec: TeacherSpec, student: nn.Module, tokenizer,
                  student_dir: Path | None = None) -> nn.Module:
    """The frozen float model to distil from (call before fake quantization), checked.

    The student's own float model (`distill.teacher.name=self`) or another model's directory is
    onloaded from its files: its blocks are read one at a time while it runs, never held as a
    copy. A student without files (model.name=tiny) is deep-copied.

    Raises ValueError when the teacher's vocabulary differs from the student's.
    """
    from qat.models.onload import onloaded_model

    dtype = getattr(torch, spec.dtype)
    if spec.is_self:
        teacher = onloaded_model(
            student_dir, dtype, trust_remote_code=spec.trust_remote_code,
            attn_implementation=getattr(student.config, "_attn_implementation", None)) \
            if student_dir is not None else None
        return teacher if teacher is not None else freeze(copy.deepcopy(student), dtype)
    from qat.models import ModelSpec, load_model

    field = "path" if spec.path is not None else "name"
    try:
        teacher = onloaded_model(spec.path, dtype, trust_remote_code=spec.trust_remote_code) \
            if spec.path is not None and Path(spec.path, "config.json").is_file() else None
        teacher_tokenizer = None
        if teacher is None:
            teacher, teacher_tokenizer = load_model(ModelSpec(
                name=spec.name or "teacher", path=spec.path, dtype=spec.dtype,
                trust_remote_code=spec.trust_remote_code))
        else:
            from transformers import AutoTokenizer

            teacher_tokenizer = AutoTokenizer.from_pretrained(
                spec.path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"distill.teacher.{field}={getattr(spec, field)!r}: cannot load "
                                f"the teacher ({err})") from err
    check_vocabulary(student, tokenizer, teacher, teacher_tokenizer, spec.path or spec.name)
    return freeze(teacher, dtype)


def check_vocabulary(student: nn.Module, tokenizer, teacher: nn.Module, teacher_tokenizer,
                     teacher_name: str) -> None:
    """Distillation compares distributions token by token: the ids must mean the same tokens."""
    s_vocab = student.get_output_embeddings().weight.shape[0]
    t_vocab = teacher.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise ValueError(f"distill.teacher {teacher_name!r} has a vocabulary of {t_vocab} tokens, "
                         f"the student {s_vocab}: distillation needs the same vocabulary")
    if tokenizer is not None and teacher_tokenizer is not None:
        s_map, t_map = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if s_map != t_map:
            differ = sorted(set(s_map.items()) ^ set(t_map.items()))[:3]
            raise ValueError(f"distill.teacher {teacher_name!r} uses a different tokenizer than "
                             f"the student (e.g. {differ}): distillation needs the same vocabulary")


def hidden_pairs(spec: DistillSpec, student_layers: int, teacher_layers: int
                 ) -> tuple[tuple[int, int], ...]:
    if spec.hidden_layers is not None:
        for s, t in spec.hidden_layers:
            if s > student_layers or t > teacher_layers:
                raise ValueError(f"distill.hidden_layers pair [{s}, {t}] is out of range: the "
                                 f"student has {student_layers} blocks, the teacher {teacher_layers}")
        return spec.hidden_layers
    return tuple((k, round(k * teacher_layers / student_layers))
                 for k in range(1, student_layers + 1))


def _num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


class Distiller:
    """Computes the distillation losses of a student against the frozen teacher, or against
    its cached top-k log-probabilities (`cache`: then no teacher is kept or run).

    Call it with the student and a batch (and, with a cache, the batch's rows in the training
    blocks); returns a dict of scalar tensors: `loss` (what to backpropagate), `kd_loss`,
    `ce_loss` and, with a hidden-state weight, `hidden_loss`.
    """

    def __init__(self, spec: DistillSpec, teacher: nn.Module | None,
                 cache: TeacherCache | None = None) -> None:
        if (teacher is None) == (cache is None):
            raise ValueError("Distiller: give a teacher or a teacher cache, not both or neither")
        self.spec = spec
        self.cache = cache
        self.teacher = freeze(teacher) if teacher is not None else None
        self.divergence = DIVERGENCES[spec.loss](spec.temperature, **(
            {"beta": spec.jsd_beta} if spec.loss == "jsd" else {}))
        self.hidden = HiddenStateLoss(spec.hidden_loss) if spec.hidden_weight > 0 else None

    def to(self, device: torch.device | str) -> "Distiller":
        from qat.models.onload import move

        if self.teacher is not None:
            move(self.teacher, device)
        return self

    def __call__(self, student: nn.Module, input_ids: torch.Tensor,
                 labels: torch.Tensor | None = None, rows: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        spec = self.spec
        labels = input_ids if labels is None else labels
        targets = shifted_targets(labels, IGNORE_INDEX)  # (B, T)
        if self.cache is not None:
            return self._cached(student, input_ids, targets, rows)
        want_hidden = self.hidden is not None
        s_out = decoder_output(student, input_ids, want_hidden)
        self.teacher.eval()
        with torch.no_grad():
            t_out = self.teacher.get_decoder()(input_ids=input_ids,
                                               output_hidden_states=want_hidden, use_cache=False)
        kd_sum, ce_sum, count = chunked_token_loss(
            self.divergence, s_out.last_hidden_state, t_out.last_hidden_state, head_of(student),
            head_of(self.teacher), targets, spec.chunk_size)
        denom = count.clamp(min=1).float()
        out = {"kd_loss": kd_sum / denom, "ce_loss": ce_sum / denom}
        loss = spec.kd_weight * out["kd_loss"] + spec.ce_weight * out["ce_loss"]
        if want_hidden:
            pairs = hidden_pairs(spec, _num_layers(student), _num_layers(self.teacher))
            out["hidden_loss"] = self.hidden([s_out.hidden_states[s] for s, _ in pairs],
                                             [t_out.hidden_states[t] for _, t in pairs],
                                             targets != IGNORE_INDEX)
            loss = loss + spec.hidden_weight * out["hidden_loss"]
        out["loss"] = loss
        return out

    def _cached(self, student: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The losses against the cached teacher of training blocks `rows`."""
        spec = self.spec
        if rows is None:
            raise ValueError("Distiller: with a teacher cache each batch needs its rows")
        logp, ids = self.cache.rows(rows, input_ids.device)
        if logp.shape[:2] != input_ids.shape:
            raise ValueError(f"Distiller: cached rows are {tuple(logp.shape[:2])}, the batch "
                             f"{tuple(input_ids.shape)}")
        logp, ids = logp.reshape(-1, logp.shape[-1]), ids.reshape(-1, ids.shape[-1])
        hidden = decoder_output(student, input_ids, False).last_hidden_state
        kd_sum, ce_sum, count = chunked_student_loss(
            hidden, head_of(student), targets, spec.chunk_size,
            lambda s_logits, a, b: topk_kl(s_logits, logp[a:b], ids[a:b], spec.temperature))
        denom = count.clamp(min=1).float()
        out = {"kd_loss": kd_sum / denom, "ce_loss": ce_sum / denom}
        out["loss"] = spec.kd_weight * out["kd_loss"] + spec.ce_weight * out["ce_loss"]
        return out


def decoder_output(student: nn.Module, input_ids: torch.Tensor, want_hidden: bool):
    """The student's decoder output (last hidden state, and all with `want_hidden`): the losses
    apply its head in chunks, never the whole (B, T, vocab) logits.

    A model sharded by FSDP2 runs through its root's forward, which gathers the embeddings, final
    norm and head (kept gathered for the chunked head after it: the root unit does not reshard
    after forward) and syncs their gradients; its own logits are made for the last position
    only."""
    from torch.distributed.fsdp import FSDPModule

    decoder = student.get_decoder()
    if not isinstance(student, FSDPModule):
        return decoder(input_ids=input_ids, output_hidden_states=want_hidden, use_cache=False)
    seen = []
    handle = decoder.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        student(input_ids=input_ids, output_hidden_states=want_hidden, use_cache=False,
                logits_to_keep=1)
    finally:
        handle.remove()
    return seen[0]
