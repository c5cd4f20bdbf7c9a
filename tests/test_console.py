"""The console's progress lines (cluster/progress.py): in place on a terminal with other output kept above,
rate-limited off a terminal, and the training stage's line read from metrics.jsonl with its ETA."""

from __future__ import annotations

import io
import json
import sys

from cluster.progress import StageProgress
from facesr.progress import bar, console


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_line_is_redrawn_in_place_and_other_output_goes_above_it(monkeypatch):
    """On a terminal the line is rewritten in place (tqdm); a line printed meanwhile (as Ray prints a worker's
    traceback through sys.stderr) appears whole, and the progress line is drawn again below it."""
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(sys, "stdout", term)
    with console() as stream, bar(10, "eval", "face", stream=stream, mininterval=0) as line:
        assert stream is term
        line.update(1)
        print("Traceback (most recent call last): worker error", file=sys.stderr)
        line.update(1)
    assert sys.stderr is term and sys.stdout is term  # the stand-ins are removed at the end
    screen = term.getvalue()
    assert "Traceback (most recent call last): worker error\n" in screen
    before, _, after = screen.partition("worker error")
    assert "\r" in before and "1/10" in before  # the line was drawn in place before it
    assert "2/10" in after  # and drawn again below it


def test_off_a_terminal_the_line_is_printed_at_a_limited_rate():
    """Not a terminal (a log file, `ray job logs`): no carriage returns or control codes, at most one line per
    interval, and the final state once."""
    out = io.StringIO()
    with bar(100, "eval", "face", stream=out, interval_s=3600) as line:
        for _ in range(100):
            line.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert len(lines) == 2 and "0/100" in lines[0] and "100/100" in lines[1], lines  # the start and the end
    out = io.StringIO()
    with bar(3, "prep", "img", stream=out, interval_s=0, miniters=1) as line:
        for _ in range(3):
            line.update(1)
    got = [l.split("|")[0].strip() for l in out.getvalue().splitlines()]
    assert got[:4] == ["prep:   0%", "prep:  33%", "prep:  67%", "prep: 100%"], got
    assert set(got[4:]) <= {"prep: 100%"}, got  # the closing refresh (its rate differs by then)


def test_prep_and_eval_lines_are_tqdm_lines_in_files(tmp_path):
    """Every phase draws through facesr.progress: prep's bars and a stage's line into a file are whole lines."""
    from shards.prep import PrepConfig, _bar

    out = io.StringIO()
    cfg = PrepConfig(src=str(tmp_path), out=str(tmp_path / "o"))
    with mock_stderr(out):
        with _bar(cfg, 5, "shard") as b:
            b.update(5)
    assert out.getvalue().count("\n") >= 1 and "\r" not in out.getvalue() and "shard: 100%" in out.getvalue()


class mock_stderr:
    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        self.saved, sys.stderr = sys.stderr, self.stream

    def __exit__(self, *exc):
        sys.stderr = self.saved


def test_stage_line_reads_metrics_and_gives_an_eta(tmp_path):
    """The stage's line comes from rank 0's metrics.jsonl: steps of the planned total, epoch, loss, the last
    validation figure, s/step and ETA from the records' times; another stage's records are ignored; before the
    first record it says what is starting."""
    path = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    progress = StageProgress(path, 2, total_steps=100, epochs=4, stream=out, interval_s=3600)
    assert "starting Ray workers" in progress.line() and "DeepSpeed" in progress.line()
    recs = [{"stage": 1, "split": "train", "epoch": 0, "step": 50, "time": 0.0, "loss": 9.0},
            {"stage": 2, "split": "train", "epoch": 0, "step": 10, "time": 100.0, "loss": 0.5},
            {"stage": 2, "split": "train", "epoch": 0, "step": 20, "time": 110.0, "loss": 0.4},
            {"stage": 2, "split": "val", "epoch": 0, "step": 25, "time": 111.0, "psnr/x8": 23.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"stage": 2, "split": "tr')  # a line being written
    with progress:
        pass
    line = out.getvalue()
    assert line.startswith("stage 2 (SR cascade)") and " 20% 20/100 steps" in line and "epoch 1/4" in line
    assert "loss 0.4" in line and "val psnr/x8 23.5" in line and "1.00 s/step, ETA 1m20s" in line


def test_resumed_stage_eta_ignores_the_gap_before_this_attempt(tmp_path):
    """A resumed stage's metrics hold an earlier attempt's records, hours before this one's: the pace is that of
    the steps, not of the wall clock since step 10 (a stop-14 resume printed 1.37 s/step at 0.27)."""
    path = tmp_path / "metrics.jsonl"
    recs = [{"stage": 2, "split": "train", "epoch": 0, "step": s, "time": 100.0 + 0.5 * s, "loss": 0.5}
            for s in range(10, 40, 10)]
    recs += [{"stage": 2, "split": "train", "epoch": 1, "step": s, "time": 20000.0 + 0.25 * s, "loss": 0.4}
             for s in range(40, 110, 10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = io.StringIO()
    with StageProgress(path, 2, total_steps=200, epochs=4, stream=out, interval_s=3600):
        pass
    assert "0.25 s/step, ETA 25s" in out.getvalue()  # median of 2 intervals at 0.5, the gap and 6 at 0.25


def test_console_script_exit_keeps_what_a_normal_exit_would_have_done(tmp_path):
    """`facesr` ends through ``launch.cli.exit_now`` (no Python finalization): a non-daemon thread still writing,
    a thread pool's queued work, an atexit handler, a file opened and never closed, buffered stdout, and the
    command's exit code all come out as after a normal exit."""
    import subprocess
    import textwrap

    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import atexit, sys, threading, time
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path
        from launch.cli import exit_now
        out = Path({str(out)!r}); out.mkdir()
        def late(): time.sleep(0.5); (out / "thread").write_text("done")
        threading.Thread(target=late).start()
        ThreadPoolExecutor(1).submit(lambda: (time.sleep(0.5), (out / "pool").write_text("done")))
        atexit.register(lambda: (out / "atexit").write_text("done"))
        f = open(out / "unclosed", "w"); f.write("kept"); f = None
        sys.stdout.write("buffered, no newline")
        exit_now(7)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 7, res.stderr
    assert res.stdout == "buffered, no newline"
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "thread": "done", "pool": "done", "atexit": "done", "unclosed": "kept"}
