"""Memory of memory-mapped Arrow data: pages a process read from a Dataset's cache files stay counted in its RSS
(RssFile) until they are dropped, so readers drop them every so often."""

import os

MADV_DONTNEED = 4
RELEASE_EVERY = 64  # a map-style dataset drops the Arrow pages it mapped every this many items
STREAM_RELEASE_EVERY = 256  # a stream hands Arrow's freed memory back every this many files read


def release_mapped_pages(paths) -> int:
    """Drops the pages of the memory-mapped files `paths` (a Dataset's Arrow cache files) from this process
    (`madvise(MADV_DONTNEED)` over their mappings, found in /proc/self/maps): reading rows maps their pages (and the
    kernel's read-around), and they would stay counted in the process's RSS (RssFile) until it ends. The mappings
    stay valid: a later read maps the pages again from the page cache. Returns the bytes of the mappings released
    (0 where this is not Linux)."""
    global _libc
    paths = {os.path.realpath(p) for p in paths}
    if not paths or not os.path.exists("/proc/self/maps"):
        return 0
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") in paths:
                start, end = (int(v, 16) for v in fields[0].split("-"))
                if _libc.madvise(start, end - start, MADV_DONTNEED) == 0:
                    released += end - start
    return released


_libc = None


def arrow_files(data) -> list:
    """The Arrow cache files a Dataset is memory-mapped from."""
    return [f["filename"] for f in data.cache_files]
