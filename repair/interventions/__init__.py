"""Removable hooks that change what a model computes, one file per kind.

Every intervention takes a list of settings (`set_variants`) and which setting each batch row of
the next forwards uses (`set_rows`), so many configurations share one batched forward; each works
inside `generate()` with the KV cache, leaves the weights untouched and `remove()`s cleanly:

- head masks (Attention Pruning): `repair.heads.HeadMasker`, beside the head layout and the export
  that zeroes the same slices;
- `neutralizer.Neutralizer` (FairMed): gradient steps on MLP outputs against the probers;
- `steerer.Steerer` (FairSteer): a probe-gated vector added to one layer's residual stream.
The last two share `rows.PerRowHooks` (row assignment, removal).
"""
