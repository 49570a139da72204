"""Shared pieces of the benchmarks: environment, prompts, servers, configs, RSS sampling.

Not a benchmark itself. Every script puts the project root on ``sys.path`` and imports this
before Prefect, so that Prefect's ephemeral API gets the settings this machine needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Before Prefect is imported anywhere (see ENV.md).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

ORCH_PYTHON = ROOT / ".venv" / "bin" / "python"
ENGINE_PYTHON = Path(os.environ.get("MODELYARD_ENGINE_PYTHON", ROOT / ".venv-engine" / "bin" / "python"))
TINY = "builtin:tiny-llama"
MINILM = "builtin:minilm"
KV_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}

# A handful of long shared instructions and a short unique tail: rows that share an instruction
# share a prompt prefix, which vLLM's prefix cache can reuse when they run together.
INSTRUCTIONS = [
    "You are reviewing customer feedback for a hardware store. Summarize the following note in one short "
    "paragraph, naming the product and the customer's main complaint, and suggest one concrete next step:",
    "Translate the following sentence into plain, friendly English suitable for a children's book, keeping "
    "every name and number exactly as written and adding nothing else:",
    "Write a short product description for an online catalogue. Mention the material, the size and one use "
    "case, and end with a sentence that invites the reader to try it:",
    "Classify the tone of the following message as calm, annoyed, angry or delighted, then explain the choice "
    "in two sentences that quote the words that decided it:",
    "Draft a polite reply from a support agent who apologises for the delay, promises a follow-up within two "
    "business days, and asks for the order number if it is missing:",
    "List three questions a careful editor would ask the author of the following paragraph, each on its own "
    "line and each pointing at a claim that needs a source:",
    "Rewrite the following meeting note as a numbered list of decisions and owners, dropping small talk and "
    "keeping dates in ISO format:",
    "Explain the following error message to a new developer in simple words, then give the most likely cause "
    "and one command that would confirm it:",
]
WORDS = ("lamp drill ladder paint hinge valve cable router kettle blender sofa shelf window door carpet "
         "battery charger screen keyboard mouse printer camera lens tripod stove oven fridge heater fan "
         "faucet shower mirror pillow blanket jacket boots glove helmet bicycle scooter tent lantern").split()


def make_prompts(n: int, seed: int = 7) -> list[str]:
    """``n`` prompts: shared instructions (in shuffled order) with unique tails."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tail = " ".join(rng.choice(WORDS) for _ in range(12))
        out.append(f"{INSTRUCTIONS[rng.randrange(len(INSTRUCTIONS))]}\n\nNote {i}: {tail}.")
    return out


