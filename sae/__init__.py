"""sae: sparse autoencoders (sparse dictionaries) on transformer activations."""

__version__ = "0.1.0"
