"""A Prefect task runner on a Ray cluster that keeps one long-lived worker per GPU, models loaded once.

prefect-ray's `RayTaskRunner` runs every task run as a new Ray task. For a task that asks for GPUs, Ray 2.60
ends the worker process after each call (`RemoteFunction` defaults `max_calls` to 1 when `num_gpus > 0`),
so every job would load the model again. With `max_calls=0` the processes are kept, but Ray's worker pool
hands an idle process to the next task whatever GPU that task was given, while the process's CUDA context
stays on the GPU it was created on: two jobs could share a GPU, and a fresh process could load a second
copy of the model beside an idle one. An actor holds its GPUs, and the CUDA_VISIBLE_DEVICES Ray set for
them, for its whole life. So this runner starts one actor per `num_gpus` share of the cluster (Ray places
them; at most `max_workers`, and no more than the cluster's CPUs hold at `num_cpus` each) and runs each
Prefect task run in an idle actor through prefect-ray's own task entrypoint. Ray's retries are off (no
actor restarts, no actor task retries): Prefect's retries are the only ones.

`ray_head` starts a one-node cluster on this machine (logical GPUs where there are none): the scale-out
measurement (flows/scaleout.py) and the tests run on it.
"""

from __future__ import annotations

import functools
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

import ray
from prefect.context import serialize_context
from prefect.futures import PrefectConcurrentFuture, PrefectFuture
from prefect.logging.handlers import APILogHandler
from prefect.states import State, exception_to_crashed_state
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect_ray import RayTaskRunner

from flows import free_port


def prefect_api_problem(url: str | None) -> str | None:
    """Why this process cannot report to the Prefect API at `url`, or None when the API answers."""
    if not url:
        return "PREFECT_API_URL is not set"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered (it may want an API key): it is reachable
    except (OSError, ValueError) as error:
        return f"the Prefect API at {url} does not answer ({error})"


@contextmanager
def ray_head(num_gpus: int, num_cpus: int, log_path: Path, start_timeout_s: float = 120.0) -> Iterator[str]:
    """A Ray cluster of one head node on this machine, `num_gpus` GPUs (logical ones on a machine without
    them) and `num_cpus` CPUs, stopped on exit; yields its address for `RayActorTaskRunner`. Token auth off
    (Ray 2.60 would write ~/.ray/auth_token), no dashboard, no usage stats; its output goes to `log_path`."""
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",  # `ray start`, also where pip put no `ray` script
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={(port := free_port())}",
        f"--ray-client-server-port={free_port()}",
        f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with log_path.open("w") as log:
        head = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + start_timeout_s
        while "Ray runtime started" not in log_path.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text().splitlines()[-20:])
                raise RuntimeError(f"the Ray head did not start ({log_path}):\n{tail}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()  # `ray start --block` stops the cluster it started on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()


@ray.remote(max_restarts=0, max_task_retries=0)
class TaskWorker:
    """Runs Prefect task runs one at a time; what they load (the model) stays loaded in this process."""

    def start(self, initializer: Callable[[], Any] | None) -> dict[str, Any]:
        """Who this worker is and whether it reaches Prefect; if it does, run `initializer` (the model)."""
        problem = prefect_api_problem(os.environ.get("PREFECT_API_URL"))
        if initializer is not None and problem is None:
            initializer()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "prefect_api_problem": problem,
        }

    def run(self, **task_run: Any) -> State:
        return RayTaskRunner._run_prefect_task(**task_run)

    def flush_logs(self) -> None:
        APILogHandler.flush()


