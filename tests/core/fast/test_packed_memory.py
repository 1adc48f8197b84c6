"""oneDNN's caches of compiled products stay bounded however many row counts the packed linears
meet (core.fast.packed): a serving process must not grow with each new prompt length."""

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.fast.packed import onednn_available

REPO = Path(__file__).resolve().parents[3]

# Packed products over 2 x N different row counts: malloc's bytes in use after the first N and after
# the second N. Four weight shapes, as a block's linears have.
PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    from core.fast.packed import pack_weight, packed_linear

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                   "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = Info
    torch.set_num_threads(1)
    n = int(sys.argv[1])
    weights = [torch.randn(o, i) for o, i in ((768, 256), (256, 256), (1024, 256), (256, 1024))]
    packed = [pack_weight(w, 64) for w in weights]
    in_use = []
    with torch.no_grad():
        for rows in (range(2, n + 2), range(n + 2, 2 * n + 2)):
            for m in rows:
                for w, p in zip(weights, packed):
                    packed_linear(torch.randn(m, w.shape[1]), p, None)
            in_use.append(mallinfo2().uordblks)
    print(*in_use)
""")


def growth(n: int, **env: str) -> tuple[float, float]:
    """MB of malloc in use gained over the first ``n`` row counts, and over the next ``n``."""
    environ = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    environ.update(env, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", PROBE, str(n)], env=environ, capture_output=True, text=True,
                         check=True, timeout=600).stdout
    first, second = (int(v) for v in out.split())
    return first / 2**20, (second - first) / 2**20


@pytest.mark.skipif(not onednn_available(__import__("torch").float32), reason="torch built without oneDNN")
@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc's mallinfo2")
def test_onednn_caches_stay_bounded_over_new_row_counts():
    # 4 shapes x 200 row counts = 800 products per half: past our 256 places, within oneDNN's 1,024.
    _, ours = growth(200)
    _, library = growth(200, ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    assert ours < 8, f"malloc grew {ours:.1f} MB over the second 200 row counts with the caches bounded"
    assert library > 4 * max(ours, 1), f"the library's defaults grew only {library:.1f} MB (ours {ours:.1f})"
