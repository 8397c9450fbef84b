"""The long-lived GPU worker (issue 20): one process per GPU slot of a Snakemake run that trains and samples
subject after subject with its models kept loaded. Started, reached and bounded as tifactory.worker_client
describes; `run_task` is also the in-process path every job took before (same functions, same bytes).

The model cache is keyed by (the job's model params, device, dtype, purpose): the UNet and the VAE are
shared by every subject, the tokenizer and the text encoder are handed out as fresh deep copies of pristine
ones for each subject (placeholder tokens change them). A job that asks for another base model, config or
VAE drops the other model's entries first, so at most one model's entries are held. Training and sampling
each keep their own copy of the model (bf16 and fp16); on a card too small for both beside a request, the
other purpose's copy is dropped before the request (`ModelCache.make_room`) and loaded again when needed.

    python -m tifactory.worker --socket PATH --run MARK --idle-timeout SECONDS
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from tifactory.errors import TifactoryError
from tifactory.run_mark import HELLO, RunMark

USER_ERRORS = (TifactoryError, FileNotFoundError)  # as tifactory.jobs: a message, no traceback


class ModelCache:
    """Loaded models of one base model (see the module docstring). `model`: a ModelSpec's params."""

    def __init__(self):
        self.model: tuple | None = None  # the model params the entries belong to
        self.entries: dict = {}
        self.need: dict[str, int] = {}  # purpose -> GPU bytes its last request took above what was allocated

    def select(self, model: dict) -> None:
        key = tuple(sorted(model.items()))
        if key != self.model:
            self.entries.clear()
            self.model = key
            if "torch" in sys.modules:  # the old model's compiled graphs go with it
                import torch

                torch._dynamo.reset()
            release_memory()

    def loaded(self, model: dict, purpose: str, device, dtype):
        """(family, pristine components) of `model` for one purpose, device and UNet dtype, loaded once (if
        the other purpose's models leave no room for it, they are dropped first)."""
        from tifactory.families import ModelSpec, family_named

        self.select(model)
        key = (purpose, str(device), str(dtype))
        if key not in self.entries:
            import torch

            spec = ModelSpec.from_params(model)
            family = family_named(spec.family)
            components = None
            try:
                components = family.load(spec, device=device, unet_dtype=dtype)
            except torch.OutOfMemoryError:
                if all(purpose_of(other) == purpose for other in self.entries):
                    raise
            if components is None:  # out of the except block, so the failed load's tensors are freed
                self.drop_others(purpose)
                components = family.load(spec, device=device, unet_dtype=dtype)
            self.entries[key] = (family, components)
        return self.entries[key]

    def drop_others(self, purpose: str) -> list:
        """Drop the entries of the purposes other than `purpose` and free their memory; the keys dropped."""
        dropped = [key for key in self.entries if purpose_of(key) != purpose]
        for key in dropped:
            del self.entries[key]
        if dropped:
            release_memory()
        return dropped

    def make_room(self, purpose: str, device, log: Callable[[str], None]) -> int | None:
        """Before a `purpose` request on a CUDA device, with its models loaded: if the memory it can still
        get (the driver's free memory + the allocator's cached blocks) is less than what its last request
        took above its start, drop the other purpose's models. Resets the peak counter; returns the bytes
        allocated now, for `measured` (None off CUDA)."""
        torch = sys.modules.get("torch")
        if torch is None or getattr(device, "type", "") != "cuda":
            return None
        need = self.need.get(purpose)
        if need is not None and any(purpose_of(key) != purpose for key in self.entries):
            free, _ = torch.cuda.mem_get_info(device)
            available = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            if available < need:
                dropped = self.drop_others(purpose)
                log(f"GPU worker: {available / 2**30:.1f} GiB free, {purpose} took {need / 2**30:.1f} GiB above its "
                    f"models last time: dropped the {', '.join(sorted({purpose_of(key) for key in dropped}))} "
                    "models (loaded again when needed)")
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)

    def measured(self, purpose: str, device, start: int | None) -> None:
        """After a request: how much it took above `start` (make_room's), for the next one."""
        if start is not None:
            import torch

            self.need[purpose] = torch.cuda.max_memory_allocated(device) - start

    def train_components(self, model: dict, device, dtype):
        """Components for train_embedding: the shared UNet, VAE and noise scheduler, fresh tokenizers and text
        encoders."""
        _, pristine = self.loaded(model, "train", device, dtype)
        return fresh_text_side(pristine)

    def sampler(self, model: dict, device_name: str, scheduler: str):
        """A loaded Sampler (as load_sampler makes it) with a fresh scheduler and a fresh prompt encoder
        (deep copies of the pristine tokenizers and text encoders, which it adds trigger rows to)."""
        from tifactory.device import pick_device
        from tifactory.sampling.prompts import PromptEncoder
        from tifactory.sampling.samples import Sampler, make_scheduler

        device = pick_device(device_name)
        family, components = self.loaded(model, "samples", device, Sampler.dtype_for(device))
        key = ("sampler", str(device))
        if key not in self.entries:  # the pipeline casts the components to the sampling dtype on the device
            self.entries[key] = Sampler(family, components, scheduler=scheduler, device=device_name)
        sampler = self.entries[key]
        sampler.pipe.scheduler = make_scheduler(scheduler, components.noise_scheduler.config)  # it keeps state
        sampler.encoder = PromptEncoder(family, fresh_text_side(components))
        return sampler


