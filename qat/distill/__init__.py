"""Knowledge distillation: a frozen teacher trains the quantized student."""

from qat.distill.losses import JSD, ForwardKL, HiddenStateLoss, ReverseKL, chunked_token_loss
from qat.distill.spec import DistillSpec, TeacherSpec
from qat.distill.teacher import Distiller, build_teacher, check_vocabulary, freeze

__all__ = ["JSD", "DistillSpec", "Distiller", "ForwardKL", "HiddenStateLoss", "ReverseKL",
           "TeacherSpec", "build_teacher", "check_vocabulary", "chunked_token_loss", "freeze"]
