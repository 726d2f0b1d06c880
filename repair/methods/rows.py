"""What every per-row intervention shares: which setting each batch row uses, and removal."""
from __future__ import annotations

import torch


class PerRowHooks:
    """Base of the interventions: subclasses keep their settings in `self.settings` and their hook
    handles in `self._handles`, and call `_row_ids(batch)` inside a hook for each row's setting."""

    settings: list
    _handles: list
    _rows: torch.Tensor | None = None
    _shared: list = ()  # the variants of a fan-out's lower stages' rows (set_rows)

    @property
    def n_variants(self) -> int:
        return len(self.settings)

    def set_rows(self, variant_ids, shared=()) -> None:
        """Which setting each batch row of the following forwards uses (shape (B,); may repeat), and,
        where rows share the layers below their first change (repair.fanout), those of each lower
        stage's rows (fewer rows: a forward's batch size says which stage it is in)."""
        self._rows = checked_rows(variant_ids, self.n_variants)
        self._shared = [checked_rows(s, self.n_variants) for s in shared or ()]

    def first_layer(self, variants) -> int | None:
        """The first decoder layer any of `variants` changes (None: none does): below it the evaluator
        runs each item once for all of them (repair.fanout). By default 0, which shares nothing;
        an intervention that knows its layers says so."""
        return 0

    def _row_ids(self, batch: int) -> torch.Tensor:
        name = type(self).__name__
        if self._rows is None:
            if self.n_variants != 1:
                raise RuntimeError(f"{name} holds {self.n_variants} settings: call set_rows before the forward")
            return torch.zeros(batch, dtype=torch.long)
        if len(self._rows) != batch:
            stage = stage_rows(self._shared, batch)
            if stage is not None:
                return stage
            raise RuntimeError(f"{name}.set_rows was given {len(self._rows)} rows but the forward has batch size {batch}")
        return self._rows

    def remove(self) -> None:
        """Remove every hook; the model is then exactly as before. Safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def stage_rows(stages, batch: int) -> torch.Tensor | None:
    """The variant ids of the lower fan-out stage (repair.fanout) whose forwards have `batch` rows;
    None if none has (the stages' sizes differ, so a batch size names one)."""
    return next((rows for rows in stages or () if len(rows) == batch), None)


def checked_rows(variant_ids, n_variants: int) -> torch.Tensor:
    rows = torch.as_tensor(variant_ids, dtype=torch.long).reshape(-1)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_variants):
        raise ValueError(f"variant ids must lie in [0, {n_variants}), got {rows.tolist()}")
    return rows


def hidden_size(model) -> int | None:
    from repair import arch

    return getattr(arch.text_config(model), "hidden_size", None)
