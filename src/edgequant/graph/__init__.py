"""Passes over the captured (torch.export) graph: capture, the op vocabulary, annotation
(our Quantizer), BN folding, equalization, clipping, bias correction, exponent choice,
AdaRound and convert. A new graph pass goes here, as a module named for its verb."""
