"""The wheel carries templates/ and configs/: build it, install it in a clean virtualenv, render from there."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from conftest import EXAMPLES, REPO


def test_wheel_renders_in_a_clean_virtualenv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("launcher-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("launcher/_data/templates/launch_msrun.sh.j2",
                    "launcher/_data/configs/mindformers/qwen1_5_7b/full.yaml",
                    "launcher/_data/configs/data/tiny_corpus.txt",
                    "launcher/entrypoints/finetune.py",
                    "launcher/_data/images/matrix.yaml",
                    "launcher/_data/images/Dockerfile.j2"):
        assert shipped in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = env_dir / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", str(wheel)], check=True, capture_output=True, timeout=600)
    out = tmp_path / "rendered"
    # Run outside the source tree so that nothing can be found there by accident.
    result = subprocess.run(
        [str(env_dir / "bin" / "launcher"), "render", str(EXAMPLES / "qwen1_5-7b-full-2x8-msrun.yaml"), "-o", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    golden = Path(__file__).parent / "golden" / "qwen1_5-7b-full-2x8-msrun"
    for rel in ("mindformers/run.yaml", "nodes/node-1/launch.sh", "env/job.env", "plan.json"):
        assert (out / rel).read_text() == (golden / rel).read_text(), rel

    # The image templates are found in the wheel too.
    entry = "ms2.7.2-mf1.8.0-cann8.5.0-py3.11-910b"
    result = subprocess.run([str(env_dir / "bin" / "launcher"), "image", "render", entry, "-o", str(tmp_path / "image")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("Dockerfile", "build.sh"):
        assert (tmp_path / "image" / name).read_text() == (golden.parent / "images" / entry / name).read_text()
