"""``unimlip-ablate`` end to end on real shards with real trainings (tiny towers, 2 steps).

Independent references: every run's metrics against what ``unimlip-eval`` prints for the same checkpoint; each
config row's mean, std, t-interval and paired difference against a naive computation from its runs; the
markdown against the JSON. A rerun must train and evaluate nothing (checkpoint files and logs untouched); a run
that fails to train is a row with its status while the other rows are complete; a changed checkpoint is
re-evaluated; bad input stops before anything trains.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_slurm import cluster  # noqa: F401  (the session fixture that starts the local SLURM)

from slurm_jobs import sacct_state

REPO = Path(__file__).resolve().parent.parent
ABLATIONS = REPO / "configs" / "ablations"
TIMEOUT = 600
TINY = [
    "data.image_size=32", "data.num_workers=1", "data.shuffle_buffer=16", "data.text.max_length=32",
    "model.image.name=vit_tiny_patch16_224",
    "model.image.kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2.0}",
    "model.text.config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, "
    "max_position_embeddings: 64}",
    "model.ssl_embed_dim=32", "model.fusion={layers: 1, heads: 2}", "train.micro_batch_size=8",
    "train.warmup_steps=1", "train.checkpoint_every=0", "train.log_every=1",
]

pytestmark = pytest.mark.multiprocess


def run(cmd: list, expect: int = 0) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    assert done.returncode == expect, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    shards, tok = root / "shards", root / "tok"
    run([sys.executable, "-m", "data_prep.cli", "synthetic", "--n", "110", "--image-size", "32", "--max-size", "32",
         "--val-fraction", "0.3", "--shard-size", "40", "--out", shards, "--workers", "1", "--no-progress"])
    run([sys.executable, "-m", "data_prep.cli", "tokenizer", "--data", shards, "--out", tok])
    # A config that passes validation but fails in training: it diverges at once and may not skip a step.
    broken = root / "diverging.yaml"
    broken.write_text(f"extends: {ABLATIONS / 'clip_only.yaml'}\ntrain: {{lr: 1.0e+30, max_nonfinite_in_row: 1}}\n")
    return {"root": root, "shards": shards, "tok": tok, "broken": broken}


def ablate_cmd(data, *extra) -> list:
    # Overrides stand between the configs and between the options: both must reach every config.
    return [sys.executable, "-m", "unimlip_train.cli.ablate", "--configs", ABLATIONS / "clip_only.yaml",
            "model.embed_dim=32", ABLATIONS / "all.yaml", data["broken"], "--data", data["shards"],
            f"model.tokenizer={data['tok']}", "--run-root", data["root"] / "abl", "--steps", "2", "--seeds", "0,1",
            *TINY, *extra]


@pytest.fixture(scope="module")
def first(data):
    out = run(ablate_cmd(data), expect=1)  # the diverging config fails: exit 1, every other row complete
    return {"stdout": out, "rows": last_json(out)}


def runs_of(rows: list) -> list:
    """The per-seed runs of ablation.json's config rows, in order."""
    return [run for row in rows for run in row["runs"]]


