"""Issue 7, faults: kill -9 during training, a crashed job beside a healthy one, write errors, interrupted writes.

The end-to-end case shares the uninterrupted reference run of the tiny roster with test_reproducibility.py
(tests/support/badcorpus.py: reference_run), so both cost one run of it.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import REPO_ROOT
from support.badcorpus import TINY_ROSTER, TINY_TARGETS, install_demo_model, reference_run, tiny_roster_workdir
from support.harness import run_snakemake, snakemake_command, snakemake_env

# ----------------------------------------------------------------------------- helpers


def _session_pids(session: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _pids_writing(session: int, path: Path) -> list[int]:
    """Processes of `session` that hold `path` open (the job process holds its log open)."""
    found = []
    for pid in _session_pids(session):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    found.append(pid)
                    break
            except OSError:
                pass
    return found


def _start(command: list[str], output: Path) -> subprocess.Popen:
    """Snakemake in its own session (so killpg reaches every job), its output in a file (no pipe to fill)."""
    with open(output, "w") as handle:
        process = subprocess.Popen(command, start_new_session=True, stdout=handle, stderr=subprocess.STDOUT,
                                   env=snakemake_env())
    process.output_path = output
    return process


def _wait_for(condition, process, what: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"snakemake ended (rc {process.returncode}) before {what}:\n"
                                 f"{process.output_path.read_text()[-4000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _assert_no_truncated_final_files(root: Path) -> None:
    """Every file under a final (non-temporary) name is complete: it parses as what its name says."""
    import pandas as pd
    from PIL import Image

    from tifactory.training.embedding import load_embedding

    checked = 0
    for path in (root / "results").rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue  # temporary names start with "." (tifactory.fileio.atomic_path)
        if path.suffix == ".safetensors":
            load_embedding(path)
        elif path.suffix in (".png", ".jpg"):
            with Image.open(path) as image:
                image.load()
        elif path.suffix == ".tsv":
            pd.read_csv(path, sep="\t")
        elif path.suffix == ".pt":
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
        else:
            continue
        checked += 1
    assert checked, "nothing was checked"


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


# ----------------------------------------------------------------------------- kill -9, end to end


@pytest.fixture(scope="module")
def reference(tmp_path_factory, repo_config, tiny_overrides):
    return reference_run(tmp_path_factory.getbasetemp(), repo_config, tiny_overrides)


@pytest.mark.slow
def test_crash_of_one_job_then_kill_9_of_snakemake_resume_byte_identical(tmp_path, reference, repo_config,
                                                                           tiny_overrides):
    """1. kill -9 of one subject's training job: the other subject still finishes, and its outputs are the
    reference's bytes. 2. rerun, and kill -9 Snakemake itself (whole process group) once the resumed training
    has saved again: no truncated file under a final name. 3. `--unlock`, then the same command with
    `--rerun-incomplete`: training resumes from its last state and every checkpoint and the final embedding
    are byte-identical to the uninterrupted reference run."""
    root = tiny_roster_workdir(tmp_path / "faults", repo_config, tiny_overrides)
    install_demo_model(root, reference / "resources" / "models" / "demo-tiny")
    command = snakemake_command(root, "--keep-going", *TINY_TARGETS)
    states = {subject: root / "results" / subject / "train_state" / "state.pt" for subject in TINY_ROSTER}

    # 1. one training job crashes (kill -9 of the job only)
    process = _start(command, tmp_path / "run1.out")
    try:
        crashed = _wait_for(lambda: next((s for s, p in states.items() if p.exists()), None), process,
                            "the first resume state")
        job_log = root / "logs" / "train" / f"{crashed}.log"
        victims = _wait_for(lambda: _pids_writing(process.pid, job_log), process, "the training job's pid")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = (tmp_path / "run1.out").read_text()
    healthy = next(s for s in TINY_ROSTER if s != crashed)
    assert process.returncode != 0, output[-3000:]
    assert re.search(rf"Error in rule train:.*?logs/train/{crashed}\.log", output, re.S), output[-3000:]
    healthy_embedding = root / "results" / healthy / f"{healthy}-ti.safetensors"
    assert healthy_embedding.read_bytes() == (reference / "results" / healthy / healthy_embedding.name).read_bytes()
    healthy_mtime = healthy_embedding.stat().st_mtime_ns
    assert states[crashed].exists() and not (root / "results" / crashed / f"{crashed}-ti.safetensors").exists()
    _assert_no_truncated_final_files(root)

    # 2. rerun; once the resumed training has saved a newer state, kill -9 Snakemake and all its children
    saved = states[crashed].stat().st_mtime_ns
    process = _start(command, tmp_path / "run2.out")
    try:
        _wait_for(lambda: states[crashed].exists() and states[crashed].stat().st_mtime_ns != saved, process,
                  "a newer resume state")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert "resuming from step" in job_log.read_text()
    assert not (root / "results" / crashed / f"{crashed}-ti.safetensors").exists()
    _assert_no_truncated_final_files(root)
    import torch

    resumed_from = torch.load(states[crashed], map_location="cpu", weights_only=True)["step"]
    assert 2 <= resumed_from < 12

    # 3. the same command again: the killed Snakemake left its lock, which --unlock removes (Snakemake's rule)
    locked = run_snakemake(root, "--keep-going", *TINY_TARGETS, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    run_snakemake(root, "--unlock")
    run_snakemake(root, "--keep-going", "--rerun-incomplete", *TINY_TARGETS)
    log = job_log.read_text()
    assert f"resuming from step {resumed_from}" in log, log[-2000:]
    for subject in TINY_ROSTER:
        final = f"results/{subject}/{subject}-ti.safetensors"
        assert (root / final).read_bytes() == (reference / final).read_bytes(), subject
        checkpoints = f"results/{subject}/checkpoints"
        assert _tree_bytes(root / checkpoints) == _tree_bytes(reference / checkpoints), subject
        assert not states[subject].exists()
    assert healthy_embedding.stat().st_mtime_ns == healthy_mtime  # never rewritten
    _assert_no_truncated_final_files(root)


# ----------------------------------------------------------------------------- write errors while saving


@pytest.fixture(scope="module")
def dataset_toml(tmp_path_factory):
    import pandas as pd
    from PIL import Image

    from support.badcorpus import astronaut
    from tifactory.photos.dataset import build_dataset

    root = tmp_path_factory.mktemp("faults_ds")
    crops = root / "crops"
    crops.mkdir()
    rows = []
    for index, box in enumerate([(100, 0, 356, 256), (140, 20, 396, 276)]):
        name = f"{index:03d}_a.png"
        astronaut().crop(box).save(crops / name)
        rows.append({"source": "a.png", "status": "kept", "reason": "", "output": name})
    pd.DataFrame(rows).to_csv(crops / "manifest.tsv", sep="\t", index=False)
    bucket = {"enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048, "bucket_reso_steps": 64,
              "bucket_no_upscale": True}
    return build_dataset(crops_manifest=crops / "manifest.tsv", crops_dir=crops, dataset_dir=root / "dataset",
                         subject="eva", class_word="woman", repeats=2, resolution=256, bucket=bucket)


def _train(out: Path, dataset_toml, tiny_model_dir, params, log=lambda message: None):
    from support.models import sd15_spec
    from tifactory.training.settings import TrainSettings
    from tifactory.training.train import train_embedding

    train_embedding(dataset_toml=dataset_toml, model=sd15_spec(tiny_model_dir), subject="eva",
                    settings=TrainSettings.from_config(params),
                    final_path=out / "eva-ti.safetensors", checkpoint_dir=out / "checkpoints",
                    loss_tsv=out / "loss.tsv", state_dir=out / "state", log=log)
    return out / "eva-ti.safetensors"


def test_disk_full_while_saving_a_checkpoint_leaves_no_truncated_file(tmp_path, monkeypatch, dataset_toml,
                                                                      tiny_model_dir, repo_config):
    from tifactory.training.embedding import checkpoint_name, load_embedding

    params = dict(repo_config["train"], init_word="woman", max_train_steps=6, save_every_n_steps=2,
                  gradient_accumulation_steps=2, micro_batch_size=2, resolution=256, device="cpu")
    reference = _train(tmp_path / "reference", dataset_toml, tiny_model_dir, params)

    original = Path.write_bytes
    failing = f".{Path(checkpoint_name('eva', 4)).stem}."  # the temporary file of the step-4 checkpoint

    def disk_fills_up(self, data):
        if self.name.startswith(failing):
            with open(self, "wb") as handle:
                handle.write(data[: len(data) // 2])  # half of it reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return original(self, data)

    out = tmp_path / "full"
    monkeypatch.setattr(Path, "write_bytes", disk_fills_up)
    with pytest.raises(OSError, match="No space left on device"):
        _train(out, dataset_toml, tiny_model_dir, params)
    monkeypatch.setattr(Path, "write_bytes", original)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [checkpoint_name("eva", 2)]  # no temp
    assert (out / "checkpoints" / checkpoint_name("eva", 2)).read_bytes() == \
        (tmp_path / "reference" / "checkpoints" / checkpoint_name("eva", 2)).read_bytes()
    load_embedding(out / "checkpoints" / checkpoint_name("eva", 2))
    assert not (out / "eva-ti.safetensors").exists()
    # loss.tsv is rewritten as training goes (issue 14: a loss plot one can watch); what is there is whole
    if (out / "loss.tsv").exists():
        lines = (out / "loss.tsv").read_text().splitlines()
        assert lines[0] == "step\tloss\tlr\tseconds" and all(len(line.split("\t")) == 4 for line in lines)
    assert sorted(p.name for p in (out / "state").iterdir()) == ["state.pt"]

    # space again: the rerun resumes from the last complete state and ends where the reference ended
    messages: list[str] = []
    final = _train(out, dataset_toml, tiny_model_dir, params, log=messages.append)
    assert any("resuming from step 2" in m for m in messages)
    assert final.read_bytes() == reference.read_bytes()


WRITE_ERROR_SCRIPT = r"""
import errno, resource, signal, sys
from pathlib import Path
import torch
from tifactory.training.embedding import save_embedding
from tifactory.fileio import write_text_atomic
from tifactory.training.train import save_state

out = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)           # the write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # any file larger than 4 KiB cannot be written
results = []
for name, write in [
    ("old.safetensors", lambda p: save_embedding(p, torch.ones(5, 768), {"k": "v"}, "float")),
    ("state/state.pt", lambda p: save_state(p.parent, {"step": 4, "vectors": torch.ones(5, 768)})),
    ("loss.tsv", lambda p: write_text_atomic(p, "step\tloss\n" * 1000)),
]:
    try:
        write(out / name)
        results.append(f"{name}: written")
    except OSError as error:
        results.append(f"{name}: {errno.errorcode.get(error.errno, error.errno)}")
    except RuntimeError as error:  # torch.save reports a failed write as a RuntimeError
        results.append(f"{name}: RuntimeError")
print("; ".join(results))
"""


@pytest.mark.slow
def test_real_write_errors_keep_the_previous_complete_file(tmp_path):
    """A kernel-level write error (RLIMIT_FSIZE -> EFBIG, like a full disk) in a real process: the writer
    fails, the file under the final name keeps its previous complete content, no temporary file is left."""
    import torch

    from tifactory.training.embedding import load_embedding, save_embedding
    from tifactory.fileio import write_text_atomic
    from tifactory.training.train import save_state

    save_embedding(tmp_path / "old.safetensors", torch.zeros(1, 4), {"k": "old"}, "float")  # small: fits
    save_state(tmp_path / "state", {"step": 2})
    write_text_atomic(tmp_path / "loss.tsv", "step\tloss\n1\t0.5\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = subprocess.run([sys.executable, "-c", WRITE_ERROR_SCRIPT, str(tmp_path)], capture_output=True,
                            text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "old.safetensors: EFBIG; state/state.pt: RuntimeError; loss.tsv: EFBIG"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # same files, same bytes
    assert load_embedding(tmp_path / "old.safetensors")[1] == {"k": "old"}


# ----------------------------------------------------------------------------- interrupted writes


INTERRUPTED_WRITER = r"""
import sys
from pathlib import Path
import torch
from tifactory.training.embedding import save_embedding
from tifactory.fileio import write_tsv_atomic
import pandas as pd