def purpose_of(key: tuple) -> str:
    """The purpose an entry serves: 'train' or 'samples' (the Sampler built on the samples components)."""
    return "samples" if key[0] == "sampler" else key[0]


def fresh_text_side(components):
    """`components` with deep copies of its tokenizers and text encoders (placeholder tokens change them)."""
    return dataclasses.replace(components, tokenizers=copy.deepcopy(components.tokenizers),
                               text_encoders=copy.deepcopy(components.text_encoders))


def memory_note() -> str:
    """GPU memory after a request (allocated, reserved, the request's peak), for the worker's log."""
    torch = sys.modules.get("torch")
    if torch is None or not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return ""
    gib = 2**30
    return (f"; CUDA memory allocated {torch.cuda.memory_allocated() / gib:.2f} GiB, reserved "
            f"{torch.cuda.memory_reserved() / gib:.2f} GiB, peak {torch.cuda.max_memory_allocated() / gib:.2f} GiB")


def release_memory() -> None:
    """The request's cyclic garbage and the allocator's cached blocks. Called after the reply went out: a full
    gc.collect() walks every object of the process (the models, the compiled graphs), about a second a request
    on a GPU (bench/RESULTS.md), which the next job's start-up hides instead of the job waiting for it."""
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def train_task(kwargs: dict, log: Callable[[str], None], cache: ModelCache | None) -> None:
    """kwargs: train_embedding's arguments as JSON (`model`: a ModelSpec's params, `recipe`: the train settings)."""
    from tifactory.families import ModelSpec
    from tifactory.training.settings import TrainSettings
    from tifactory.training.train import choose_precision, train_embedding

    kwargs = dict(kwargs)
    model, settings = kwargs.pop("model"), TrainSettings.from_config(kwargs.pop("recipe"))
    components = None
    if cache is not None:
        precision = choose_precision(settings, lambda message: None)
        # the compiled step is kept from subject to subject: dynamo's guards are on types, shapes and settings,
        # not on the (fresh) text encoder objects, so a later subject runs the first one's graph without tracing
        components = cache.train_components(model, precision.device, precision.compute_dtype)
        start = cache.make_room("train", precision.device, log)
    train_embedding(**kwargs, model=ModelSpec.from_params(model), settings=settings, log=log, components=components)
    if cache is not None:
        cache.measured("train", precision.device, start)


def samples_task(kwargs: dict, log: Callable[[str], None], cache: ModelCache | None) -> None:
    """kwargs: render_sample_grid's arguments as JSON (`model`: a ModelSpec's params, `samples`: its settings)."""
    from tifactory.families import ModelSpec
    from tifactory.sampling.samples import SampleSettings, render_sample_grid

    kwargs = dict(kwargs)
    model, settings = kwargs.pop("model"), SampleSettings.from_config(kwargs.pop("samples"))
    sampler = None if cache is None else cache.sampler(model, settings.device, settings.scheduler)
    start = None if sampler is None else cache.make_room("samples", sampler.device, log)
    render_sample_grid(**kwargs, model=ModelSpec.from_params(model), settings=settings, log=log, sampler=sampler)
    if sampler is not None:
        cache.measured("samples", sampler.device, start)


