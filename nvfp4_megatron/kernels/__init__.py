"""Triton fast paths for the ``formats`` quantizers, bit-exact with them (tests/kernels).

``dispatch`` is the entry point the rest of the package uses: CUDA tensors go to the kernels
(``nvfp4``, ``mx``, ``fp8``, ``amax``), everything else to the pure-PyTorch reference. The kernel
modules import Triton at import time, so import them only through ``dispatch`` (which loads them
lazily) on machines that may lack it. ``_common`` holds the exact rounding and RHT helpers; its
docstring explains why each operation is bit-identical to the reference.
"""
