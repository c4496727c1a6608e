"""paliseg: PaliGemma token-based segmentation in JAX/Flax.

This package is the model and the shared contracts (configs, the token codec, the annotation record,
file and console conventions). It imports no pipeline stage; only `paliseg.cli` sees everything.
"""

__version__ = "0.1.0"