def chat_body(served: str, prompt: str, max_tokens: int) -> dict:
    """The request modelyard's text stage sends (same key order), for the raw client and run-batch."""
    return {"model": served, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": prompt}]}


def params(max_tokens: int) -> dict:
    return {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def model_configs(cfg_models: dict, base_dir: Path, env: dict | None = None):
    """pydantic ModelConfig/EngineConfig for REGISTRY.acquire, from the same dicts a YAML holds."""
    from modelyard.config import EngineConfig, ModelConfig

    return ({n: ModelConfig.model_validate(m) for n, m in cfg_models.items()},
            EngineConfig(env={**KV_ENV, **(env or {})}))


@contextlib.contextmanager
def managed_servers(models: dict[str, dict], base_dir: Path, env: dict | None = None):
    """Start servers through modelyard's own REGISTRY (side by side); stop them on exit, always.
    ``env``: more engine environment variables."""
    from concurrent.futures import ThreadPoolExecutor

    from modelyard.serving import REGISTRY

    mcfgs, engine = model_configs(models, base_dir, env)
    started = {}
    try:
        with ThreadPoolExecutor(max(1, len(mcfgs))) as ex:
            futs = {n: ex.submit(REGISTRY.acquire, n, m, engine, base_dir) for n, m in mcfgs.items()}
            errors = []
            for n, f in futs.items():
                try:
                    started[n] = f.result()
                except Exception as e:  # noqa: BLE001
                    errors.append(e)
            if errors:
                raise errors[0]
        yield started
    finally:
        for s in started.values():
            REGISTRY.release(s)
        # nothing of ours may outlive the benchmark
        for s in list(REGISTRY.servers.values()):
            if s.refs <= 0:
                s.stop()


def processes(root, tree: bool = False, exclude=None):
    """``root`` (a psutil.Process) and, with ``tree``, its living descendants, without those
    ``exclude`` names (and those gone meanwhile)."""
    import psutil

    procs = [root]
    if tree:
        try:
            procs += root.children(recursive=True)
        except psutil.Error:
            pass
    for p in procs:
        try:
            if exclude and exclude(p):
                continue
        except psutil.Error:
            continue
        yield p


class RssSampler:
    """Peak RSS by psutil polling: this process alone, or a process tree with a filter."""

    def __init__(self, pid: int | None = None, tree: bool = False, exclude=None, interval: float = 0.05):
        import psutil

        self.proc = psutil.Process(pid or os.getpid())
        self.tree, self.exclude, self.interval = tree, exclude, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def sample(self) -> int:
        import psutil

        total = 0
        for p in processes(self.proc, self.tree, self.exclude):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak_mb(self) -> float:
        return self.peak / 1e6


def is_engine_process(p) -> bool:
    """vLLM server processes (and their launcher / engine core): not the orchestrator's memory."""
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001
        return False
    return ("vllm" in cmd or "_launcher.py" in cmd or "VLLM" in p.name()
            or str(ENGINE_PYTHON.parent) in cmd)


def cpu_seconds(exclude=is_engine_process) -> float:
    """CPU seconds (user + system) so far of this process and its living descendants (Prefect's
    API subprocess), without the processes ``exclude`` names (vLLM's): what the orchestrator has
    taken from a machine it shares with the engine."""
    import psutil

    total = 0.0
    for p in processes(psutil.Process(), True, exclude):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


@contextlib.contextmanager
def prefect_ephemeral(home: Path):
    """An in-process Prefect with its own ephemeral API on a fresh database in ``home``."""
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)
    yield


def run_flow(config: Path, parallel_shards: int | None = None) -> dict:
    """Run flows.pipeline.run_pipeline in this process, as `modelyard run` does."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import run_pipeline
    from modelyard import pipeline

    loaded = pipeline.load(str(config), {}, None)
    flow = run_pipeline.with_options(task_runner=ThreadPoolTaskRunner(
        max_workers=parallel_shards or loaded.config.parallel_shards))
    return flow(config=str(config), params=loaded.params)


def cli_env(prefect_home: Path) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    return env


def run_subprocess(cmd: list[str], env: dict | None = None, cwd: Path | None = None, timeout: float = 1800,
                   rss_filter=None, log_path: Path | None = None) -> tuple[float, int, float]:
    """Run a command in its own process group (killed on any exit); (wall s, exit code, peak tree RSS MB)."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    peak = 0.0
    try:
        with RssSampler(proc.pid, tree=True, exclude=rss_filter, interval=0.1) as s:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        peak = s.peak_mb
        wall = time.perf_counter() - t0
        if proc.returncode is None:
            raise RuntimeError(f"{cmd[:3]} did not finish in {timeout:.0f} s")
        return wall, proc.returncode, peak
    finally:
        kill_group(proc)
        if log_path:
            out.close()


def kill_group(proc: subprocess.Popen) -> None:
    """TERM then KILL the process group of a subprocess we started (start_new_session=True)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)


def workdir(prefix: str, keep: bool = False):
    d = Path(tempfile.mkdtemp(prefix=prefix))

    @contextlib.contextmanager
    def cm():
        try:
            yield d
        finally:
            if not keep:
                shutil.rmtree(d, ignore_errors=True)
    return cm()


def table(rows: list[dict], cols: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(x) for x in cells)])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dump(obj) -> str:
    return json.dumps(obj, sort_keys=True)
