"""ckpt-prefetch-bench: the benchmark, synthetic checkpoints and the simulated network FS.

Modules (import what you need; this package imports nothing heavy by itself):

* ``bench.cli``: the ``ckpt-prefetch-bench`` command (``run``, ``make``, ``show``,
  ``compare``);
* ``bench.run``: suites and cold-cache measurements in fresh rank processes;
* ``bench.worker``: one rank process, and the configuration strings;
* ``bench.baselines``: no prefetch, and the SGLang-style prefetch;
* ``bench.floor``: the physical floor (raw parallel cold reads, fio);
* ``bench.results``: the versioned JSON results, validation, comparison;
* ``bench.report``: the terminal table and the PNG plot;
* ``bench.cgroup``: a memory cgroup for the bigger-than-memory scenario;
* ``bench.checkpoint``: synthetic safetensors checkpoints;
* ``bench.netfs``: the simulated network filesystem (FUSE);
* ``bench.sshfs``: a real network filesystem client (sshfs to an sshd in a network
  namespace over a limited veth), with the same shape as ``bench.netfs``.
"""
