"""The long-lived GPU worker (issue 20) on CPU with the tiny model: same bytes as in process, a killed worker
fails only its job and the rerun resumes, it ends with its run and when idle, runs never share one, and its
model cache keeps or reloads models as the job asks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from support.datasets import astronaut_dataset
from tifactory.worker import ModelCache, run_task
from tifactory.run_mark import HELLO, RUN_ENV, RunMark, mark_run
from tifactory.worker_client import (WorkerSettings, WorkerTaskError, connect_or_start, in_process_reason, run_stage,
                                     try_connect, worker_key)

SETTINGS = WorkerSettings(enabled=True, idle_timeout_s=60, start_timeout_s=60)
BUCKET = {"enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048, "bucket_reso_steps": 64,
          "bucket_no_upscale": True}


# ----------------------------------------------------------------------------- fast: which worker, or none

def test_jobs_run_in_process_where_no_worker_can_serve_them():
    mark = mark_run({})
    here = {RUN_ENV: mark}
    assert in_process_reason(SETTINGS, here) is None
    assert "enabled is false" in in_process_reason(WorkerSettings(False, 60, 60), here)
    assert "SLURM" in in_process_reason(SETTINGS, dict(here, SLURM_JOB_ID="7"))
    assert "unset" in in_process_reason(SETTINGS, {})
    other_host = ":".join(["elsewhere"] + mark.split(":")[1:])
    assert "elsewhere" in in_process_reason(SETTINGS, {RUN_ENV: other_host})


def test_without_flock_jobs_run_in_process(monkeypatch):
    """Windows has neither flock nor Unix sockets: the jobs run in process instead of failing at import."""
    from tifactory import worker_client

    monkeypatch.setattr(worker_client, "fcntl", None)
    assert "no flock or Unix sockets" in in_process_reason(SETTINGS, {RUN_ENV: mark_run({})})


def test_two_runs_and_two_slots_never_share_a_worker():
    first, second = mark_run({}), mark_run({})
    assert first != second  # same process, two runs (a nonce each)
    keys = {worker_key(run, {"CUDA_VISIBLE_DEVICES": slot}) for run in (first, second) for slot in ("0", "1")}
    assert len(keys) == 4
    assert worker_key(first, {"CUDA_VISIBLE_DEVICES": "0"}) == worker_key(first, {"CUDA_VISIBLE_DEVICES": "0"})
    assert worker_key(first, {"CUDA_VISIBLE_DEVICES": "0"}) != worker_key(
        first, {"CUDA_VISIBLE_DEVICES": "0", "TORCHINDUCTOR_CACHE_DIR": "/elsewhere"})


def test_a_dying_workers_socket_is_no_worker(tmp_path):
    """A killed worker's listening socket can outlive its job's connection for a moment: a job connecting then
    sits in the backlog until the kernel closes it. No greeting: it is no worker (a new one is started); with
    the greeting it is one (seen once in CI as a rerun's job failing with 'the GPU worker died')."""
    import socket

    path = tmp_path / "w.sock"
    assert try_connect(path, 5) is None  # nothing there
    dying = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dying.bind(str(path))
    dying.listen(1)  # never accepts
    threading.Timer(0.3, dying.close).start()
    assert try_connect(path, 5) is None

    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink()
    live.bind(str(path))
    live.listen(1)

    def greet():
        sock, _ = live.accept()
        sock.sendall(HELLO + b"123\n" + b'{"log": "first reply line"}\n')
        time.sleep(0.5)
        sock.close()

    threading.Thread(target=greet).start()
    connection = try_connect(path, 5)
    assert connection is not None
    assert connection.makefile("r").readline() == '{"log": "first reply line"}\n'  # nothing read past the greeting
    connection.close()
    live.close()


def test_the_reply_goes_out_before_the_memory_is_released(monkeypatch):
    """The worker's full gc.collect() (1.3-1.5 s a request on the H100) runs after the job has its reply, while
    the next job starts."""
    import json
    import socket

    from tifactory import worker

    replied, released = threading.Event(), threading.Event()

    def release_after_the_reply():
        if replied.wait(10):
            released.set()

    monkeypatch.setattr(worker, "release_memory", release_after_the_reply)
    monkeypatch.setitem(worker.TASKS, "noop", lambda kwargs, log, cache: log("working"))
    worker_side, job_side = socket.socketpair()
    job_side.settimeout(30)
    thread = threading.Thread(target=worker.serve_one, args=(worker_side, worker.ModelCache()))
    thread.start()
    job_side.sendall((json.dumps({"task": "noop", "kwargs": {}, "cwd": os.getcwd()}) + "\n").encode())
    reader = job_side.makefile("r", encoding="utf-8")
    assert reader.readline().startswith(HELLO.decode())
    assert json.loads(reader.readline()) == {"log": "working"}
    assert json.loads(reader.readline()) == {"ok": True}  # before the release has run
    replied.set()
    thread.join(30)
    assert released.is_set()
    job_side.close()
    worker_side.close()


def test_a_run_mark_names_one_live_process():
    assert RunMark.parse(mark_run({})).alive()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    mark = RunMark.parse(f"host:{child.pid}:12345:abcd")
    assert not mark.alive()  # gone, or the pid reused by a process started at another time
    assert RunMark.parse("not a mark") is None


def test_model_cache_shares_unet_and_hands_out_fresh_text_encoders(tiny_model_dir, tmp_path):
    import torch

    cache = ModelCache()
    model = {"path": str(tiny_model_dir), "family": "sd15", "config_dir": "", "vae": ""}
    first = cache.train_components(model, torch.device("cpu"), torch.float32)
    first.tokenizer.add_tokens(["<changed>"])  # what a subject's placeholder tokens do
    first.text_encoder.resize_token_embeddings(len(first.tokenizer))
    second = cache.train_components(model, torch.device("cpu"), torch.float32)
    assert second.unet is first.unet and second.vae is first.vae
    assert second.text_encoder is not first.text_encoder and "<changed>" not in second.tokenizer.get_vocab()
    pristine = second.text_encoder.get_input_embeddings().weight
    assert torch.equal(pristine, first.text_encoder.get_input_embeddings().weight[:pristine.shape[0]])
    # another precision is another entry of the same model; another VAE is another model: reloaded
    half = cache.train_components(model, torch.device("cpu"), torch.bfloat16)
    assert half.unet is not first.unet and half.unet.dtype == torch.bfloat16 and len(cache.entries) == 2
    other = cache.train_components(dict(model, vae=str(tiny_model_dir / "vae")), torch.device("cpu"), torch.float32)
    assert other.unet is not first.unet and len(cache.entries) == 1


class FakeCuda:
    """torch.cuda's memory readings, set by the test (bytes)."""

    def __init__(self, monkeypatch, **readings):
        import torch

        self.__dict__.update(readings)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.free, 80 * 2**30))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)


