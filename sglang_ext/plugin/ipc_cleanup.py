"""Leave no IPC file behind.

SGLang names its ZMQ ipc sockets with `tempfile.NamedTemporaryFile(delete=False)`
in `PortArgs.init_new`, in the launcher and again in the DP controller (one set
per rank). A SIGTERM'd server kills its children without closing their sockets,
so these files outlive it. With the plugin on, every process appends the paths
it allocates to a ledger named after the launcher's pid; the launcher, which
outlives its children, removes the listed files and the ledger at exit.
"""
from __future__ import annotations

import atexit
import logging
import os
import tempfile

logger = logging.getLogger(__name__)

_IPC_FIELDS = ("tokenizer_ipc_name", "scheduler_input_ipc_name", "detokenizer_ipc_name", "rpc_ipc_name",
               "metrics_ipc_name", "tokenizer_worker_ipc_name", "load_collector_ipc_name")


def ledger_path(launcher_pid: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"sglang_ext_ipc_{launcher_pid}.txt")


def after_port_args_init(result, server_args, *args, **kwargs):
    """AFTER hook on PortArgs.init_new: record the ipc files it allocated."""
    cfg = getattr(server_args, "_balancer", None)
    if cfg is None or not cfg.enabled or not getattr(cfg, "launcher_pid", None):
        return None
    paths = []
    for name in _IPC_FIELDS:
        addr = getattr(result, name, None)
        if isinstance(addr, str) and addr.startswith("ipc://"):
            paths.append(addr[len("ipc://"):])
    if paths:
        try:  # one short append per call: atomic enough across processes
            with open(ledger_path(cfg.launcher_pid), "a") as fh:
                fh.write("".join(p + "\n" for p in paths))
        except OSError as exc:
            logger.warning("sglang-ext: cannot record ipc files for cleanup: %s", exc)
    return None


def install_launcher_cleanup() -> int:
    """In the launcher: remove every recorded ipc file at exit. Returns its pid."""
    pid = os.getpid()
    atexit.register(remove_recorded, pid)
    return pid


def remove_recorded(launcher_pid: int) -> int:
    ledger = ledger_path(launcher_pid)
    removed = 0
    try:
        with open(ledger) as fh:
            paths = {line.strip() for line in fh if line.strip()}
    except OSError:
        return 0
    for path in paths:
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    try:
        os.unlink(ledger)
    except OSError:
        pass
    return removed
