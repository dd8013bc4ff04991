"""Stale code on purpose (service stale-shm-lib): load a shared library from /dev/shm, then delete it.

The process keeps an executable mapping (r-xp) of a deleted file outside the read-only root, as a program
that unpacks a plugin to shared memory would.
"""
import ctypes
import glob
import os
import shutil
import time

src = sorted(glob.glob("/usr/lib/*-linux-gnu/libz.so.1"))[0]
dst = f"/dev/shm/libstale-{os.getpid()}.so"
shutil.copy(src, dst)
lib = ctypes.CDLL(dst)
os.unlink(dst)
lib.zlibVersion.restype = ctypes.c_char_p
print(f"loaded a copy of {src} from {dst} (zlib {lib.zlibVersion().decode()}) and deleted it", flush=True)
while True:
    time.sleep(3600)