def test_a_card_too_small_for_both_copies_drops_the_other_purposes_models(monkeypatch):
    """Training and sampling keep a copy each; when what a request can still get is less than what its last
    request took above its models, the other purpose's copy goes first (and says so in the job's log)."""
    import torch

    from tifactory import worker

    gib = 2**30
    monkeypatch.setattr(worker, "release_memory", lambda: None)
    cuda = FakeCuda(monkeypatch, free=30 * gib, reserved=2 * gib, allocated=14 * gib, peak=0)
    device = torch.device("cuda", 0)
    cache = ModelCache()
    entries = {("train", "cuda:0", "torch.bfloat16"): "train models", ("samples", "cuda:0", "torch.float16"): "samples",
               ("sampler", "cuda:0"): "sampler"}
    cache.entries.update(entries)
    messages = []
    assert cache.make_room("train", device, messages.append) == 14 * gib  # nothing measured yet: all kept
    cuda.peak = 24 * gib
    cache.measured("train", device, 14 * gib)
    assert cache.need == {"train": 10 * gib}
    cuda.free, cuda.reserved = 8 * gib, 15 * gib  # 8 free + 1 cached by the allocator = 9 GiB < 10
    cache.make_room("train", device, messages.append)
    assert list(cache.entries) == [("train", "cuda:0", "torch.bfloat16")]
    assert messages == ["GPU worker: 9.0 GiB free, train took 10.0 GiB above its models last time: dropped the "
                        "samples models (loaded again when needed)"]
    cache.entries.update(entries)
    cuda.free = 10 * gib  # 10 + 1 >= 10: room enough, both copies stay
    cache.make_room("train", device, messages.append)
    assert len(cache.entries) == 3 and len(messages) == 1
    assert cache.make_room("samples", torch.device("cpu"), messages.append) is None and len(cache.entries) == 3