def _files(run_dir: Path) -> dict:
    """Every file of a run dir with its modification time: what a retraining or re-evaluation would touch."""
    return {str(p): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_rows_match_unimlip_eval(data, first):
    rows = first["rows"]
    assert rows == json.loads((data["root"] / "abl" / "ablation.json").read_text())
    seed_rows = runs_of(rows)
    assert [r["config"] for r in rows] == ["clip_only", "all", "diverging"]  # one row per config
    assert [(r["config"], r["seed"]) for r in seed_rows] == [
        (c, s) for c in ("clip_only", "all", "diverging") for s in (0, 1)]
    ok = [r for r in seed_rows if r["status"] == "ok"]
    assert len(ok) == 4 and all(r["step"] == 2 and r["trained"] and r["evaluated"] for r in ok)
    assert [r["terms"] for r in ok[::2]] == [["itc"], ["itc", "itc_feature", "image_ssl", "image_feature",
                                                       "text_ssl", "text_feature", "mlm", "itm"]]

    # unimlip-eval on the same checkpoints (first seed of each config), three commands at a time.
    classes = sorted(k.split("/", 2)[2] for k in ok[0] if k.startswith("zeroshot/auroc/"))
    assert len(classes) >= 2  # the synthetic set's single labels
    for row in (ok[0], ok[3]):
        common = ["--checkpoint", row["checkpoint"], "--data", data["shards"], "--workers", "1"]
        base = [sys.executable, "-m", "unimlip_train.cli.eval"]
        cmds = {"": base + ["retrieval", *common],
                "zeroshot/": base + ["zeroshot", *common, "--classes", ",".join(classes),
                                     "--calibration-data", data["shards"], "--calibration-split", "train"],
                "linear_probe/": base + ["linear-probe", *common, "--classes", ",".join(classes)]}
        procs = {p: subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO) for p, cmd in cmds.items()}
        for prefix, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, err[-3000:]
            reference = last_json(out)
            card = reference.pop("card")
            if prefix == "zeroshot/":  # calibrated on the probe's fitting images: the same keys in both
                assert {"calibrated_accuracy", "calibrated_balanced_accuracy"} <= set(reference)
                assert card["data"]["calibration"]["splits"] == {"calibration": "train"}
            for key, value in reference.items():
                assert row[prefix + key] == pytest.approx(value, rel=1e-9, abs=1e-9), (row["config"], prefix + key)
            for key in ("checkpoint", "step", "config_hash"):
                assert row["card"][key] == card[key]
            assert row["card"]["data"]["index_sha256"] == card["data"]["index_sha256"]
    assert "mean_recall" in ok[0] and "i2t_R@1" in ok[0] and "t2i_R@1" in ok[0]


def test_failed_config_is_a_row(data, first):
    row = first["rows"][2]
    assert row["config"] == "diverging" and row["status"] == "0 of 2 seeds ok" and row["seeds"] == []
    assert row["i2t_R@1"] is None and row["i2t_R@1_ci95"] is None and row["delta_i2t_R@1"] is None
    broken = row["runs"]
    assert [r["seed"] for r in broken] == [0, 1]
    assert all(r["status"].startswith("failed: training exited with") for r in broken)
    assert "non-finite" in Path(broken[0]["log"]).read_text()
    assert "[ablate 6/6] diverging seed 1: FAILED" in first["stdout"]


def naive_t_summary(values: list) -> tuple:
    """Mean, sample std and 95 % t-interval of two values (t quantile with 1 degree of freedom: 12.7062047)."""
    m = (values[0] + values[1]) / 2
    s = abs(values[0] - values[1]) / 2 ** 0.5
    half = 12.7062047 * s / 2 ** 0.5
    return m, s, [m - half, m + half]


