"""Settings of logit distillation from the frozen original model (``distill.*``)."""

from __future__ import annotations

from dataclasses import dataclass

KL_DIRECTIONS = ("forward", "reverse")


@dataclass
class DistillConfig:
    """How the student's loss mixes LM cross-entropy with a KL to the teacher.

    Per token: ``lm_weight * CE(student, label) + kl_weight * T^2 * KL``, with both
    next-token distributions taken at temperature ``T`` (the ``T^2`` keeps the gradient's
    scale independent of ``T``).

    Attributes:
        lm_weight: weight of the LM cross-entropy on the data's labels.
        kl_weight: weight of the KL term.
        temperature: ``T`` dividing both models' logits before the softmax.
        direction: ``"forward"`` = ``KL(teacher || student)`` (the default): mass-covering,
            it pulls the student towards the teacher's whole distribution and is the
            usual choice when the student is the same model retrofitted, whose starting
            point already matches the teacher; ``"reverse"`` = ``KL(student || teacher)``
            (mode-seeking).
    """

    lm_weight: float = 1.0
    kl_weight: float = 1.0
    temperature: float = 1.0
    direction: str = "forward"

    def check(self, prefix: str = "distill") -> None:
        """Raise ``ValueError`` naming ``<prefix>.<key>`` for a value out of range."""
        for key in ("lm_weight", "kl_weight"):
            value = getattr(self, key)
            if not value >= 0:
                raise ValueError(f"{prefix}.{key} must be >= 0, got {value}")
        if self.lm_weight == 0 and self.kl_weight == 0:
            raise ValueError(f"{prefix}.kl_weight: lm_weight and kl_weight are both 0 "
                             "(nothing to train on)")
        if not self.temperature > 0:
            raise ValueError(f"{prefix}.temperature must be > 0, got {self.temperature}")
        if self.direction not in KL_DIRECTIONS:
            raise ValueError(f"{prefix}.direction must be one of {KL_DIRECTIONS}, "
                             f"got {self.direction!r}")