def test_a_load_that_runs_out_of_memory_drops_the_other_purpose_and_tries_again(monkeypatch, tiny_model_dir):
    import torch

    from tifactory import families, worker

    monkeypatch.setattr(worker, "release_memory", lambda: None)
    loads = []

    class Family:
        def load(self, spec, device, unet_dtype):
            loads.append(len(cache.entries))
            if cache.entries:  # the other purpose's models take the room
                raise torch.OutOfMemoryError("CUDA out of memory (test)")
            return "components"

    monkeypatch.setattr(families, "family_named", lambda name: Family())
    model = {"path": str(tiny_model_dir), "family": "sd15", "config_dir": "", "vae": ""}
    cache = ModelCache()
    cache.select(model)
    cache.entries[("samples", "cpu", "torch.float32")] = "samples"
    assert cache.loaded(model, "train", "cpu", torch.bfloat16)[1] == "components"
    assert loads == [1, 0] and list(cache.entries) == [("train", "cpu", "torch.bfloat16")]
    cache.entries.clear()
    monkeypatch.setattr(Family, "load", lambda self, spec, device, unet_dtype: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory (test)")))
    with pytest.raises(torch.OutOfMemoryError):  # nothing else to drop: the job fails as before
        cache.loaded(model, "train", "cpu", torch.bfloat16)


def test_the_model_hash_is_computed_once_per_version_of_the_files(tiny_model_dir, tmp_path, monkeypatch):
    """A long-lived process hashes a model once; a changed file (size or mtime) is hashed again."""
    import shutil

    from tifactory.families import ModelSpec
    from tifactory.families import loading
    from tifactory.training import train

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    calls = []
    monkeypatch.setattr(loading, "model_fingerprint", lambda path: calls.append(path) or f"hash{len(calls)}")
    spec = ModelSpec(path=model, family="sd15")
    assert train.model_hash(spec, preloaded=True) == train.model_hash(spec, preloaded=False) == "hash1"
    config = model / "unet" / "config.json"
    config.write_text(config.read_text() + " ")
    assert train.model_hash(spec, preloaded=True) == "hash2" and len(calls) == 2
    assert train.model_hash(ModelSpec(path=tmp_path / "gone", family="sd15"), preloaded=True) == "in-memory"


# ----------------------------------------------------------------------------- slow: real worker processes

@pytest.fixture(scope="module")
def dataset_toml(tmp_path_factory):
    return astronaut_dataset(tmp_path_factory.mktemp("wds"), [((100, 0, 356, 256), (256, 256)),
                                                              ((120, 10, 376, 266), (256, 256))],
                             resolution=256, bucket=BUCKET)


@pytest.fixture
def this_run(monkeypatch):
    """This test process as the 'Snakemake run'; a short worker folder (socket paths are length-limited)."""
    folder = tempfile.mkdtemp(prefix="tfw")
    monkeypatch.setenv("TIFACTORY_WORKER_DIR", folder)
    monkeypatch.setenv(RUN_ENV, mark_run({}))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    yield Path(folder)
    for line in "".join(path.read_text() for path in Path(folder).glob("*.log")).splitlines():
        if match := re.search(r"worker pid (\d+) listening", line):
            try:
                os.kill(int(match.group(1)), signal.SIGKILL)
            except ProcessLookupError:
                pass


def stage_kwargs(root: Path, subject: str, dataset_toml, model_dir, recipe) -> tuple[dict, dict]:
    out = root / subject
    model = {"path": str(model_dir), "family": "sd15", "config_dir": "", "vae": ""}
    train = dict(dataset_toml=str(dataset_toml), subject=subject, recipe=recipe,
                 final_path=str(out / f"{subject}-ti.safetensors"), checkpoint_dir=str(out / "checkpoints"),
                 loss_tsv=str(out / "loss.tsv"), state_dir=str(out / "state"), progress_every_s=1e-6,
                 trigger=None, model=model)
    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of {token}\n(portrait of {token}:0.8) --n blurry\n")
    samples = dict(subject=subject, checkpoint_dir=str(out / "checkpoints"), prompts_file=str(prompts),
                   out_dir=str(out / "samples"), extra_embeddings={}, model_label="", progress_every_s=30,
                   samples=dict(seeds=[1, 2], steps=2, guidance_scale=7.5, width=64, height=64, scheduler="euler_a",
                                device="cpu", init_word="woman", batch_size=8),
                   model=model)
    return train, samples


@pytest.fixture
def params(repo_config):
    recipe = dict(repo_config["train"])
    recipe.update(init_word="woman", max_train_steps=4, save_every_n_steps=2, gradient_accumulation_steps=3,
                  micro_batch_size=3, resolution=256, device="cpu")
    return recipe


def without_seconds(loss_tsv: Path) -> list[list[str]]:
    return [line.split("\t")[:3] for line in loss_tsv.read_text().splitlines()]


@pytest.mark.slow  # a worker process and four in-process stages (~25 s on 2 cores)
def test_two_subjects_through_the_worker_match_in_process(tmp_path, this_run, dataset_toml, tiny_model_dir, params):
    # a stage error reaches the job as its one-line message, and the worker stays for the next job
    broken, _ = stage_kwargs(tmp_path / "broken", "eva", tmp_path / "missing.toml", tiny_model_dir, params)
    with pytest.raises(WorkerTaskError, match="missing.toml"):
        run_stage("train", broken, settings=SETTINGS, log=lambda message: None)
    logs = {}
    for mode in ("worker", "inproc"):
        for subject in ("eva", "tom"):
            train, samples = stage_kwargs(tmp_path / mode, subject, dataset_toml, tiny_model_dir, params)
            lines = logs.setdefault((mode, subject), [])
            for task, kwargs in (("train", train), ("samples", samples)):
                if mode == "worker":
                    run_stage(task, kwargs, settings=SETTINGS, log=lines.append)
                else:
                    run_task(task, kwargs, lines.append, cache=None)
    files = sorted(path.relative_to(tmp_path / "inproc") for path in (tmp_path / "inproc").rglob("*")
                   if path.is_file() and path.name != "prompts.txt")
    assert len(files) > 15
    for name in files:
        if name.name == "loss.tsv":  # its last column is seconds
            assert without_seconds(tmp_path / "worker" / name) == without_seconds(tmp_path / "inproc" / name)
        else:
            assert (tmp_path / "worker" / name).read_bytes() == (tmp_path / "inproc" / name).read_bytes(), name
    eva, tom = logs[("worker", "eva")], logs[("worker", "tom")]
    assert all("reusing the worker" in lines[0] for lines in (eva, tom))  # one worker for every job
    assert sum("reusing the worker" in line for line in eva + tom) == 4
    assert any(re.match(r"step 4/4: .* loss [0-9.]+", line) for line in tom)  # progress and loss in the job log
    assert any(line.startswith("wrote ") and "grid.png" in line for line in tom)


@pytest.mark.slow  # a worker killed mid-training, then the rerun (~30 s on 2 cores)
def test_a_killed_worker_fails_only_its_job_and_the_rerun_resumes(tmp_path, this_run, dataset_toml,
                                                                   tiny_model_dir, params):
    params = dict(params, max_train_steps=12, save_every_n_steps=2)
    train, _ = stage_kwargs(tmp_path / "worker", "eva", dataset_toml, tiny_model_dir, params)
    lines, failure = [], []

    def job():
        try:
            run_stage("train", train, settings=SETTINGS, log=lines.append)
        except WorkerTaskError as error:
            failure.append(str(error))

    thread = threading.Thread(target=job)
    thread.start()
    state = Path(train["state_dir"]) / "state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    pid = int(re.search(r"started worker pid (\d+)", lines[0]).group(1))
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert failure and "died during this job" in failure[0] and "resumes from the last checkpoint" in failure[0]
    assert not Path(train["final_path"]).exists()

    rerun: list[str] = []
    run_stage("train", train, settings=SETTINGS, log=rerun.append)
    assert "started worker pid" in rerun[0]  # a new worker
    assert any(line.startswith("resuming from step ") for line in rerun)
    reference, _ = stage_kwargs(tmp_path / "inproc", "eva", dataset_toml, tiny_model_dir, params)
    run_task("train", reference, lambda message: None, cache=None)
    assert Path(train["final_path"]).read_bytes() == Path(reference["final_path"]).read_bytes()


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # our own child: reap it, or it lingers as a zombie
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


@pytest.mark.slow  # worker processes (no models loaded: ~2 s)
def test_the_worker_ends_with_its_run_and_when_idle(this_run, monkeypatch):
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = Path(f"/proc/{run.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    import socket

    monkeypatch.setenv(RUN_ENV, f"{socket.gethostname()}:{run.pid}:{start}:test")
    key = worker_key(os.environ[RUN_ENV])
    connection, note = connect_or_start(this_run, key, SETTINGS, print)
    connection.close()
    pid = int(re.search(r"started worker pid (\d+)", note).group(1))
    assert not wait_gone(pid, 1.5)  # alive while the run is
    run.kill()
    run.wait()
    assert wait_gone(pid, 10), "the worker outlived its run"
    assert "the Snakemake run ended" in (this_run / f"{key}.log").read_text()

    monkeypatch.setenv(RUN_ENV, mark_run({}))
    connection, note = connect_or_start(this_run, worker_key(os.environ[RUN_ENV]),
                                        WorkerSettings(True, idle_timeout_s=1, start_timeout_s=60), print)
    connection.close()
    assert wait_gone(int(re.search(r"started worker pid (\d+)", note).group(1)), 10), "idle worker stayed"


def test_a_new_subject_reuses_the_compiled_step():
    """train_embedding compiles a closure over the subject's text encoder; in the worker each subject brings a
    fresh copy with a new placeholder module. Dynamo must not trace again for it (one class for every
    subject), and the reused graph must read the new subject's vectors."""
    import copy

    import torch
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from tifactory.families.base import make_placeholder_embedding

    torch._dynamo.reset()
    counter = CompileCounter()
    pristine = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    ids = torch.tensor([[1, 8, 9, 2]])
    for seed in range(3):
        encoder = copy.deepcopy(pristine)
        vectors = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
        encoder[0] = make_placeholder_embedding(encoder[0], 8, vectors)

        def predict(input_ids):  # as make_model_call's predict_noise: a new closure per subject
            return encoder(input_ids)

        compiled = torch.compile(predict, backend=counter, dynamic=False)
        assert torch.equal(compiled(ids), predict(ids))
    assert counter.frame_count == 1
    torch._dynamo.reset()
