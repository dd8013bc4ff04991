"""Stale code on purpose: the service stale-tmp-script copies this file to /tmp/old.py and runs it there
(python3 /tmp/old.py), so the code a process runs is not the release's own file."""
import time

print("running /tmp/old.py, a copy of the release's file outside the read-only root", flush=True)
while True:
    time.sleep(3600)
