"""The `conserve` command: prints completions, and turns user mistakes into one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conserve.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_generate_chat_prints_the_greedy_answer():
    res = run("generate", "--chat", "--prompt", "What is the capital of France?", "--dtype", "float32",
              "--max-tokens", "16", "--scheduler", "fcfs")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_missing_model_file_is_a_one_line_error(tmp_path):
    res = run("generate", "--prompt", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert res.returncode == 2
    assert "nope.gguf" in res.stderr and "Traceback" not in res.stderr


def test_corrupt_gguf_header_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    res = run("generate", "--prompt", "hi", "--model", str(bad))
    assert res.returncode == 2
    assert "bad.gguf" in res.stderr and "Traceback" not in res.stderr


def test_bad_flag_values_are_rejected_before_loading():
    res = run("generate", "--prompt", "hi", "--kv-cache-gb", "0")
    assert res.returncode == 2 and "kv_cache_gb" in res.stderr and "Traceback" not in res.stderr


def test_replicas_without_ray_is_a_one_line_error():
    code = ("import sys; sys.modules['ray'] = None; from conserve.cli import main; "
            "sys.exit(main(['serve', '--replicas', '2']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 2 and 'pip install "conserve[ray]"' in res.stderr and "Traceback" not in res.stderr
