"""`pyflat bench` from a built, non-editable wheel, run outside the repository.

A console script does not put the working folder on sys.path, so this is the only way
to see that the wheel itself carries what the command needs: the sweep, its models, data
loader and timing, all in pyflat.applications (the repository's bench/ is not installed).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env, timeout=900):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_pyflat_bench_runs_from_an_installed_wheel_outside_the_repository(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYFLAT_CUDA")}
    dist, target, work = tmp_path / "dist", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
          "-w", str(dist), str(ROOT)], cwd=tmp_path, env=env)
    wheel, = dist.glob("pyflat-*.whl")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
          str(wheel)], cwd=tmp_path, env=env)
    env["PYTHONPATH"] = str(target)
    where = _run([sys.executable, "-c", "import pyflat.applications.sweep as s; "
                  "print(s.__file__)"], cwd=work, env=env)
    assert Path(where.strip()).is_relative_to(target)  # the wheel's copy, not the checkout's
    out = work / "results"
    _run([str(target / "bin" / "pyflat"), "bench", "--models", "mlp128", "--batches", "32",
          "--ks", "1", "--seconds", "0.02", "--out", str(out)], cwd=work, env=env)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    # every method was checked against the reference before it was timed
    assert {r["method"] for r in rows} >= {"pyflat", "torch.func"}
    assert all(r["model"] == "mlp128" and r["batch"] == 32 for r in rows)
    assert (out / "sweep.md").read_text().count("| mlp128 |") >= 2
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
