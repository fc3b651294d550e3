"""The optional CUDA path: one decode step of absorbed MLA in Triton, with a PyTorch fallback.

With the query moved into latent space (weight absorption), decoding one token is MQA over the
latent cache: one key head [c ; k^R] of size d_c + d_R and one value head c, the key's first d_c
columns.  So the whole step is a single pass over the cache, and its speed is the speed of reading it.

- ``mla_decode`` (dispatch.py): the entry point; checks its inputs, picks a backend per call.
- ``mla_decode_reference`` (reference.py): PyTorch, masked by lengths, fp32 softmax; the fallback.
- ``triton_decode.py``: the flash-decoding kernels, imported only when the Triton backend runs,
  so nothing here needs triton or a GPU unless asked for.
- ``validate.py``: what a valid call looks like.

MLA's absorbed path maps onto ``mla_decode`` like this, for one new token per sequence:
q = [q^N W_UK ; RoPE(q^R)] (b, h, d_c + d_R); cache = the latent cache rows [c ; k^R]
(b, t, d_c + d_R); lengths = how many rows each sequence holds; kv_lora_rank = d_c;
softmax_scale = 1/√(d_N + d_R).  The result (b, h, d_c) is then multiplied by W_UV^i per head.
"""

from mla_ref.kernels.dispatch import BACKENDS, mla_decode
from mla_ref.kernels.reference import gather_pages, mla_decode_reference

__all__ = ["BACKENDS", "gather_pages", "mla_decode", "mla_decode_reference"]
