"""qlora.fast_exit: a finished command ends without the interpreter's teardown, yet runs its exit
handlers, flushes its output and keeps its status; a running non-daemon thread gets the usual join."""
import os
import subprocess
import sys
import textwrap


def run(tmp_path, body: str, **env) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import atexit, sys, threading, time
        from pathlib import Path
        from qlora.fast_exit import exit_process
        out = Path({str(tmp_path)!r})

        class Teardown:  # a module global: its __del__ runs only in the interpreter's teardown
            def __del__(self, marker=str(out / "teardown"), write=open):  # the module's names are gone by then
                with write(marker, "w") as f:
                    f.write("ran")
        keep = Teardown()
        atexit.register(lambda: (out / "atexit").write_text("ran"))
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_skips_the_teardown_but_runs_exit_handlers_and_flushes(tmp_path):
    done = run(tmp_path, """
        print("trained", end="")  # unflushed: a pipe is block-buffered
        sys.stderr.write("log line")
        exit_process(3)
    """)
    assert (done.returncode, done.stdout, done.stderr) == (3, "trained", "log line")
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()


def test_full_exit_on_request(tmp_path):
    done = run(tmp_path, "exit_process(0)", QLORA_FULL_EXIT="1")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "atexit").exists() and (tmp_path / "teardown").exists()


def test_a_running_thread_is_joined_with_the_usual_exit(tmp_path):
    done = run(tmp_path, """
        def upload():
            time.sleep(0.5)
            (out / "uploaded").write_text("done")
        threading.Thread(target=upload).start()
        exit_process(0)
    """)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "uploaded").exists() and (tmp_path / "teardown").exists()


def test_qlora_cpu_workers_do_not_hold_the_exit(tmp_path):
    done = run(tmp_path, """
        import torch
        from qlora.kernels import native
        torch.set_num_threads(2)
        native.parallel_ranges(lambda first, last: None, 8, 1)  # starts the pool's worker
        assert any(t.name.startswith(native.POOL_THREAD_PREFIX) for t in threading.enumerate())
        exit_process(0)
    """)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "atexit").exists() and not (tmp_path / "teardown").exists()
