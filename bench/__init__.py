"""ckpt-prefetch-bench: the benchmark, synthetic checkpoints and the simulated network FS.

Modules (import what you need; this package imports nothing heavy by itself):

* ``bench.cli``: the ``ckpt-prefetch-bench`` command (``run``, ``make``, ``show``,
  ``compare``); ``bench.run``: the same as a Python API, in one import;
* running a suite: ``bench.suites`` (what to measure), ``bench.runner`` (the suite as a
  list of steps, carried out), ``bench.measure`` (one sample), ``bench.filesystems``
  (where, and the cold or hot cache), ``bench.launchers`` (the rank processes),
  ``bench.store`` (checkpoints made once and reused), ``bench.errors``;
* a rank process: ``bench.worker`` (its entry point), ``bench.rank`` (prepare, wait,
  load, report), ``bench.configs`` (the configuration strings), ``bench.consumer``
  (copy and checksum every tensor), ``bench.procstat`` (its memory, I/O and CPU);
* ``bench.protocol``: the messages between processes (launchers and ranks, the netfs
  client and server);
* ``bench.models``: samples and results as types; ``bench.results``: the versioned JSON
  documents, validation, comparison; ``bench.report``: the terminal table and the plot;
* ``bench.baselines``: no prefetch, the SGLang-style prefetch, plain striping; ``bench.floor``: the
  physical floor (raw parallel cold reads, fio);
* ``bench.checkpoint``: synthetic safetensors checkpoints; ``bench.netfs``: the simulated
  network filesystem (FUSE); ``bench.sshfs``: a real network filesystem client (sshfs to
  an sshd in a network namespace over a limited veth, counted by ``bench._sftp_counter``),
  with the same shape as ``bench.netfs``; ``bench.cgroup``: a memory cgroup for the
  bigger-than-memory scenario;
* host helpers: ``bench.mounts`` (mount points, setting read-ahead, on `engine.mounts`),
  ``bench.blockdev`` (block devices); byte sizes are `engine.units`;
* scenarios run by other harnesses through the same runner and results schema:
  ``bench.cluster_scenario`` (simulated nodes, `bench.cluster_sim`) and
  ``bench.fault_scenario`` (injected faults, `bench.reliability`).
"""
