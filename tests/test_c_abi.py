"""An independent peer: a C program built against the kernel's own <linux/kvm_para.h>.

Debian's linux-libc-dev still ships the KVM_HC_MMU_OP structs; if our bytes and
the compiler's agree, a buffer pvmmu writes could be handed to C code as is.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

import protocol
from protocol import FlushTlb, ReleasePt, WritePte

C_SOURCE = r"""
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <linux/kvm_para.h>

static void dump(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
}

int main(void) {
    struct kvm_mmu_op_write_pte w;  memset(&w, 0, sizeof w);
    w.header.op = KVM_MMU_OP_WRITE_PTE; w.pte_phys = 0x1122334455667788ULL; w.pte_val = 0x8000000000000067ULL;
    struct kvm_mmu_op_flush_tlb f;  memset(&f, 0, sizeof f);
    f.header.op = KVM_MMU_OP_FLUSH_TLB;
    struct kvm_mmu_op_release_pt r; memset(&r, 0, sizeof r);
    r.header.op = KVM_MMU_OP_RELEASE_PT; r.pt_phys = 0xabc000ULL;
    dump(&w, sizeof w); dump(&f, sizeof f); dump(&r, sizeof r);
    printf("%d %d %d %d %d %d\n", KVM_HC_MMU_OP, KVM_ENOSYS, KVM_EFAULT, KVM_E2BIG, KVM_EPERM,
           (int)sizeof(struct kvm_mmu_op_header));
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_peer(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler on this machine")
    d = tmp_path_factory.mktemp("cabi")
    (d / "abi.c").write_text(C_SOURCE)
    build = subprocess.run([cc, "-o", str(d / "abi"), str(d / "abi.c")], capture_output=True, text=True)
    if build.returncode != 0:
        if "kvm_para.h" in build.stderr:
            pytest.skip("kernel headers with <linux/kvm_para.h> are not installed (Debian: linux-libc-dev)")
        pytest.fail(f"C peer did not build:\n{build.stderr}")
    return subprocess.run([str(d / "abi")], capture_output=True, text=True, check=True).stdout.split("\n")


def test_op_bytes_match_the_kernel_structs(c_peer):
    w, f, r = (bytes.fromhex(line) for line in c_peer[:3])
    assert WritePte(0x1122334455667788, 0x8000000000000067).encode() == w
    assert FlushTlb().encode() == f
    assert ReleasePt(0xABC000).encode() == r
    assert protocol.decode(w + f + r) == [
        WritePte(0x1122334455667788, 0x8000000000000067),
        FlushTlb(),
        ReleasePt(0xABC000),
    ]


def test_constants_match_the_kernel_headers(c_peer):
    hc, enosys, efault, e2big, eperm, header = map(int, c_peer[3].split())
    assert (hc, enosys, efault, e2big, eperm) == (
        protocol.KVM_HC_MMU_OP,
        protocol.KVM_ENOSYS,
        protocol.KVM_EFAULT,
        protocol.KVM_E2BIG,
        protocol.KVM_EPERM,
    )
    assert header == protocol.HEADER.size
