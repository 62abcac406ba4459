"""tqai: TurboQuant compression of KV caches and activations (the array-API core).

The core is the reference math (codebooks, rotations, quantizers, bit packing, the compressed
format), the plugin registry and the CLI. It imports no torch, mlx, triton, transformers or
diffusers: backends (tqai-torch, tqai-mlx, tqai-diffusers) plug in through entry points.

Example:
    >>> import numpy as np, tqai
    >>> q = tqai.TurboQuantMSE(d=64, n_bits=3)
    >>> qt = q.quantize(np.ones((4, 64), dtype=np.float32))
    >>> qt.bits_per_coordinate
    3.25
"""

from importlib.metadata import version as _version

from tqai.codebooks import Codebook, codebook_distortion, lloyd_max_codebook
from tqai.container import QuantizedTensor, QuantizerSpec, TqaiFormatError
from tqai.packing import pack_bits, packed_length, unpack_bits
from tqai.patching import patch, unpatch
from tqai.quantizers import TurboQuantMSE, TurboQuantProd
from tqai.rotations import HaarRotation, HadamardRotation, Rotation, RotorRotation, make_rotation

__version__ = _version("tqai-core")

__all__ = [
    "Codebook",
    "HaarRotation",
    "HadamardRotation",
    "QuantizedTensor",
    "QuantizerSpec",
    "Rotation",
    "RotorRotation",
    "TqaiFormatError",
    "TurboQuantMSE",
    "TurboQuantProd",
    "__version__",
    "codebook_distortion",
    "lloyd_max_codebook",
    "make_rotation",
    "pack_bits",
    "packed_length",
    "patch",
    "unpack_bits",
    "unpatch",
]
