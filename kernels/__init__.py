"""Triton ops (one op per file: kernel, launcher and a plain-torch reference).

Empty until the kernels issue lands; the models run on plain torch meanwhile.
"""
