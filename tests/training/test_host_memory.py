"""The host memory policy: after `retain_freed_memory()`, a large tensor freed and allocated again, step after
step, costs no page faults once the heap has settled (checked in a fresh interpreter, since the policy is
process-wide)."""

import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from jetmoe.training.host_memory import retain_freed_memory
applied = retain_freed_memory() if {retain} else False

def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MiB, over glibc's largest mmap threshold (32 MiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

# Small allocations in between can leave a freed block a little too short for the next one: the heap grows by a
# block now and then until it holds enough free room, as it would in the first steps of a training run.
faults = [faults_of_a_fresh_block() for _ in range(16)]
print(applied, sum(faults[-4:]))  # the settled steps
"""


def _probe(retain: bool) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(retain=retain)], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = _probe(retain=True)
    assert applied
    assert faults < 100  # a 64 MiB block is 16,384 pages
    _, default_faults = _probe(retain=False)
    assert default_faults > 10_000  # without the policy every allocation faults its pages in again