class RayActorTaskRunner(RayTaskRunner):
    """Runs task runs on up to `max_workers` long-lived Ray actors of `num_gpus` GPUs + `num_cpus` CPUs.

    `address`: "auto" (the running cluster), "ray://HOST:10001", "HOST:PORT", or None to start a local
    cluster for the flow run. `env_vars` reach every worker (PREFECT_API_URL: workers report task runs);
    `initializer` runs once in each worker as it starts (all workers at once, before any task run).
    Task runs must be independent: values in, no futures.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        max_workers: int,
        num_gpus: float = 0.0,
        num_cpus: float = 1.0,
        env_vars: dict[str, str] | None = None,
        initializer: Callable[[], Any] | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        if max_workers < 1 or num_cpus <= 0 or num_gpus < 0:
            raise ValueError(
                f"max_workers must be >= 1, num_cpus > 0, num_gpus >= 0; "
                f"got {max_workers}, {num_cpus}, {num_gpus}"
            )
        # RayTaskRunner would turn "auto" into "find a cluster, else start one": ray.init's own "auto" must
        # find one, and "local" starts a new cluster even when one already runs on this machine.
        named = address not in (None, "auto")
        super().__init__(
            address=address if named else None, init_kwargs={} if named else {"address": address or "local"}
        )
        self.arguments = {
            "address": address,
            "max_workers": max_workers,
            "num_gpus": num_gpus,
            "num_cpus": num_cpus,
            "env_vars": dict(env_vars or {}),
            "initializer": initializer,
            "start_timeout_s": start_timeout_s,
        }
        self.workers: list[dict[str, Any]] = []  # what start() said for each worker
        self._actors: list[Any] = []
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._live = 0  # workers not known dead
        self._live_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def duplicate(self) -> RayActorTaskRunner:
        return type(self)(**self.arguments)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RayActorTaskRunner) and self.arguments == other.arguments

    def __reduce__(self) -> tuple[Any, ...]:
        # A flow run's context, sent to the workers with each task run, holds the flow and so this runner:
        # it travels as its arguments, without its threads, queue and actor handles.
        return (functools.partial(type(self), **self.arguments), ())

    def __enter__(self) -> RayActorTaskRunner:
        super().__enter__()  # connects to (or starts) the cluster
        # A task run re-enters its flow run's context, and so this runner, in a worker: nothing to start.
        if ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            return self
        try:
            self._start_workers()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_workers(self) -> None:
        num_gpus, num_cpus = self.arguments["num_gpus"], self.arguments["num_cpus"]
        cluster = ray.cluster_resources()
        for name, amount, hint in (
            ("GPU", num_gpus, "start its nodes with `ray start --num-gpus N`, or render on CPUs"),
            ("CPU", num_cpus, "start its nodes with more `--num-cpus`"),
        ):
            if cluster.get(name, 0) < amount:
                raise RuntimeError(
                    f"the Ray cluster has {cluster.get(name, 0):g} {name}s, but each render worker asks for "
                    f"{amount:g}: {hint}"
                )
        capacity = int(cluster["CPU"] // num_cpus)
        if num_gpus:
            capacity = min(capacity, int(cluster["GPU"] // num_gpus))
        count = min(self.arguments["max_workers"], capacity)
        worker_options = {"num_gpus": num_gpus, "num_cpus": num_cpus}
        env = {"env_vars": self.arguments["env_vars"]}
        self._actors = [TaskWorker.options(**worker_options, runtime_env=env).remote() for _ in range(count)]
        timeout = self.arguments["start_timeout_s"]
        try:
            initializer = self.arguments["initializer"]
            self.workers = ray.get(
                [actor.start.remote(initializer) for actor in self._actors], timeout=timeout
            )
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"{count} Ray workers of {num_gpus:g} GPUs + {num_cpus:g} CPUs each did not start "
                f"within {timeout:g} s: are the cluster's GPUs held by other work?"
            ) from None
        for worker in self.workers:
            if worker["prefect_api_problem"]:
                raise RuntimeError(
                    f"the Ray worker on {worker['host']} cannot report to Prefect: "
                    f"{worker['prefect_api_problem']}; set PREFECT_API_URL to an address all Ray nodes reach"
                )
        self.logger.info(
            "%d Ray workers: %s",
            count,
            ", ".join(f"{w['host']}:{w['pid']} (GPU {w['cuda_visible_devices']})" for w in self.workers),
        )
        self._live = count
        for actor in self._actors:
            self._idle.put(actor)
        self._executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix="ray-worker")

    def submit(
        self,
        task: Any,
        parameters: dict[str, Any],
        wait_for: Any = None,
        dependencies: Any = None,
    ) -> PrefectConcurrentFuture[Any]:
        if self._executor is None:
            raise RuntimeError("The task runner must be started before submitting work.")
        if wait_for or any(isinstance(value, PrefectFuture) for value in parameters.values()):
            raise NotImplementedError(
                "RayActorTaskRunner runs independent task runs: pass values, not futures"
            )
        task_run_id = uuid4()
        # Serialised here, in the flow's thread: the worker runs the task run inside this flow run's context.
        context = serialize_context(
            asset_ctx_kwargs={
                "task": task,
                "task_run_id": task_run_id,
                "task_inputs": {name: collect_task_run_inputs_sync(v) for name, v in parameters.items()},
                "copy_to_child_ctx": True,
            }
        )
        future = self._executor.submit(
            self._run_on_idle_worker,
            task=task,
            task_run_id=task_run_id,
            context=context,
            parameters=parameters,
            dependencies=dependencies,
        )
        return PrefectConcurrentFuture(task_run_id=task_run_id, wrapped_future=future)

    def _run_on_idle_worker(self, **task_run: Any) -> State:
        actor = self._idle.get()
        if actor is None:  # every worker died: tell the next waiter too
            self._idle.put(None)
            return run_coro_as_sync(exception_to_crashed_state(RuntimeError("no Ray render worker is left")))
        try:
            state = ray.get(actor.run.remote(**task_run))
        except ray.exceptions.RayActorError as error:
            # The worker process died (node lost, out of memory): it gets no more task runs.
            with self._live_lock:
                self._live -= 1
                if not self._live:
                    self._idle.put(None)
            return run_coro_as_sync(exception_to_crashed_state(error))
        except Exception as error:
            self._idle.put(actor)
            return run_coro_as_sync(exception_to_crashed_state(error))
        self._idle.put(actor)
        return state

    def __exit__(self, *exc_info: Any) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self.workers:
            # Task-run logs are shipped to the API in batches: send what is left before the workers go.
            flushed = [actor.flush_logs.remote() for actor in self._actors]
            ray.wait(flushed, num_returns=len(flushed), timeout=30)
        for actor in self._actors:
            ray.kill(actor)
        self._actors, self.workers = [], []
        super().__exit__(*exc_info)
