#!/usr/bin/env python3
"""Serves labmcp-palmsens' MethodSCRIPT simulator (a third-party model of an EmStat Pico,
PyPI) on a pty, so labgate's driver can be tested against a device model it did not
write.

  labmcp_emstat_pty.py LINK DATA_LOG [SPEED]

LINK becomes a symlink to the pty's device; every line the simulator writes is appended
to DATA_LOG. Runs until killed.
"""
import os
import select
import sys
import time
import tty

from labmcp_palmsens.simulator import MethodScriptSimulator


def main():
    link, log_path = sys.argv[1], sys.argv[2]
    speed = float(sys.argv[3]) if len(sys.argv) > 3 else 20.0
    sim = MethodScriptSimulator(speed=speed, seed=5)
    master, slave = os.openpty()
    tty.setraw(slave)
    name = os.ttyname(slave)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(name, link)
    log = open(log_path, "a", buffering=1)
    pending = b""

    def send(lines):
        if lines is None:
            return
        if isinstance(lines, str):
            lines = [lines]
        for line in lines:
            os.write(master, (line + "\n").encode())
            log.write(line + "\n")

    while True:
        ready, _, _ = select.select([master], [], [], 0.005)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:
                data = b""
            pending += data
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                send(sim.handle(line.decode(errors="replace").rstrip("\r")))
        send(sim.poll())
        time.sleep(0.001)


if __name__ == "__main__":
    main()
