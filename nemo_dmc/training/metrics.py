"""Run logging on rank 0: TensorBoard scalars, ``metrics.jsonl``, a tqdm bar, stage summaries.

Scalars are tagged ``<stage>/<split>/<name>`` against the stage's step; ``metrics.jsonl``
holds one JSON object per logged step (``{"stage", "split", "step", ...scalars}``). When a
stage starts from a step (a resume), its records after that step, which the run is about to
log again, are removed first (atomically), so each step has one record.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

from tqdm import tqdm

from nemo_dmc.training.config import LoggingConfig


@dataclass
class Validation:
    """Validation result with hard decisions (identical on every rank); ``kl`` to the
    distillation teacher, and ``lm_loss_noisy`` with training's noisy decisions, when known."""

    lm_loss: float
    cr: float
    layer_cr: List[float]
    kl: Optional[float] = None
    lm_loss_noisy: Optional[float] = None

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.lm_loss, 80.0))

    @property
    def noisy_gap(self) -> Optional[float]:
        """``lm_loss - lm_loss_noisy``: how much worse hard decisions score than training's."""
        return None if self.lm_loss_noisy is None else self.lm_loss - self.lm_loss_noisy

    def scalars(self) -> Dict[str, float]:
        """What gets logged (``kl``, ``lm_loss_noisy`` and ``noisy_gap`` when known)."""
        out = {"lm_loss": self.lm_loss, "ppl": self.perplexity, "cr": self.cr}
        extra = {"kl": self.kl, "lm_loss_noisy": self.lm_loss_noisy, "noisy_gap": self.noisy_gap}
        out.update({k: v for k, v in extra.items() if v is not None})
        return out


@dataclass
class StageSummary:
    """What one stage did (printed as one line at its end)."""

    stage: str
    steps_run: int
    steps: int
    tokens: int
    budget_tokens: int
    seconds: float
    target_cr: float
    validation: Validation

    def line(self) -> str:
        val = self.validation
        layers = " ".join(f"{cr:.2f}" for cr in val.layer_cr)
        noisy = "" if val.lm_loss_noisy is None else f" (noisy decisions {val.lm_loss_noisy:.3f})"
        kl = "" if val.kl is None else f" kl {val.kl:.4f}"
        return (f"[{self.stage}] {self.steps_run}/{self.steps} steps run, {self.tokens:,} tokens "
                f"({100 * self.tokens / max(1, self.budget_tokens):.0f}% of budget) in "
                f"{self.seconds:.0f}s | val loss {val.lm_loss:.3f}{noisy} ppl "
                f"{val.perplexity:.1f}{kl} | realised CR {val.cr:.2f} (target "
                f"{self.target_cr:.2f}) | per-layer CR {layers}")


class RunLogger:
    """Writes metrics on the logging rank; a no-op elsewhere."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, enabled: bool) -> None:
        self.cfg, self.enabled = cfg, enabled
        self._bar: Optional[tqdm] = None
        self._writer = None
        self._jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._path = run_dir / "metrics.jsonl"
        self._jsonl = self._path.open("a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def draws_bar(self) -> bool:
        """``logging.progress_bar``, or (``null``) whether stderr is a terminal."""
        if self.cfg.progress_bar is not None:
            return self.cfg.progress_bar
        return sys.stderr.isatty()

    def start_stage(self, stage: str, steps: int, first_step: int, message: str) -> None:
        """Begin ``stage`` at ``first_step`` of ``steps`` (after :meth:`truncate`)."""
        if not self.enabled:
            return
        self.truncate(stage, first_step, steps)
        tqdm.write(message)
        if self.draws_bar():
            self._bar = tqdm(total=steps, initial=first_step, desc=stage, unit="step",
                             dynamic_ncols=True)

    def log(self, stage: str, split: str, step: int, scalars: Dict[str, float],
            layer_cr: Optional[List[float]] = None) -> None:
        """Record scalars (and per-layer CRs) of ``split`` at ``step`` of ``stage``."""
        if not self.enabled:
            return
        record = {"stage": stage, "split": split, "step": step, **scalars}
        if layer_cr is not None:
            record["layer_cr"] = layer_cr
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(f"{stage}/{split}/{name}", value, step)
            for layer, cr in enumerate(layer_cr or []):
                self._writer.add_scalar(f"{stage}/{split}/layer_cr/{layer}", cr, step)

    def truncate(self, stage: str, first_step: int, steps: int) -> None:
        """Drop the records ``stage`` logs again when it starts from ``first_step``: those
        after it, and for a finished stage (``first_step == steps``) its final validation.
        The file is rewritten beside itself and renamed into place; a torn last line (a
        kill mid-write) is dropped too."""
        def replayed(line: str) -> bool:
            try:
                record = json.loads(line)
            except ValueError:
                return False  # not ours to judge
            if not isinstance(record, dict) or record.get("stage") != stage:
                return False
            step = record.get("step", 0)
            return step > first_step or (step == first_step == steps
                                         and record.get("split") == "valid")

        text = self._path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        torn = bool(lines) and not lines[-1].endswith("\n")
        kept = [line for line in lines[:-1 if torn else None] if not replayed(line)]
        if len(kept) == len(lines):
            return
        self._jsonl.close()
        tmp = self._path.with_name(f".{self._path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as out:
            out.writelines(kept)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)
        self._jsonl = self._path.open("a", encoding="utf-8")

    def log_layer_cr(self, stage: str, split: str, step: int, layer_cr: List[float]) -> None:
        """Per-layer CRs to TensorBoard alone (every step; :meth:`log` at the log interval)."""
        if self._writer is not None:
            for layer, cr in enumerate(layer_cr):
                self._writer.add_scalar(f"{stage}/{split}/layer_cr/{layer}", cr, step)

    def advance(self, postfix: Dict[str, Union[float, str]]) -> None:
        """One step on the progress bar; ``postfix`` numbers are shown with 3 digits."""
        if self._bar is not None:
            shown = {k: v if isinstance(v, str) else f"{v:.3g}" for k, v in postfix.items()}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)

    def end_stage(self, summary: StageSummary) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.flush()
        print(summary.line(), flush=True)

    def note(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
