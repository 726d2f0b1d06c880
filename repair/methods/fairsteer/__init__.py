"""FairSteer, everything that is the method's: the labels, probes and steering vectors (`steering`),
the gated steering hook (`steerer`), its configuration space (`space`) and its search contract
(`method.FairSteer`)."""
