"""audioclf: labelled audio clips in, a trained, quantized and exported classifier out."""

__version__ = "0.1.0"
