"""Maps and smaps text -> address spaces: what is taken, what is approximated, and clear errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from guest_proc.procmaps import MapsError, parse_maps, summary, to_vmas, trim_smaps
from protocol.layout import PAGE_SIZE
from pvmmu.maps import capture_pid, load_vmas, read_maps_file, resolve, shipped

SMAPS = """\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 1234                       /usr/bin/prog
Size:                  8 kB
Rss:                   8 kB
VmFlags: rd mr mw me
55d0c0a02000-55d0c0a06000 r-xp 00002000 fe:00 1234                       /usr/bin/prog
Size:                 16 kB
Rss:                  12 kB
VmFlags: rd ex mr mw me
55d0c1000000-55d0c1010000 rw-p 00000000 00:00 0                          [heap]
Size:                 64 kB
Rss:                  20 kB
Anonymous:            20 kB
7f0000000000-7f0000001000 ---p 00000000 00:00 0
Size:                  4 kB
Rss:                   0 kB
7f0000001000-7f0000009000 rw-s 00000000 00:01 99                         /dev/shm/some segment (deleted)
Size:                 32 kB
Rss:                   8 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  16 kB
VmFlags: rd wr mr mw me gd ac
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
Size:                  4 kB
Rss:                   0 kB
"""


def test_what_is_taken_from_smaps():
    maps = parse_maps(SMAPS)
    assert [m.perms for m in maps] == ["r--p", "r-xp", "rw-p", "---p", "rw-s", "rw-p", "--xp"]
    assert maps[4].path == "/dev/shm/some segment (deleted)"  # paths keep their spaces
    in_order = to_vmas(maps)
    vmas = {v.name: v for v in in_order}
    assert "[vsyscall]" not in vmas and len(in_order) == 6  # kernel space
    prog, text, heap = in_order[0], in_order[1], vmas["[heap]"]
    assert (prog.write, prog.exec, prog.shared, len(prog.resident)) == (False, False, False, 2)
    assert (text.exec, len(text.resident)) == (True, 3)
    assert (heap.write, heap.shared, heap.resident[:2]) == (True, False, [heap.start, heap.start + PAGE_SIZE])
    assert len(heap.resident) == 5  # Rss 20 kB, placed from the start
    shm = vmas["/dev/shm/some segment (deleted)"]
    assert shm.shared and shm.write and len(shm.resident) == 2
    stack = vmas["[stack]"]
    assert stack.resident == [stack.end - (4 - i) * PAGE_SIZE for i in range(4)]  # grows down: from the top
    guard = vmas["[anon ---p]"]
    assert not guard.accessible and guard.resident == []
    assert summary(maps) == {"vmas": 6, "mapped_pages": 2 + 4 + 16 + 1 + 8 + 33, "resident_pages": 2 + 3 + 5 + 2 + 4,
                             "private_writable_pages": 9, "page_tables": 4 + 3 + 3 + 1, "smaps": True}  # fmt: skip
    # page tables: 4 PTs (prog and its text share a 2 MiB region), 3 PDs, 3 PDPTs, the PML4


def test_plain_maps_count_every_accessible_page_as_resident():
    text = "\n".join(line for line in SMAPS.splitlines() if re.match(r"^[0-9a-f]+-", line))
    maps = parse_maps(text)
    assert all(m.rss_kb is None for m in maps)
    vmas = to_vmas(maps)
    assert [len(v.resident) for v in vmas] == [2, 4, 16, 0, 8, 33]
    assert not summary(maps)["smaps"]


@pytest.mark.parametrize(
    "text, where, what",
    [
        ("", None, "no VMAs"),
        ("# only a comment\n", None, "no VMAs"),
        ("\x00\x01\x02garbage\n", 1, "neither a maps line nor an smaps field"),
        ("00400000-00401000 r-xp 00000000 00:00 0 /x\nRss: lots\n", 2, "not a number of kB"),
        ("00400000-00401000 r-xp 00000000 00:00 0 /x\nSize: 4 kB\nRss: 8 kB\n", 1, "exceeds"),
        ("00400000-00401000 r-xp 00000000 00:00 0 /x\nSize: 8 kB\nRss: 4 kB\n", 1, "Size 8 kB but the range is 4"),
        ("00400800-00401000 r-xp 00000000 00:00 0 /x\n", 1, "page-aligned"),
        ("00402000-00401000 r-xp 00000000 00:00 0 /x\n", 1, "start below end"),
        ("00400000-00402000 r-xp 0 00:00 0\n00401000-00403000 r-xp 0 00:00 0\n", 2, "overlaps"),
        ("Rss: 4 kB\n00400000-00401000 r-xp 00000000 00:00 0 /x\n", 1, "before any VMA"),
        ("00400000-00401000 r-xp 00000000 00:00 0 /x\nSize: 4 kB\n", 1, "no Rss (truncated?)"),
        ("00400000-00401000 r-xp 0 00:00 0\nRss: 4 kB\nRss: 4 kB\n", 3, "twice"),
        ("00400000-00401000 r-xp 0 00:00 0\nRss: 4 kB\n00401000-00402000 r-xp 0 00:00 0\n", 3, "without smaps fields"),
        ("00400000-00401000 rwzp 00000000 00:00 0 /x\n", 1, "neither a maps line"),
    ],
)
def test_malformed_text_is_refused_naming_the_line(text, where, what):
    with pytest.raises(MapsError) as err:
        parse_maps(text, "f.smaps")
    assert what in str(err.value) and str(err.value).startswith("f.smaps: ")
    assert err.value.line == where
    if where is not None:
        assert f"line {where}:" in str(err.value)


def test_a_truncated_smaps_is_refused_wherever_it_is_cut():
    text = open(shipped()["bash"]).read()
    lines = text.splitlines(keepends=True)
    full = parse_maps(text)
    refused = 0
    for cut in range(1, len(lines)):
        head = "".join(lines[:cut])
        if lines[cut - 1].startswith("VmFlags"):
            continue  # cut after a VMA's last field: a shorter, well-formed capture
        try:
            got = parse_maps(head)
        except MapsError:
            refused += 1
            continue
        # What still parses is exactly what is there: VMAs of the full text, with their Rss
        # (or one lone maps line, which is a plain maps text).
        if len(got) == 1 and got[0].rss_kb is None:
            continue
        assert [(m.start, m.rss_kb) for m in got] == [(m.start, m.rss_kb) for m in full[: len(got)]]
    assert refused >= 2 * len(full) - 2  # every cut after a VMA's maps line (but the first) or its Size line


def test_shipped_captures_are_real_processes_and_parse():
    captures = shipped()
    assert set(captures) == {"bash", "python3", "node"}
    for name, path in captures.items():
        text = open(path).read()
        assert text.startswith("# pid ") and f"({name})" in text.splitlines()[0]
        maps = parse_maps(text, name)
        rss_pages = sum(int(x) for x in re.findall(r"^Rss:\s+(\d+) kB", text, re.M)) // 4
        s = summary(maps)
        assert s["smaps"] and s["resident_pages"] == rss_pages  # nothing resident is above user space here
        assert s["vmas"] == len(re.findall(r"^[0-9a-f]+-[0-9a-f]+ ", text, re.M)) - text.count("[vsyscall]")
    sizes = {name: summary(parse_maps(open(p).read()))["resident_pages"] for name, p in captures.items()}
    assert sizes["bash"] < sizes["python3"] < sizes["node"]


def test_capture_of_a_live_process_and_trimming_keep_its_shape():
    text, comm = capture_pid(os.getpid())
    assert comm and "Rss:" in text
    full, trimmed = parse_maps(text), parse_maps(trim_smaps(text))
    assert [(m.start, m.end, m.perms, m.rss_kb) for m in full] == [(m.start, m.end, m.perms, m.rss_kb) for m in trimmed]
    assert len(trim_smaps(text)) < len(text) / 2


def test_dead_and_missing_processes_and_files_get_one_clear_line(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(MapsError, match=rf"^pid {child.pid}: no such process$"):
        capture_pid(child.pid)
    with pytest.raises(MapsError, match="not a process id"):
        capture_pid(0)
    with pytest.raises(MapsError, match="no such file"):
        read_maps_file(str(tmp_path / "none"))
    with pytest.raises(MapsError, match="is a directory"):
        read_maps_file(str(tmp_path))
    with pytest.raises(MapsError, match=r"nor a shipped capture \(shipped: bash, node, python3\)"):
        resolve("firefox")
    assert resolve("bash") == shipped()["bash"]
    (tmp_path / "bad.smaps").write_bytes(os.urandom(200) + b"\n")
    with pytest.raises(MapsError, match=r"bad.smaps: line \d+: "):
        load_vmas(str(tmp_path / "bad.smaps"))


def test_a_kernel_thread_has_no_address_space():
    if not os.path.exists("/proc/2/comm") or open("/proc/2/comm").read().strip() != "kthreadd":
        pytest.skip("no kthreadd at pid 2 here")
    with pytest.raises(MapsError, match="no user address space"):
        capture_pid(2)
