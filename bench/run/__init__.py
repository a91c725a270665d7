"""The runner, the parent side of a sweep: it plans, launches and keeps records, and imports
no torch (a test checks).

command.py    the `ampbench run` command: flags, run directory, parity and report after
device.py     the device probe: one child process (bench/cell/probe.py) answers what torch knows
sweep.py      the sweep: plan, one child per process, OOM skips, --find-max-batch
budget.py     --time-budget: the deadline and each process's estimate
slots.py      --devices: which processes run where and when, side by side on a node's GPUs
node.py       world size node: every GPU of this node, counted by the device probe
console.py    progress lines and the summary table
launch.py     one child: its argv, its launch under a timeout, its tree killed, a record either way
proctree.py   process trees, and the watchdog a child runs against its runner
contention.py the machine's load around the sweep
lock.py       one process per run directory
signals.py    SIGINT, SIGTERM and SIGHUP stop a command like Ctrl-C (run and validate)
"""
