"""Independent reference implementations used as test oracles."""
import numpy as np


def np_quant(x, amax, num_bits=8, unsigned=False, narrow_range=True):
    """Independent numpy reference: float32 step = amax/max_bound, round half to even."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.asarray(amax, dtype=np.float32)
    max_bound = 2 ** (num_bits - 1 + int(unsigned)) - 1
    min_bound = 0 if unsigned else (-max_bound if narrow_range else -max_bound - 1)
    tiny = amax <= np.float32(2.0 ** -24)
    step = np.where(tiny, np.float32(1), amax / np.float32(max_bound)).astype(np.float32)
    codes = np.clip(np.rint(x / step), min_bound, max_bound).astype(np.float32)
    codes = np.where(tiny, np.float32(0), codes).astype(np.float32)
    return codes, (codes * step).astype(np.float32), step
