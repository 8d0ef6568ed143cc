"""Knowledge distillation from a trained checkpoint (a "teacher") into the model being trained.

Small ViTs trained from scratch on a thousand scans learn slowly; matching a trained CNN's
softened predictions (Hinton et al. 2015; DeiT, Touvron et al. 2021) gives them the teacher's
knowledge of the data set. The loss is ``(1 - w) * CE(student, labels) + w * T^2 *
KL(softmax(teacher / T) || softmax(student / T))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mirage_demo.checkpoint import load_checkpoint
from mirage_demo.data import Preprocessing

__all__ = ["Teacher", "distillation_loss"]


class Teacher(nn.Module):
    """A frozen checkpoint that scores the student's (augmented) input batch.

    The batch arrives normalised for the student; it is mapped back to [0, 1], resized to the
    teacher's input size and normalised the teacher's way.
    """

    def __init__(self, source: str, student: Preprocessing, device: torch.device) -> None:
        super().__init__()
        model, config = load_checkpoint(source, device=device)
        self.model = model.requires_grad_(False).eval()
        self.class_names = list(config.class_names)
        self.student = student
        self.preprocessing = config.preprocessing

    def train(self, mode: bool = True) -> Teacher:  # the teacher always runs in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = self.student.denormalize(x.float())
        size = list(self.preprocessing.input_size)
        if list(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
        return self.model(self.preprocessing.normalize(images)).float()


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2
