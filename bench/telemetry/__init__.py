"""What the hardware says while a cell runs, and what it was measured on. torch-free, but for
env.py's fingerprint, which reads torch's versions lazily in the process that has it.

gpu.py (the reader interface, samples, clock-event reasons), nvml.py (NVIDIA), amd.py (AMD,
amdsmi), monitor.py (the sampling thread, the energy window, the record's POWER fields), env.py
(the environment fingerprint and ``ampbench env``), machine.py (the machine's state and the one
rule for its noise warnings, `env`'s and `run`'s), peaks.py (dense peak TFLOP/s per device).
"""
