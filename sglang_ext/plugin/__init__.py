"""SGLang plugin entry point (`sglang.srt.plugins`: sglang_ext=sglang_ext.plugin:load).

SGLang runs `load()` in the launcher and again in every spawned process (DP
controller, schedulers, detokenizer). Hooks are registered per process only on
modules that process has already imported, because `HookRegistry.apply_hooks`
imports every target: registering scheduler hooks unconditionally would import
the whole scheduler stack into the detokenizer too.

- launcher (server_args imported): CLI flags (`config.add_cli_args`,
  `config.from_cli_args`), and in every process `PortArgs.init_new` records its
  ipc files for the launcher to remove at exit (`ipc_cleanup`); when --balancer-sim-backend is given, from_cli_args
  also hooks `Engine._launch_scheduler_processes` to launch the stand-in;
- DP controller: `patches.controller` (dispatch through the policy, poller loop);
- schedulers: `patches.scheduler` (per-step reports, telemetry).

Every hook checks `server_args._balancer` and does nothing without it.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_PORT_ARGS = "sglang.srt.server_args.PortArgs"
_CONTROLLER = "sglang.srt.managers.data_parallel_controller.DataParallelController"
_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
_DP_ATTN = "sglang.srt.managers.scheduler_components.dp_attn.SchedulerDPAttnAdapter"
_ENGINE = "sglang.srt.entrypoints.engine.Engine"


def _module_of(target: str) -> str:
    return target.rsplit(".", 1)[0]


def load() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from . import config

    HookRegistry.register(f"{_SERVER_ARGS}.add_cli_args", config.add_cli_args, HookType.AFTER)
    HookRegistry.register(f"{_SERVER_ARGS}.from_cli_args", config.from_cli_args, HookType.AFTER)
    # Every process that allocates ipc sockets records them for the launcher's cleanup.
    from .ipc_cleanup import after_port_args_init

    HookRegistry.register(f"{_PORT_ARGS}.init_new", after_port_args_init, HookType.AFTER)

    if _module_of(_CONTROLLER) in sys.modules:
        from sglang_ext.patches import controller

        HookRegistry.register(f"{_CONTROLLER}.__init__", controller.after_init, HookType.AFTER)
        HookRegistry.register(f"{_CONTROLLER}.event_loop", controller.around_event_loop, HookType.AROUND)

    if _module_of(_SCHEDULER) in sys.modules:
        from sglang_ext.patches import scheduler

        for method in ("handle_generate_request", "handle_embedding_request"):
            HookRegistry.register(f"{_SCHEDULER}.{method}", scheduler.after_handle_request, HookType.AFTER)
        HookRegistry.register(f"{_SCHEDULER}.process_batch_result", scheduler.after_process_batch_result,
                              HookType.AFTER)
        HookRegistry.register(f"{_SCHEDULER}.on_idle", scheduler.after_on_idle, HookType.AFTER)
        HookRegistry.register(f"{_DP_ATTN}.maybe_prepare_mlp_sync_batch", scheduler.around_mlp_sync,
                              HookType.AROUND)


def enable_standin_launch() -> None:
    """Called by `config.from_cli_args` in the launcher when --balancer-sim-backend is set:
    swap SGLang's scheduler process function for the stand-in's at launch."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .standin import around_launch_scheduler_processes

    HookRegistry.register(f"{_ENGINE}._launch_scheduler_processes", around_launch_scheduler_processes,
                          HookType.AROUND)
    HookRegistry.apply_hooks()  # idempotent: only the new target is patched
