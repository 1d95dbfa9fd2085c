"""Bad inputs through the real entry point (research.train main, in-process, tiny model): each one
exits 2 with one `error:` line naming the problem, and leaves no run folder and no MLflow store or run.
Then the records a run leaves when it stops early: resume, dead runs, folder claims, file modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import png_header, tiny_train_args
from research import train as train_module
from research.training.hooks import MLflowHook
from research.train import main

REPO = Path(__file__).resolve().parent.parent


class Case:
    """Builds the extra argv of one bad input; `ctx` holds the tmp folder, the tiny model and the style."""

    def __init__(self, tmp: Path, model: Path, style: Path):
        self.tmp, self.model, self.style = tmp, model, style

    def file(self, name: str, data: bytes | str) -> str:
        path = self.tmp / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)

    def folder(self, name: str) -> Path:
        path = self.tmp / "inputs" / name
        path.mkdir(parents=True)
        return path

    def style_with(self, *bad: str) -> str:
        """A style folder holding only files training cannot use."""
        d = self.folder("bad_style")
        if "fifo" in bad:
            os.mkfifo(d / "pipe.png")  # opening it would block forever
        if "bomb" in bad:
            (d / "huge.png").write_bytes(png_header(20000, 20000))
        if "corrupt" in bad:
            (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
        if "dir" in bad:
            (d / "folder.png").mkdir()
        return str(d)

    def broken_model(self) -> str:
        import shutil

        d = self.tmp / "inputs" / "broken_model"
        shutil.copytree(self.model, d)
        for f in (d / "unet").glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a copy cut short
        return str(d)

    def run_folder(self, status: str | None = None, states: int = 0) -> str:
        """A run folder as a training leaves it (config.json, run.json, states) without training."""
        from research.arguments import given_values
        from research.config import TrainConfig

        d = self.tmp / "old_runs" / "test" / "20260101-000000_inky_lora"
        (d / "checkpoints").mkdir(parents=True)
        args = train_module.build_parser().parse_args(tiny_train_args(self.style, self.model, self.tmp / "old_runs"))
        (d / "config.json").write_text(TrainConfig.from_dict(given_values(args)).to_json())
        if status:
            (d / "run.json").write_text(json.dumps({"status": status}))
        for step in range(1, states + 1):
            (d / "checkpoints" / f"state-{step * 2:06d}").mkdir()
        return str(d)


def fifo_prompts(c: Case) -> str:
    path = c.tmp / "inputs" / "prompts.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return str(path)


# (id, extra argv built from the Case, fragment the error line must contain)
CASES = [
    # ── config values ──────────────────────────────────────────────────────────────────────────
    ("rank-zero", lambda c: ["--rank", "0"], "--rank must be"),
    ("rank-not-int", lambda c: ["--rank", "1e3"], "--rank"),
    ("rank-text", lambda c: ["--rank", "abc"], "invalid int value"),
    ("unknown-flag", lambda c: ["--rnak", "4"], "unrecognized arguments"),
    ("bool-garbage", lambda c: ["--center-crop", "maybe"], "expected true or false"),
    ("resolution-not-multiple", lambda c: ["--resolution", "30"], "multiple of 8"),
    ("resolution-too-small", lambda c: ["--resolution", "8"], "--resolution 8 does not fit this model"),
    ("checkpointing-negative", lambda c: ["--checkpointing-steps", "-1"], "--checkpointing-steps must not be negative"),
    ("checkpoint-limit-zero", lambda c: ["--checkpoints-total-limit", "0"], "--checkpoints-total-limit must be a positive"),
    ("warmup-negative", lambda c: ["--lr-warmup-steps", "-5"], "--lr-warmup-steps must not be negative"),
    ("lora-dropout-1.5", lambda c: ["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    ("caption-dropout-1", lambda c: ["--caption-dropout", "1"], "--caption-dropout must be in [0, 1)"),
    ("holdout-1", lambda c: ["--holdout-fraction", "1.0"], "--holdout-fraction must be in [0, 1)"),
    ("scheduler-unknown", lambda c: ["--lr-scheduler", "foo"], "--lr-scheduler must be one of"),
    ("template-typo", lambda c: ["--caption-template", "{styel} art"], "unknown fields ['styel']"),
    ("template-unbalanced", lambda c: ["--caption-template", "{style art"], "not a valid template"),
    ("lr-nan", lambda c: ["--learning-rate", "nan"], "--learning-rate must be a finite number"),
    ("lr-inf", lambda c: ["--learning-rate", "inf"], "--learning-rate must be a finite number"),
    ("guidance-nan", lambda c: ["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    ("noise-offset-inf", lambda c: ["--noise-offset=-inf"], "--noise-offset must be a finite number"),
    ("snr-negative", lambda c: ["--snr-gamma", "-1"], "--snr-gamma must not be negative"),
    ("lora-alpha-zero", lambda c: ["--lora-alpha", "0"], "--lora-alpha must be a positive"),
    ("text-encoder-lr-negative", lambda c: ["--text-encoder-lr", "-1"], "--text-encoder-lr must be a positive"),
    ("steps-zero", lambda c: ["--max-train-steps", "0"], "--max-train-steps must be a positive"),
    ("batch-zero", lambda c: ["--train-batch-size", "0"], "--train-batch-size must be a positive"),
    ("method-unknown", lambda c: ["--method", "hypernetwork"], "--method must be one of"),
    ("precision-unknown", lambda c: ["--mixed-precision", "fp8"], "--mixed-precision must be one of"),
    ("sampler-unknown", lambda c: ["--sampler", "plms"], "--sampler must be one of"),
    ("prediction-unknown", lambda c: ["--prediction-type", "sample"], "--prediction-type must be one of"),
    ("features-unknown", lambda c: ["--feature-extractor", "vgg"], "--feature-extractor must be one of"),
    ("metric-unknown", lambda c: ["--metrics", "clip_score,fdi"], "--metrics names unknown metric(s) fdi"),
    ("metric-none-and-more", lambda c: ["--metrics", "none,fid"], "--metrics names unknown metric(s) none"),
    ("targets-empty", lambda c: ["--unet-target-modules", " , "], "--unet-target-modules is empty"),
    ("targets-unknown", lambda c: ["--unet-target-modules", "to_q,not_a_layer"], "names no layer of the model"),
    ("rank-larger-than-layers", lambda c: ["--rank", "4096"], "--rank 4096 is larger than the layer"),
    # ── config files ───────────────────────────────────────────────────────────────────────────
    ("config-null", lambda c: ["--config", c.file("null.json", "null")], "holds null"),
    ("config-list", lambda c: ["--config", c.file("list.json", "[1, 2]")], "holds list"),
    ("config-not-json", lambda c: ["--config", c.file("bad.json", "{rank: 4")], "is not valid JSON"),
    ("config-missing", lambda c: ["--config", str(c.tmp / "nope.json")], "does not exist"),
    ("config-unknown-key", lambda c: ["--config", c.file("k.json", '{"rnak": 4}')], "unknown keys ['rnak']"),
    ("config-wrong-type", lambda c: ["--config", c.file("t.json", '{"max_train_steps": "many"}')],
     "max_train_steps must be int"),
    ("config-key-null", lambda c: ["--config", c.file("n.json", '{"seed": null}')], "seed must be int"),
    ("config-latin1", lambda c: ["--config", c.file("l.json", '{"run_name": "caf\xe9"}'.encode("latin-1"))],
     "is not UTF-8"),
    # ── style folder ───────────────────────────────────────────────────────────────────────────
    ("style-missing", lambda c: ["--style-dir", str(c.tmp / "nowhere")], "does not exist"),
    ("style-empty", lambda c: ["--style-dir", str(c.folder("empty"))], "No usable image"),
    ("style-only-unusable", lambda c: ["--style-dir", c.style_with("fifo", "bomb", "corrupt", "dir")], "No usable image"),
    ("prompts-missing", lambda c: ["--validation-prompts-file", str(c.tmp / "p.txt")], "does not exist"),
    ("prompts-binary", lambda c: ["--validation-prompts-file", c.file("p.bin", b"\x00\x01\x02PK\x03\x04")],
     "is not text"),
    ("prompts-fifo", lambda c: ["--validation-prompts-file", fifo_prompts(c)], "not a regular file"),
    # ── base model ─────────────────────────────────────────────────────────────────────────────
    ("model-missing-folder", lambda c: ["--base-model", str(c.tmp / "no_model")], "not a diffusers model folder"),
    ("model-missing-file", lambda c: ["--base-model", str(c.tmp / "m.safetensors")], "does not exist"),
    ("model-garbage-file", lambda c: ["--base-model", c.file("garbage.safetensors", b"garbage")], "is broken"),
    ("model-truncated-weights", lambda c: ["--base-model", c.broken_model()], "is broken"),
    ("model-hub-offline", lambda c: ["--base-model", "some-org/not-downloaded-model"], "huggingface-cli download"),
    ("model-bad-id", lambda c: ["--base-model", "not a//valid id"], "neither an existing path nor a hub id"),
    # ── where the run would go ─────────────────────────────────────────────────────────────────
    ("output-is-a-file", lambda c: ["--output-dir", c.file("out_file", "x")], "pass a writable --output-dir"),
    ("run-dir-holds-a-run", lambda c: ["--run-dir", c.run_folder()], "already holds a run"),
    # ── resume ─────────────────────────────────────────────────────────────────────────────────
    ("resume-without-run-dir", lambda c: ["--resume-from-checkpoint", "latest"], "needs --run-dir"),
    ("resume-not-a-run", lambda c: ["--run-dir", str(c.folder("plain")), "--resume-from-checkpoint", "latest"],
     "is not a run folder"),
    ("resume-other-flags", lambda c: ["--run-dir", c.run_folder("FAILED", states=1), "--resume-from-checkpoint",
                                      "latest", "--learning-rate", "3e-4", "--seed", "7"],
     "--learning-rate 0.001 -> 0.0003; --seed 3 -> 7"),
    ("resume-finished", lambda c: ["--run-dir", c.run_folder("FINISHED", states=1), "--resume-from-checkpoint",
                                   "latest"], "finished already"),
    ("resume-no-state", lambda c: ["--run-dir", c.run_folder("FAILED"), "--resume-from-checkpoint", "latest"],
     "No resumable state"),
]


def call_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse errors exit from inside parse_args
        return stop.code


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


@pytest.mark.parametrize("name, build, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(name, build, fragment, tiny_model, odd_style_dir, tmp_path,
                                                  monkeypatch, capsys):
    db = tmp_path / "store" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    case = Case(tmp_path, tiny_model, odd_style_dir)
    out = tmp_path / "runs"
    extra = build(case)
    before = files_under(tmp_path / "old_runs")
    code = call_main(tiny_train_args(odd_style_dir, tiny_model, out) + extra)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, err[-2000:]
    assert not out.exists()  # no run folder
    assert not db.exists()  # no MLflow run: the store was never even opened
    assert files_under(tmp_path / "old_runs") == before  # an existing run is left as it was



# ─── records a stopped run leaves ────────────────────────────────────────────────────────────
def only_run(out: Path) -> Path:
    (run,) = [p for p in (out / "test").iterdir() if p.is_dir()]
    return run


def test_resume_falls_back_from_a_damaged_state_and_continues_the_same_mlflow_run(
        tiny_model, odd_style_dir, tmp_path, tracking_store, monkeypatch):
    import mlflow

    args = dict(max_train_steps=6, checkpoints_total_limit=3)
    straight = tmp_path / "straight"
    assert main(tiny_train_args(odd_style_dir, tiny_model, straight, **args) + ["--no-tracking"]) == 0
    expected = load_file(only_run(straight) / "checkpoints" / "pytorch_lora_weights.safetensors")

    class Killed(Exception):
        pass

    def die_at_step_4(self, step, path):
        if step == 4:
            raise Killed(step)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(MLflowHook, "on_checkpoint", die_at_step_4)
    with pytest.raises(Killed):
        main(tiny_train_args(odd_style_dir, tiny_model, out, **args))
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_store)
    run_dir = only_run(out)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "FAILED"
    damaged = run_dir / "checkpoints" / "state-000004" / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # the disk filled up mid-copy
    # the README's command: the folder's own config.json, no other flag
    assert main(["--run-dir", str(run_dir), "--resume-from-checkpoint", "latest"]) == 0
    log = (run_dir / "logs.txt").read_text()
    assert "state-000004 is damaged" in log and "at step 2" in log
    resumed = load_file(run_dir / "checkpoints" / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)
    mlflow.set_tracking_uri(tracking_store)
    (run,) = mlflow.search_runs(experiment_names=["test"], output_format="list")  # one run, not two
    assert run.info.status == "FINISHED" and run.info.run_id == json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "FINISHED"


def test_a_run_whose_process_is_gone_is_marked_killed(tmp_path, tracking_store):
    import mlflow

    from research.tracking import HOST_TAG, PID_TAG, RECORD, mark_dead_runs, process_identity

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    mlflow.set_tracking_uri(tracking_store)
    experiment = mlflow.create_experiment("stale")
    run_dir = tmp_path / "runs" / "stale" / "r"
    run_dir.mkdir(parents=True)
    client = mlflow.MlflowClient()
    dead = client.create_run(experiment, tags={PID_TAG: str(gone.pid), HOST_TAG: process_identity()["host"],
                                               "run_dir": str(run_dir)})
    alive = client.create_run(experiment, tags={PID_TAG: str(os.getpid()), **{HOST_TAG: process_identity()["host"]}})
    (run_dir / RECORD).write_text(json.dumps({"status": "RUNNING", "mlflow_run_id": dead.info.run_id,
                                              "pid": str(gone.pid), "host": process_identity()["host"]}))
    marked = mark_dead_runs(tmp_path / "runs")
    assert len(marked) == 1 and dead.info.run_id in marked[0]
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # its process (this one) still runs
    assert json.loads((run_dir / RECORD).read_text())["status"] == "KILLED"


def test_run_folders_are_claimed_atomically(tmp_path):
    from research.tracking import new_run_dir

    claimed, start = [], threading.Barrier(16)

    def claim():
        start.wait()
        claimed.append(new_run_dir(str(tmp_path), "exp", "same_name"))

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == 16 and all(p.is_dir() for p in claimed)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    from research.atomic import write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == mode


# ─── real processes: kill, interrupt, start together (slow: each starts a fresh interpreter) ─────
def start_training(args: list[str], store: str) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "research.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_state(out: Path, proc: subprocess.Popen, step: int) -> Path:
    import time

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list(out.glob(f"test/*/checkpoints/state-{step:06d}"))
        if found:
            return found[0].parent.parent
        time.sleep(0.02)
    raise AssertionError(f"no state-{step:06d} before the process ended: {proc.communicate()[1][-2000:]}")


def mlflow_runs(store: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(store)
    return mlflow.search_runs(experiment_names=["test"], output_format="list")


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_bits_in_one_finished_mlflow_run(tiny_model, odd_style_dir, tmp_path):
    args = dict(max_train_steps=60, checkpointing_steps=4, log_every=4)
    straight = tmp_path / "straight"
    store, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "killed"
    # the uninterrupted run in a process like the others: same thread count, so the same float sums
    reference = start_training(tiny_train_args(odd_style_dir, tiny_model, straight, **args) + ["--no-tracking"], store)
    reference.communicate(timeout=600)  # reads the pipes, so a chatty run cannot block on them
    assert reference.returncode == 0
    expected = load_file(only_run(straight) / "checkpoints" / "pytorch_lora_weights.safetensors")
    proc = start_training(tiny_train_args(odd_style_dir, tiny_model, out, **args), store)
    run_dir = wait_for_state(out, proc, 8)
    proc.kill()
    proc.wait()
    assert not (run_dir / "checkpoints" / "pytorch_lora_weights.safetensors").exists()
    (run,) = mlflow_runs(store)
    assert run.info.status == "RUNNING"  # what SIGKILL leaves; the next start marks and reopens it
    resume = start_training(["--run-dir", str(run_dir), "--resume-from-checkpoint", "latest"], store)
    _, err = resume.communicate(timeout=600)
    assert resume.returncode == 0, err[-3000:]
    resumed = load_file(run_dir / "checkpoints" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    (after,) = mlflow_runs(store)
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"


@pytest.mark.slow
def test_sigint_ends_the_run_killed_with_one_line_and_its_state_kept(tiny_model, odd_style_dir, tmp_path):
    import signal

    store, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs"
    proc = start_training(tiny_train_args(odd_style_dir, tiny_model, out, max_train_steps=400, checkpointing_steps=4),
                          store)
    run_dir = wait_for_state(out, proc, 4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGINT") and "--resume-from-checkpoint latest" in last
    assert "Traceback" not in err and err.count("error:") == 1
    assert (run_dir / "checkpoints" / "state-000004").is_dir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "KILLED" and "SIGINT" in record["reason"]
    (run,) = mlflow_runs(store)
    assert run.info.status == "KILLED" and "SIGINT" in run.data.tags["research.end_reason"]


@pytest.mark.slow
def test_two_trainings_started_together_on_a_fresh_store_both_finish(tiny_model, odd_style_dir, tmp_path):
    store, out = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}", tmp_path / "runs"
    procs = [start_training(tiny_train_args(odd_style_dir, tiny_model, out, checkpointing_steps=0), store)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    runs = mlflow_runs(store)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["run_dir"] for r in runs}) == 2