out = Path(sys.argv[1])
frame = pd.DataFrame({"a": range(200_000), "b": ["x" * 20] * 200_000})
print("ready", flush=True)
i = 0
while True:  # rewrite large outputs until killed
    i += 1
    save_embedding(out / "big.safetensors", torch.full((2000, 768), float(i)), {"i": str(i)}, "float")
    write_tsv_atomic(out / "big.tsv", frame.assign(i=i))
"""


@pytest.mark.slow
def test_kill_9_in_the_middle_of_writes_never_leaves_a_truncated_final_file(tmp_path):
    """Writers killed at random moments (SIGKILL: no cleanup code runs): the final names hold either nothing
    or a complete file; only dot-named temporary files can be partial."""
    import random

    import pandas as pd

    from tifactory.training.embedding import load_embedding

    rng = random.Random(7)
    seen_complete = interrupted_mid_write = 0
    for attempt in range(3):
        out = tmp_path / f"try{attempt}"
        out.mkdir()
        process = subprocess.Popen([sys.executable, "-c", INTERRUPTED_WRITER, str(out)], stdout=subprocess.PIPE,
                                   text=True, cwd=REPO_ROOT)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        if (out / "big.safetensors").exists():
            vectors, metadata = load_embedding(out / "big.safetensors")
            assert tuple(vectors.shape) == (2000, 768) and bool((vectors == float(metadata["i"])).all())
            seen_complete += 1
        if (out / "big.tsv").exists():
            frame = pd.read_csv(out / "big.tsv", sep="\t")
            assert len(frame) == 200_000 and frame["i"].nunique() == 1
        for leftover in out.iterdir():
            assert leftover.name in ("big.safetensors", "big.tsv") or leftover.name.startswith("."), leftover
        interrupted_mid_write += any(p.name.startswith(".") for p in out.iterdir())
    assert seen_complete and interrupted_mid_write, "no kill landed mid-write: the test proved nothing"


def test_every_writer_in_the_package_goes_through_a_temporary_file():
    """A guard for new code: every write call in tifactory/ writes a temporary path (renamed into place by
    tifactory.fileio.atomic_path), except the reviewed exceptions below."""
    allowed = {
        "fileio.py": "the atomic helpers themselves",
        "jobs.py": "the job log, streamed while the job runs (Snakemake owns and cleans it)",
        "worker_client.py": "the GPU worker's own log, appended to while it runs (its folder, not an output)",
        "tinymodel.py": "builds the whole model in a mkdtemp folder, then renames the folder into place",
        "tinymodel_sdxl.py": "likewise for the tiny SDXL model",
        "taught.py": "likewise: teaches the model in a mkdtemp folder, then renames the folder into place",
    }
    write_call = re.compile(r"\.(save|write_text|write_bytes|to_csv|savefig|save_pretrained|imwrite)\(|"
                            r"torch\.save\(|open\([^)]*['\"][wax]b?['\"]")
    in_memory = re.compile(r"\.save\(buffer\b")  # into an io.BytesIO named `buffer` (report thumbnails): no file
    offenders = []
    for path in sorted((REPO_ROOT / "tifactory").rglob("*.py")):  # sub-packages (tifactory/faces/) too
        if path.name in allowed:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if write_call.search(code) and "tmp" not in code and not in_memory.search(code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "writes that bypass atomic_path:\n" + "\n".join(offenders)


def test_outputs_get_the_usual_permissions(tmp_path):
    """atomic_path's temporary files are owner-only (mkstemp); the renamed output must not stay that way."""
    from tifactory.fileio import write_text_atomic

    write_text_atomic(tmp_path / "out.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_interrupted_writers_leave_old_content_and_no_temporary_file(tmp_path, monkeypatch):
    """Python-level interruption (an exception mid-write, e.g. KeyboardInterrupt) in each kind of writer."""
    import pandas as pd
    import torch
    from PIL import Image

    from tifactory.training.embedding import save_embedding
    from tifactory.fileio import atomic_path, write_text_atomic, write_tsv_atomic
    from tifactory.training.train import save_state

    writers = {
        "a.txt": lambda p: write_text_atomic(p, "new"),
        "a.tsv": lambda p: write_tsv_atomic(p, pd.DataFrame({"x": [1, 2]})),
        "a.safetensors": lambda p: save_embedding(p, torch.ones(2, 4), {}, "bf16"),
        "state/state.pt": lambda p: save_state(p.parent, {"step": 9}),
    }

    def png(path):
        with atomic_path(path) as tmp:
            Image.new("RGB", (8, 8)).save(tmp, format="PNG")

    writers["a.png"] = png
    for name in writers:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"old complete content")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("interrupted mid-write")

    for name, write in writers.items():
        with monkeypatch.context() as patch:  # the fsync before the rename: the write is underway
            patch.setattr(os, "fsync", interrupted)
            with pytest.raises(KeyboardInterrupt):
                write(tmp_path / name)
        assert (tmp_path / name).read_bytes() == b"old complete content", name
    leftovers = [p for p in tmp_path.rglob(".*")]
    assert not leftovers, leftovers
