"""Decoding-time experts, everything that is the method's: the stereotype corpus (`corpus`), the
experts' training and storage (`training`), the logits transform (`transform`), its configuration
space (`space`) and its search contract (`method.Experts`)."""
