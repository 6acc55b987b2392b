"""Mixed precision in the training engine: the fp16 loss scaler's state resumes exactly, skipped steps are said,
and the EMA renews what the teacher derives from its weights (the fp16 resume itself: test_engine.py)."""

from __future__ import annotations

import torch

from dinokit.engine import LossOutput

from test_engine import Regression, run_toy


def test_an_fp16_run_that_stops_stepping_partway_says_so(tmp_path):
    """Skips were counted over the whole run: one stepping for 56 of 100 iterations, then never again, said
    nothing."""
    import warnings

    from dinokit.errors import TrainingHealthWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _ = run_toy(tmp_path / "run", dtype=torch.float16, max_iter=40, task=StallsAt20)
    assert engine.steps_taken <= 20 and engine.skipped_in_a_row == 20
    said = [str(w.message) for w in caught if issubclass(w.category, TrainingHealthWarning)]
    assert [m.split(":")[0] for m in said] == [  # at the first window with more than 8 in a row (the 4 skipped first
        "the optimiser skipped 14 of the 30 steps so far (10 in a row)"]  # are the loss scale found: not said)


class StallsAt20(Regression):
    """A finite loss whose gradients are NaN from iteration 20 on (sqrt at 0): every later step is skipped."""

    def compute_losses(self, batch, iteration, sched):
        out = super().compute_losses(batch, iteration, sched)
        if iteration >= 20:
            w = self.model.weight
            out = LossOutput(total=out.total + 0.0 * torch.sqrt((w - w.detach()).abs().sum()), terms=out.terms)
        return out


class Loud(Regression):
    """Gradients of about 1e6: they overflow fp16 until the loss scale is below 0.1 (about 20 halvings)."""

    def compute_losses(self, batch, iteration, sched):
        out = super().compute_losses(batch, iteration, sched)
        return LossOutput(total=out.total * 1e5, terms=out.terms)


def test_an_fp16_run_whose_steps_are_mostly_skipped_says_so(tmp_path):
    """Gradients that overflow fp16 at the loss scales tried: the optimiser steps were skipped without a word (a
    short run trained nothing), and the run reported its final loss as if it had trained."""
    import warnings

    from dinokit.engine.loop import SKIPPED_STEPS_ALLOWED
    from dinokit.errors import TrainingHealthWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _ = run_toy(tmp_path / "run", dtype=torch.float16, max_iter=30, task=Loud)
    said = [str(w.message) for w in caught if issubclass(w.category, TrainingHealthWarning)]
    assert engine.steps_taken < 30 - SKIPPED_STEPS_ALLOWED
    assert sum(m.startswith("the optimiser skipped ") and "fp16 gradients were not finite at the loss scales tried"
               in m for m in said) == 1, said  # once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_toy(tmp_path / "fine", dtype=torch.float16, max_iter=30)
    assert not any("optimiser skipped" in str(w.message) for w in caught)


def test_an_ema_update_renews_the_teachers_interpolated_position_embeddings():
    """ema_update wrote through .data, which leaves the version counter as it was: a teacher run at another size
    than its native one (mixed resolutions, the Gram teacher) kept its first interpolated embedding for the run."""
    from dinokit.engine import ema_update
    from dinokit.models import build_backbone

    torch.manual_seed(0)
    teacher = build_backbone("vit_pico", patch_size=8, img_size=48).eval().requires_grad_(False)
    student = build_backbone("vit_pico", patch_size=8, img_size=48)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        teacher(x)  # interpolates 6x6 -> 4x4 and keeps it
        ema_update(teacher, student, 0.0)  # the teacher now holds the student's weights
        after = teacher(x)
        assert torch.equal(after, teacher(x))
        assert torch.equal(after, student.eval()(x))
