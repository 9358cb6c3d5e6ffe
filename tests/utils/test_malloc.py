"""utils.malloc: the glibc setting is applied once per process unless the user chose otherwise."""

import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, sys
from detectron_res.utils.malloc import keep_freed_memory
applied = keep_freed_memory()
# after M_MMAP_MAX = 0 a 64 MB block comes from the heap: glibc's mallinfo2 counts it in the arena, not in hblkhd
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
info = libc.mallinfo2()
print(applied, info.hblkhd >= (64 << 20))
"""


def run(env_extra: dict) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DETECTRON_RES_MALLOC")}
    return subprocess.run([sys.executable, "-c", SCRIPT], env={**env, **env_extra}, capture_output=True, text=True,
                          check=True).stdout.split()  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_come_from_the_heap_once_applied():
    assert run({}) == ["True", "False"]  # applied: the 64 MB block is no separate mapping


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("env", [{"DETECTRON_RES_MALLOC": "system"}, {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}])
def test_the_users_choice_wins(env):
    assert run(env) == ["False", "True"]  # not applied: glibc maps the 64 MB block on its own
