"""Attention Pruning, everything that is the method's: the head layout and masker (`heads`), head
masks as keys and specs (`masks`), its configuration space (`space`) and its search contract
(`method.Prune`)."""
