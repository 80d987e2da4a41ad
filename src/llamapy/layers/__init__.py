"""Building blocks of the models: linear layers over quantized weights, norms, rope, attention."""