TASKS = {"train": train_task, "samples": samples_task}


def run_task(task: str, kwargs: dict, log: Callable[[str], None], cache: ModelCache | None) -> None:
    """One stage with the job's arguments: in this process (cache None) or with the worker's models."""
    try:
        run = TASKS[task]
    except KeyError:
        raise ValueError(f"unknown GPU worker task {task!r} (one of {', '.join(TASKS)})") from None
    run(kwargs, log, cache)


# ----------------------------------------------------------------------------- the server

class Connection:
    """One job's request: its log lines and the reply go back as JSON lines; if the job goes away while the
    request runs, the worker ends at once (nobody wants the result, and its GPU must be freed)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.busy = threading.Event()

    def send(self, message: dict) -> None:
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def watch(self) -> None:
        """Thread: the job closes its end only after the reply; an end before it is the job's death."""
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass
        if self.busy.is_set():
            print(f"{stamp()} the job went away mid-request: exiting", flush=True)
            os._exit(3)


def stamp() -> str:
    return time.strftime("[%Y-%m-%d %H:%M:%S]")


def serve_one(sock: socket.socket, cache: ModelCache) -> bool:
    """Serve one connection; False when the worker should end (after an unexpected error)."""
    connection = Connection(sock)
    try:
        sock.sendall(HELLO + f"{os.getpid()}\n".encode())  # the job knows a live worker took it
    except OSError:
        return True  # the job went away before its request
    reader = sock.makefile("r", encoding="utf-8")
    line = reader.readline()
    if not line:
        return True
    request = json.loads(line)
    connection.busy.set()
    threading.Thread(target=connection.watch, daemon=True).start()
    os.chdir(request["cwd"])
    print(f"{stamp()} {request['task']} {request['kwargs'].get('subject', '')} in {request['cwd']}", flush=True)
    started = time.perf_counter()
    keep_going = True
    try:
        run_task(request["task"], request["kwargs"], lambda message: connection.send({"log": str(message)}), cache)
        reply = {"ok": True}
    except USER_ERRORS as error:
        reply = {"error": str(error)}
    except Exception as error:  # noqa: BLE001 - reported to the job; the worker ends (its state is suspect)
        reply = {"error": f"unexpected {type(error).__name__} in the GPU worker: {error}",
                 "traceback": traceback.format_exc()}
        keep_going = False
        cache.entries.clear()
    connection.busy.clear()
    done = time.perf_counter()
    try:
        connection.send(reply)
    except OSError:
        pass
    release_memory()  # after the reply: the next job connects while this runs, and waits for its greeting
    print(f"{stamp()} {request['task']} done in {done - started:.1f} s: {'ok' if reply.get('ok') else reply['error']}; "
          f"memory released in {time.perf_counter() - done:.2f} s{memory_note()}", flush=True)
    return keep_going


def serve(socket_file: str, run: str, idle_timeout_s: float) -> None:
    mark = RunMark.parse(run)
    if mark is None:
        raise SystemExit(f"bad run mark {run!r}")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    Path(socket_file).unlink(missing_ok=True)
    server.bind(socket_file)
    server.listen(1)
    server.settimeout(1.0)
    print(f"{stamp()} worker pid {os.getpid()} listening on {socket_file} for run {run}", flush=True)
    cache = ModelCache()
    idle_since = time.monotonic()
    reason = ""
    try:
        while True:
            try:
                sock, _ = server.accept()
            except socket.timeout:
                if not mark.alive():
                    reason = "the Snakemake run ended"
                    break
                if time.monotonic() - idle_since > idle_timeout_s:
                    reason = f"idle for {idle_timeout_s:.0f} s"
                    break
                continue
            sock.settimeout(None)
            with sock:
                keep_going = serve_one(sock, cache)
            idle_since = time.monotonic()
            if not keep_going:
                reason = "an unexpected error"
                break
    finally:
        # the socket goes first: a job arriving now starts a new worker instead of reaching a closing one
        try:
            if os.stat(socket_file).st_ino == os.fstat(server.fileno()).st_ino:
                os.unlink(socket_file)
        except OSError:
            pass
        server.close()
    print(f"{stamp()} exiting: {reason}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--idle-timeout", type=float, required=True)
    args = parser.parse_args(argv)
    serve(args.socket, args.run, args.idle_timeout)


if __name__ == "__main__":
    main()
