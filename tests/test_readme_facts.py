"""What the README states about a fresh clone stays checkable: the demo table against what the demo writes, the one
DeepSpeed op build per venv, and DeepSpeed's routine lines filtered without hiding anything else."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import readme_demo  # bench/ is not a package

from unimlip_train.distributed.quiet import OP_BUILT, drop_deprecation_noise, without_lines

REPO = Path(__file__).resolve().parent.parent


def test_the_readme_demo_table_is_checked_and_written_from_the_demo_output(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    same = readme_demo.parse(readme_demo.readme_table(readme))
    assert set(same["rows"]) == {"default", "clip_only"} and same["pairs"] > 900  # both rows, ~1,000 pairs
    assert readme_demo.check(readme, same) == ""
    drifted = json.loads(json.dumps(same))
    drifted["rows"]["clip_only"]["mean_recall"] += 0.5
    difference = readme_demo.check(readme, drifted)
    assert "README.md shows:" in difference and f"| {drifted['rows']['clip_only']['mean_recall']:.1f} |" in difference
    rewritten = readme_demo.write(readme, drifted)
    assert readme_demo.check(rewritten, drifted) == "" and rewritten.replace(readme_demo.render(drifted), "") == \
        readme.replace(readme_demo.render(same), "")
    (tmp_path / "demo_table.json").write_text(json.dumps(same))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "readme_demo.py"), "--check", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
    (tmp_path / "demo_table.json").write_text(json.dumps(drifted))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "readme_demo.py"), "--check", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "the demo printed" in done.stdout


def test_one_op_build_per_venv_for_every_command():
    """Without TORCH_EXTENSIONS_DIR, any process that starts DeepSpeed uses the venv's own folder."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    script = "import os; from unimlip_train.distributed.quiet import share_op_build; share_op_build(); " \
             "print(os.environ.get('TORCH_EXTENSIONS_DIR'))"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == os.path.join(sys.prefix, "torch_extensions")
    kept = subprocess.run([sys.executable, "-c", script], env={**env, "TORCH_EXTENSIONS_DIR": "/elsewhere"},
                          capture_output=True, text=True, timeout=120)
    assert kept.stdout.strip() == "/elsewhere"


def test_deepspeed_noise_is_dropped_by_its_exact_lines(capsys):
    with without_lines(OP_BUILT):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("DeepSpeed said something else", end="")
        print(" in two writes")
        print("step 3: a real line", file=sys.stderr)
    out, err = capsys.readouterr()
    assert out == "DeepSpeed said something else in two writes\n" and err == "step 3: a real line\n"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drop_deprecation_noise()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed."
                      "all_gather_single` instead.", FutureWarning)
        warnings.warn("`torch.distributed.something_else` is deprecated.", FutureWarning)
    assert [str(w.message) for w in caught] == ["`torch.distributed.something_else` is deprecated."]
