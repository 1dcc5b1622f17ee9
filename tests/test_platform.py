"""Process settings made on import: host memory kept for reuse between steps."""

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Page faults of a second 256 MB block malloc'ed in a thread (as XLA's CPU runtime does a
# step's working memory) after a first one was freed, in a fresh process: with eb_jax's
# setting (made on import), or with glibc's defaults restored.
FAULTS = """
import ctypes, resource, threading
from eb_jax import platform
platform.reuse_host_memory({reuse})
libc, size = ctypes.CDLL(None), 2**28
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def use_a_block():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)

def faults_of_second_block(out):
    use_a_block()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    use_a_block()
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

out = []
thread = threading.Thread(target=faults_of_second_block, args=(out,))
thread.start()
thread.join()
print(out[0])
"""


def _faults_of_second_block(reuse: bool) -> int:
    env = {**os.environ, "PYTHONPATH": ROOT}
    script = FAULTS.format(reuse=reuse)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout)


@pytest.mark.slow  # subprocesses
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_freed_host_memory_is_reused_without_page_faults():
    pages = 2**28 // 4096
    assert _faults_of_second_block(reuse=True) < pages // 100
    # glibc's defaults: the block is mapped afresh, every page faulted again.
    assert _faults_of_second_block(reuse=False) > pages // 2
