"""FairMed, everything that is the method's: the probers (`probers`) and their cache (`cache`, which
`repair probe` uses), the neutralizer hook (`neutralizer`), its configuration space (`space`) and its
search contract (`method.FairMed`)."""
