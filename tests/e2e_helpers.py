"""Helpers for the end-to-end server tests: launch a real `python -m sglang.launch_server`
with the stand-in backend, drive it over HTTP, and clean up after it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests

from sglang_ext.plugin.ports import free_server_port

#: a config.json is all the stand-in needs from a "model"
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
    "num_hidden_layers": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
}
CONTEXT_LEN = TINY_CONFIG["max_position_embeddings"]
STARTUP_TIMEOUT_S = 420  # 2 cores: ~100 s plain DP, ~175 s with DP attention (import-bound)


def shm_files() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("sglang_")}
    except FileNotFoundError:
        return set()


@dataclass
class Server:
    base: Path
    port: int
    proc: subprocess.Popen
    tmpdir: Path
    log_dir: Path
    log_path: Path
    shm_before: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def processes(self) -> list[psutil.Process]:
        """The launcher and all its descendants still alive."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def controller(self) -> psutil.Process:
        for p in self.processes():
            try:
                if "data_parallel_controller" in p.name() or "data_parallel_controller" in " ".join(p.cmdline()):
                    return p
            except psutil.NoSuchProcess:
                pass
        raise AssertionError("no DP controller process found")

    def stop(self, timeout: float = 60.0) -> int | None:
        """Graceful stop (SIGTERM to the launcher), then SIGKILL to the whole group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for p in self.processes():  # children that left the group
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def cleanup_files(self) -> None:
        for name in shm_files() - self.shm_before:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_server(base: Path, args: list[str], ready_timeout: float = STARTUP_TIMEOUT_S) -> Server:
    """Start the real SGLang HTTP server in its own process group, from a cwd outside the
    repository (the repo's top-level triton_kernels/ would shadow the real package)."""
    model = base / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    cwd, tmpdir, log_dir = base / "cwd", base / "tmp", base / "telemetry"
    for d in (cwd, tmpdir):
        d.mkdir(exist_ok=True)
    port = free_server_port()  # its DP-attention ZMQ ports too, all below the ephemeral range
    env = dict(os.environ)
    env["TMPDIR"] = str(tmpdir)  # every IPC file of this server lands here
    env.pop("SGLANG_USE_CPU_ENGINE", None)  # hard-imports sgl_kernel (design.md section 6)
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--skip-tokenizer-init",
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--balancer-log", str(log_dir), *args,
    ]
    log_path = base / "server.log"
    shm_before = shm_files()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(base, port, proc, tmpdir, log_dir, log_path, shm_before)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.cleanup_files()
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(2)
    server.stop(timeout=5)
    server.cleanup_files()
    raise RuntimeError(f"server not healthy after {ready_timeout:.0f} s:\n{server.log_tail()}")


# ---- workload -------------------------------------------------------------------------------


@dataclass
class Job:
    idx: int
    prompt_len: int
    max_new: int
    route: str  # "generate" | "stream" | "completions"


def make_jobs(n: int = 200, seed: int = 0) -> list[Job]:
    """Mixed prompt lengths (heavy tail: a fifth of them long) and output caps."""
    rng = np.random.default_rng(seed)
    long = rng.random(n) < 0.2
    prompt = np.where(long, rng.integers(800, 3000, n), rng.integers(8, 200, n))
    max_new = rng.integers(4, 97, n)
    routes = np.array(["generate", "generate", "stream", "completions"])[rng.integers(0, 4, n)]
    return [Job(i, int(p), int(m), str(r)) for i, (p, m, r) in enumerate(zip(prompt, max_new, routes))]


def _ids(job: Job) -> list[int]:
    return [(job.idx * 7 + k) % 30000 + 10 for k in range(job.prompt_len)]


def run_job(url: str, job: Job, timeout: float = 120) -> dict:
    """Send one request; return what came back: tokens, finish count, dp_rank, errors."""
    if job.route == "completions":
        r = requests.post(url + "/v1/completions", json={
            "model": "default", "prompt": _ids(job), "max_tokens": job.max_new, "temperature": 0,
        }, timeout=timeout)
        r.raise_for_status()
        body = r.json()
        choice = body["choices"][0]
        return {"tokens": body["usage"]["completion_tokens"], "finishes": 1 if choice["finish_reason"] else 0,
                "finish_reason": choice["finish_reason"], "dp_rank": None}
    payload = {"input_ids": _ids(job), "sampling_params": {"max_new_tokens": job.max_new, "temperature": 0}}
    if job.route == "stream":
        payload["stream"] = True
        finishes, last, dp_rank = 0, None, None
        with requests.post(url + "/generate", json=payload, stream=True, timeout=timeout) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line or not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                last = chunk
                dp_rank = chunk["meta_info"].get("dp_rank", dp_rank)
                if chunk["meta_info"].get("finish_reason"):
                    finishes += 1
        return {"tokens": len(last["output_ids"]), "finishes": finishes,
                "finish_reason": last["meta_info"]["finish_reason"]["type"], "dp_rank": dp_rank}
    r = requests.post(url + "/generate", json=payload, timeout=timeout)
    r.raise_for_status()
    body = r.json()
    meta = body["meta_info"]
    assert meta["completion_tokens"] == len(body["output_ids"])
    return {"tokens": len(body["output_ids"]), "finishes": 1 if meta.get("finish_reason") else 0,
            "finish_reason": meta["finish_reason"]["type"], "dp_rank": meta.get("dp_rank")}


def run_workload(url: str, jobs: list[Job], concurrency: int = 48, extra=None) -> tuple[list[dict], list]:
    """Run all jobs concurrently (plus `extra` callables, e.g. malformed requests, mixed in)."""
    extra = extra or []
    with ThreadPoolExecutor(concurrency) as pool:
        futs = [pool.submit(run_job, url, j) for j in jobs]
        extra_futs = [pool.submit(fn) for fn in extra]
        results = [f.result() for f in futs]
        extra_results = [f.result() for f in extra_futs]
    return results, extra_results


def kv_spread(jobs: list[Job], results: list[dict], num_ranks: int) -> tuple[float, np.ndarray]:
    """Placed KV work per rank (prompt + output tokens of the requests whose dp_rank is known)
    and its spread, G * max - sum (the paper's imbalance proxy)."""
    load = np.zeros(num_ranks)
    for job, res in zip(jobs, results):
        if res["dp_rank"] is not None:
            load[res["dp_rank"]] += job.prompt_len + job.max_new
    return float(num_ranks * load.max() - load.sum()), load


def telemetry_imbalance(log_dir: Path, num_ranks: int) -> float:
    """Sum over synchronized steps of G * max_g kv_g - sum_g kv_g, from the ranks' telemetry
    (stand-in ranks count steps in lockstep, so step numbers align across ranks)."""
    per_step: dict[int, dict[int, int]] = {}
    for g in range(num_ranks):
        path = log_dir / f"rank{g}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            per_step.setdefault(rec["step"], {})[g] = rec["kv_tokens"]
    total = 0.0
    for ranks in per_step.values():
        kv = np.array([ranks.get(g, 0) for g in range(num_ranks)], dtype=np.float64)
        total += num_ranks * kv.max() - kv.sum()
    return total
