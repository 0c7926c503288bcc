"""A module the warm runner tests run: reports what it sees, then exits with a given code.

    python -m tests.demo_wine.warm_probe CODE [PIDFILE]

Prints its process mark, working directory, one line read from stdin and its process name,
then (from a thread and an exit handler) two more lines; with PIDFILE it writes its pid there
and waits to be killed.
"""

import atexit
import os
import sys
import threading
import time

if __name__ == "__main__":
    code, pidfile = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else None)
    print(f"mark={os.environ.get('DEMO_WINE_PROCESS', 'cold')}")
    print(f"cwd={os.getcwd()}")
    print(f"probe={os.environ.get('PROBE', '')}")
    print(f"stdin={sys.stdin.readline().strip()}")
    print(f"umask={os.umask(0o22):o}")
    with open("/proc/self/comm") as comm:
        print(f"comm={comm.read().strip()}", flush=True)
    sys.stderr.write("to stderr\n")
    atexit.register(print, "atexit ran")  # a run ends like a process: exit handlers run...
    threading.Thread(
        target=lambda: (time.sleep(0.3), print("thread done"))
    ).start()  # ...after its threads
    if pidfile:
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(pidfile + ".tmp", pidfile)
        time.sleep(600)
    sys.exit(code)
