"""What every per-row intervention shares: which setting each batch row uses, and removal."""
from __future__ import annotations

import torch


class PerRowHooks:
    """Base of the interventions: subclasses keep their settings in `self.settings` and their hook
    handles in `self._handles`, and call `_row_ids(batch)` inside a hook for each row's setting."""

    settings: list
    _handles: list
    _rows: torch.Tensor | None = None

    @property
    def n_variants(self) -> int:
        return len(self.settings)

    def set_rows(self, variant_ids) -> None:
        """Which setting each batch row of the following forwards uses (shape (B,); may repeat)."""
        rows = torch.as_tensor(variant_ids, dtype=torch.long).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.n_variants):
            raise ValueError(f"variant ids must lie in [0, {self.n_variants}), got {rows.tolist()}")
        self._rows = rows

    def _row_ids(self, batch: int) -> torch.Tensor:
        name = type(self).__name__
        if self._rows is None:
            if self.n_variants != 1:
                raise RuntimeError(f"{name} holds {self.n_variants} settings: call set_rows before the forward")
            return torch.zeros(batch, dtype=torch.long)
        if len(self._rows) != batch:
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


def hidden_size(model) -> int | None:
    from repair import arch

    return getattr(arch.text_config(model), "hidden_size", None)
