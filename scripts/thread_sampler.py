"""Every 50 ms, every thread of every vLLM / policy-service process: one line when a thread is in
uninterruptible sleep (D) or waited > 30 ms on a run queue since the last sample (from /proc/.../schedstat),
with its state and kernel wait channel. Tells a CPU-starved thread (run-queue wait) from a blocked one.

usage: .venv/bin/python scripts/thread_sampler.py OUT.txt   (stop it with a signal)
"""

import os
import sys
import time


def _procs():
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            comm = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        if "VLLM" in comm or "api_server" in cmd or "policy serve" in cmd:
            yield int(pid), comm


def main(path: str) -> None:
    prev: dict[tuple[int, str], tuple[int, int]] = {}
    with open(path, "w", buffering=1) as out:
        while True:
            t = time.time()
            for pid, comm in list(_procs()):
                try:
                    tids = os.listdir(f"/proc/{pid}/task")
                except OSError:
                    continue
                for tid in tids:
                    try:
                        st = open(f"/proc/{pid}/task/{tid}/stat").read()
                        name = st[st.index("(") + 1: st.rindex(")")]
                        state = st[st.rindex(")") + 2]
                        run, wait, _ = map(int, open(f"/proc/{pid}/task/{tid}/schedstat").read().split())
                        wchan = open(f"/proc/{pid}/task/{tid}/wchan").read()
                    except (OSError, ValueError):
                        continue
                    before = prev.get((pid, tid))
                    prev[(pid, tid)] = (run, wait)
                    if before is None:
                        continue
                    drun, dwait = (run - before[0]) / 1e6, (wait - before[1]) / 1e6
                    if state == "D" or dwait > 30:
                        out.write(f"{t:.3f} {comm}:{pid} {name}:{tid} {state} {wchan} run+{drun:.0f}ms "
                                  f"wait+{dwait:.0f}ms\n")
            time.sleep(max(0.0, 0.05 - (time.time() - t)))


if __name__ == "__main__":
    main(sys.argv[1])
