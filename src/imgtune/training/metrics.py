"""Per-sample means of loss and accuracy over a phase, and the test split's detailed results."""

from __future__ import annotations

import torch

from imgtune.training import distributed


class PhaseMetrics:
    """Accumulates loss and top-k accuracy weighted by batch size (not averaged per batch).

    The original divided summed losses by the number of batches with floor division; here each sample
    counts once, whatever the batch sizes.
    """

    def __init__(self, num_classes: int, confusion: bool = False):
        self.num_classes = num_classes
        self.samples = 0
        self.loss_sum = 0.0
        self.correct1 = 0
        self.correct5 = 0
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long) if confusion else None

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> None:
        """`loss` is the batch's mean loss."""
        n = targets.shape[0]
        self.samples += n
        self.loss_sum += float(loss.detach()) * n
        logits, targets = logits.detach().float().cpu(), targets.detach().cpu()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        self.correct1 += int((top[:, 0] == targets).sum())
        self.correct5 += int((top == targets[:, None]).any(dim=1).sum())
        if self.confusion is not None:
            flat = targets * self.num_classes + top[:, 0]
            self.confusion += torch.bincount(flat, minlength=self.num_classes**2).view(self.num_classes, -1)

    def sum_over_ranks(self) -> None:
        """In a data-parallel run: every rank's counts summed, so each rank holds the whole phase's metrics (what
        one process would compute on all the data). A no-op in a single process."""
        if not distributed.is_distributed():
            return
        counts = torch.tensor([self.samples, self.loss_sum, self.correct1, self.correct5], dtype=torch.float64)
        samples, loss_sum, correct1, correct5 = distributed.sum_over_ranks(counts).tolist()
        self.samples, self.loss_sum, self.correct1, self.correct5 = int(samples), loss_sum, int(correct1), int(correct5)
        if self.confusion is not None:
            self.confusion = distributed.sum_over_ranks(self.confusion)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.samples if self.samples else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct1 / self.samples if self.samples else float("nan")

    @property
    def top5(self) -> float:
        return self.correct5 / self.samples if self.samples else float("nan")

    def summary(self) -> dict[str, float | int]:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "top5_accuracy": self.top5,
            "samples": self.samples,
        }

    def per_class_accuracy(self) -> list[float | None]:
        if self.confusion is None:
            raise ValueError("per-class accuracy needs confusion=True")
        totals = self.confusion.sum(dim=1)
        return [float(self.confusion[i, i] / totals[i]) if totals[i] else None for i in range(self.num_classes)]
