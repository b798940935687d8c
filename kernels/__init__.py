"""Packed weight formats and the modules that run them.

`intpack` is the bit-level layout (the on-disk format spec), `quant_linear` the group-wise integer
linear layer, `formats` the registry the Hugging Face loader uses to build modules from a packed
checkpoint's quantization_config.
"""