def test_seed_statistics_and_markdown(data, first):
    """Each config row over its two seeds: mean, sample std, t-interval of every metric, the paired difference to
    clip_only and its interval; ablation.md shows them (bold where the interval excludes 0) and every run."""
    rows = {r["config"]: r for r in first["rows"]}
    runs = {(r["config"], r["seed"]): r for r in runs_of(first["rows"])}
    for config in ("clip_only", "all"):
        row = rows[config]
        assert row["seeds"] == [0, 1] and row["status"] == "ok" and row["baseline"] == "clip_only"
        for key in ("i2t_R@1", "mean_recall", "zeroshot/balanced_accuracy", "zeroshot/auroc",
                    "linear_probe/balanced_accuracy"):
            m, s, ci = naive_t_summary([runs[(config, 0)][key], runs[(config, 1)][key]])
            assert row[key] == pytest.approx(m, abs=1e-12)
            assert row[f"{key}_std"] == pytest.approx(s, abs=1e-12)
            assert row[f"{key}_ci95"] == pytest.approx(ci, abs=1e-5)
            if config == "clip_only":
                assert f"delta_{key}" not in row
                continue
            diffs = [runs[(config, k)][key] - runs[("clip_only", k)][key] for k in (0, 1)]
            dm, _, dci = naive_t_summary(diffs)
            assert row[f"delta_{key}"] == pytest.approx(dm, abs=1e-12)
            assert row[f"delta_{key}_ci95"] == pytest.approx(dci, abs=1e-5)
            assert runs[(config, 0)]["delta_to_baseline"][key] == pytest.approx(diffs[0], abs=1e-12)

    md = (data["root"] / "abl" / "ablation.md").read_text()
    assert "**bold**: the interval excludes 0" in md
    config_table, seed_table = md.split("## Per seed")
    lines = [line for line in config_table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    metrics = header[5:]
    assert metrics[:3] == ["i2t_R@1", "t2i_R@1", "mean_recall"] and "zeroshot/auroc" in metrics
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| clip_only", "| all", "| diverging"]
    checked = 0
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        row = rows[cells["config"]]
        assert cells["status"] == row["status"]
        for key in metrics:
            if row[key] is None:
                assert cells[key] == "–"
                continue
            m = re.fullmatch(r"(-?\d+\.\d\d) ± (\d+\.\d\d)(?: (\*\*)?Δ ([+-]\d+\.\d\d) \[([+-]\d+\.\d\d), "
                             r"([+-]\d+\.\d\d)\](\*\*)?)?", cells[key])
            assert m, (row["config"], key, cells[key])
            low, high = row[f"{key}_ci95"]
            assert float(m.group(1)) == pytest.approx(row[key], abs=0.005)
            assert float(m.group(2)) == pytest.approx((high - low) / 2, abs=0.005)
            if row["config"] == "clip_only":
                assert m.group(4) is None
                continue
            dlow, dhigh = row[f"delta_{key}_ci95"]
            assert float(m.group(4)) == pytest.approx(row[f"delta_{key}"], abs=0.005)
            assert (float(m.group(5)), float(m.group(6))) == pytest.approx((dlow, dhigh), abs=0.005)
            assert bool(m.group(3)) == bool(m.group(7)) == (dlow > 0 or dhigh < 0), (key, cells[key])
            checked += 1
    assert checked == len(metrics)  # 'all': every column has its difference

    seed_lines = [line for line in seed_table.splitlines() if line.startswith("| ")][1:]
    assert len(seed_lines) == 6  # every run, the failed ones too
    for line in seed_lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        run = runs[(cells[0], int(cells[1]))]
        value = cells[5 + metrics.index("mean_recall")]
        if run["status"] != "ok":
            assert value == "–"
            continue
        m = re.fullmatch(r"(-?\d+\.\d\d)(?: \(([+-]\d+\.\d\d)\))?", value)
        assert float(m.group(1)) == pytest.approx(run["mean_recall"], abs=0.005)
        if cells[0] == "all":
            base = runs[("clip_only", run["seed"])]["mean_recall"]
            assert float(m.group(2)) == pytest.approx(run["mean_recall"] - base, abs=0.0051)


def test_rerun_trains_and_evaluates_nothing(data, first):
    runs = {r["run_dir"] for r in runs_of(first["rows"]) if r["status"] == "ok"}
    before = {d: _files(Path(d)) for d in runs}
    out = run(ablate_cmd(data), expect=1)
    rows = last_json(out)
    for d in runs:
        assert _files(Path(d)) == before[d], f"{d} was touched by the rerun"
    ok = [r for r in runs_of(rows) if r["status"] == "ok"]
    assert len(ok) == 4 and not any(r["trained"] or r["evaluated"] for r in ok)
    assert out.count("already finished at step 2") == 4
    strip = ("trained", "evaluated")
    # Reused runs give the same config rows, statistics and differences included.
    def strip_flags(config_rows):
        return [{**r, "runs": [{k: v for k, v in run.items() if k not in strip} for run in r["runs"]]}
                for r in config_rows]

    assert strip_flags(rows[:2]) == strip_flags(first["rows"][:2])


def test_submit_dry_run_prints_the_array(data, first):
    out = run([*ablate_cmd(data), "--submit", "--dry-run", "--partition", "debug", "--time", "00:30:00"])
    # The 4 finished runs are not resubmitted: only the diverging config's two seeds form the array.
    assert re.search(r"#SBATCH --array=0-1", out), out
    assert out.count("# task ") == 2 and "diverging seed 1" in out
    assert not (data["root"] / "abl" / "slurm").exists()


def test_changed_checkpoint_is_reevaluated(data, first):
    # A longer run of one config: refused without --force (the run dir holds another config), then continued.
    cmd = [sys.executable, "-m", "unimlip_train.cli.ablate", "--configs", ABLATIONS / "clip_only.yaml",
           "--data", data["shards"], "--run-root", data["root"] / "abl", "--steps", "3", "--seeds", "0",
           f"model.tokenizer={data['tok']}", "model.embed_dim=32", *TINY]
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    assert done.returncode == 2 and "train.steps: 2 -> 3" in done.stderr and "--force" in done.stderr
    row = last_json(run(cmd + ["--force"]))[0]["runs"][0]
    assert row["step"] == 3 and row["trained"] and row["evaluated"] and row["status"] == "ok"
    old = first["rows"][0]["runs"][0]
    assert row["checkpoint"] != old["checkpoint"]


def test_bad_input_stops_before_training(data, tmp_path, capsys):
    from unimlip_train.cli.ablate import build_parser, main

    common = ["--data", str(data["shards"]), "--run-root", str(tmp_path / "abl"), "--steps", "2"]
    assert main(["--configs", str(ABLATIONS / "clip_only.yaml"), *common, "model.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["--configs", str(ABLATIONS / "clip_only.yaml"), str(ABLATIONS / "all.yaml"), *common,
                 "--seeds", "0", "seed=3"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["--configs", str(ABLATIONS / "clip_only.yaml"), str(ABLATIONS / "all.yaml"), *common,
                 "--baseline", "clip"]) == 2
    assert "--baseline 'clip' is not among the configs (choices: clip_only, all)" in capsys.readouterr().err
    assert not (tmp_path / "abl").exists()  # nothing started
    help_text = build_parser().format_help()
    for text in ("--configs", "--run-root", "--seeds", "--baseline", "--submit", "ablation.json", "ablation.md",
                 "delta_M_ci95", "key.sub=value"):
        assert text in help_text


@pytest.mark.slurm
def test_submit_runs_an_array_on_slurm(data, request, tmp_path):
    """Two configs as one array of 2-rank CPU tasks; each task trains and evaluates, the table is built after."""
    partition = request.getfixturevalue("cluster")
    cmd = [sys.executable, "-m", "unimlip_train.cli.ablate", "--configs", ABLATIONS / "clip_only.yaml",
           ABLATIONS / "all.yaml", "--data", data["shards"], "--run-root", tmp_path / "abl", "--steps", "2",
           "--submit", "--wait", "--partition", partition, "--time", "00:15:00", "--tasks-per-node", "2",
           "--cpus-per-task", "1", f"model.tokenizer={data['tok']}", "model.embed_dim=32", *TINY]
    out = run(cmd)
    ids = re.findall(r"job_id (\d+_\d+)", out)
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1  # one array, two tasks
    assert [sacct_state(i) for i in ids] == ["COMPLETED", "COMPLETED"]
    rows = runs_of(last_json(out))
    assert [(r["config"], r["status"], r["step"]) for r in rows] == [("clip_only", "ok", 2), ("all", "ok", 2)]
    # The array tasks trained and evaluated; the table read their results.
    assert all(r["trained"] and not r["evaluated"] for r in rows)
    reference = last_json(run([sys.executable, "-m", "unimlip_train.cli.eval", "retrieval", "--checkpoint",
                               rows[1]["checkpoint"], "--data", data["shards"], "--workers", "1"]))
    assert reference.pop("card")["checkpoint"] == rows[1]["card"]["checkpoint"]
    assert all(rows[1][k] == pytest.approx(v, rel=1e-9, abs=1e-9) for k, v in reference.items())

    again = run(cmd)  # everything finished: nothing is submitted, the table is the same
    assert "nothing to submit" in again and "job_id" not in again
    assert [{**r, "trained": True} for r in runs_of(last_json(again))] == rows
