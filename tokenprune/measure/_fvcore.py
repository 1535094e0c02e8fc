"""fvcore, imported once and quietly.

Importing `fvcore.nn` runs `torch.jit.script` on its focal losses, which recent torch answers with a FutureWarning on
every import of tokenprune. It concerns fvcore's losses, not the FLOP counting used here, so it is silenced here only.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import conv_flop_jit, einsum_flop_jit, get_shape, linear_flop_jit

__all__ = ["FlopCountAnalysis", "conv_flop_jit", "einsum_flop_jit", "get_shape", "linear_flop_jit"]
