"""2-rank evaluation equals 1-rank evaluation exactly (torchrun, gloo, uneven per-rank sample counts).

Real tar shards of real chest X-rays (PneumoniaMNIST) paired with real report text (IU X-ray), a tiny
random-init model written as an exported checkpoint folder, and one torchrun launch per world size running
this very file as the worker: validate(), the zero-shot and linear-probe commands, and the retrieval CLI.
"""
import json
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import IU_REPORTS_TGZ, PNEUMONIAMNIST_NPZ

REPO = Path(__file__).resolve().parent.parent
N_SAMPLES = 37  # prime: no world size / batch size / shard size divides it


def _reports(n: int) -> list[str]:
    """The first ``n`` IU X-ray reports with findings, as 'FINDINGS: ... IMPRESSION: ...' text."""
    out = []
    with tarfile.open(IU_REPORTS_TGZ) as tar:
        for member in sorted((m for m in tar.getmembers() if m.name.endswith(".xml")),
                             key=lambda m: int(Path(m.name).stem)):
            root = ET.fromstring(tar.extractfile(member).read())
            sec = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
            if sec.get("FINDINGS"):
                out.append(f"FINDINGS: {sec['FINDINGS']} IMPRESSION: {sec.get('IMPRESSION', '')}")
            if len(out) == n:
                return out
    raise AssertionError("not enough IU reports")


def _write_dataset(root: Path) -> tuple[Path, Path]:
    """Shards (train + val splits, several small shards) and a tokenizer trained on them."""
    from PIL import Image

    from data_prep.options import WriterOptions
    from data_prep.tokenizer_build import build_tokenizer
    from data_prep.writer import write_shards
    from unimlip_train.format.rows import Row

    npz = np.load(PNEUMONIAMNIST_NPZ)
    reports = _reports(30)
    reports[3] = reports[4] = reports[5]  # duplicate reports exercise the retrieval duplicate rule
    by_class = [np.flatnonzero(npz["train_labels"][:, 0] == c) for c in (0, 1)]
    rows = []
    for i in range(N_SAMPLES):
        j = by_class[i % 2][i // 2]  # alternate normal / pneumonia
        path = root / "png" / f"cxr{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(npz["train_images"][j]).save(path)
        label = "pneumonia" if i % 2 else "normal"
        rows.append(Row(id=f"cxr{i:03d}", image=str(path), text=reports[i % len(reports)], labels=[label]))
    shards = root / "shards"
    write_shards(rows, shards, WriterOptions(val_fraction=0.35, shard_size=4, max_size=64, workers=1), "test",
                 {}, progress=False)
    build_tokenizer(shards, root / "tok", vocab_size=300)
    return shards, root / "tok"


def _export_tiny_model(root: Path, shards: Path, tok_dir: Path) -> Path:
    """An exported checkpoint folder (model.safetensors + config.yaml + tokenizer/) of a random-init tiny model."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from unimlip_train.config.load import dump_yaml, load_config
    from unimlip_train.data.tokenizer import load_tokenizer
    from unimlip_train.models.build import build_model

    cfg = load_config(str(REPO / "configs" / "tiny_cpu.yaml"),
                      [f"data.train={shards}", f"data.val={shards}", "data.image_size=32", "data.num_workers=1",
                       "eval.classes=[normal, pneumonia]", "train.micro_batch_size=5"])
    tokenizer = load_tokenizer(str(tok_dir))
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    out = root / "export"
    out.mkdir()
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.yaml").write_text(dump_yaml(cfg))
    shutil.copytree(tok_dir, out / "tokenizer")
    return out


def worker(export_dir: str, shards: str, out_dir: str) -> None:
    """Run under torchrun: every evaluation entry point, results written per rank."""
    import torch

    import unimlip_train.cli.eval as cli
    import unimlip_train.eval.run as eval_run
    from unimlip_train.distributed.process_group import init_distributed
    from unimlip_train.eval.embed import embed_split
    from unimlip_train.eval.validate import validate
    from unimlip_train.export import load_for_eval

    rank, world, _ = init_distributed()
    model, cfg, tokenizer = load_for_eval(export_dir)
    result = {"validate": validate(model, cfg, tokenizer, rank, world)}
    emb = embed_split(model, cfg, tokenizer, shards, "val", rank, world, batch_size=3)
    result["keys"] = emb.keys
    result["image"] = emb.image.tolist()
    result["text"] = emb.text.tolist()
    parser = cli.build_parser()
    common = ["--checkpoint", export_dir, "--data", shards, "--batch-size", "3"]
    zs = parser.parse_args(["zeroshot", *common, "--classes", "normal,pneumonia"])
    result["zeroshot"] = eval_run.run_zeroshot(zs, model, cfg, tokenizer, rank, world, False)["metrics"]
    ml = parser.parse_args(["zeroshot", *common, "--classes", "normal,pneumonia", "--multi-label", "--split", "train"])
    result["multilabel"] = eval_run.run_zeroshot(ml, model, cfg, tokenizer, rank, world, False)["metrics"]
    lp = parser.parse_args(["linear-probe", *common])
    result["probe"] = eval_run.run_linear_probe(lp, model, cfg, tokenizer, rank, world, False)["metrics"]
    result["world"] = world
    if world > 1:
        # One rank failing mid-embedding: every rank raises its error instead of waiting in the gather.
        class FailsOnRank1(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def encode_image(self, image):
                if rank == 1:
                    raise RuntimeError("cannot embed this shard")
                return model.encode_image(image)

            def encode_text(self, ids, mask):
                return model.encode_text(ids, mask)

        try:
            embed_split(FailsOnRank1(), cfg, tokenizer, shards, "val", rank, world, batch_size=3)
        except RuntimeError as e:
            result["failure"] = str(e)
        # ZeRO-3 as the trainer runs it: partitioned weights gathered around validate(), uneven per-rank counts.
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1,
                                                                "zero_optimization": {"stage": 3}})
        assert all(hasattr(p, "ds_id") for p in engine.module.parameters())
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            result["validate_zero3"] = validate(engine, cfg, tokenizer, rank, world)
    torch.distributed.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    # The console command last: it prints the table and JSON (rank 0) and ends the process group.
    cli.main(["retrieval", *common, "--out", str(Path(out_dir, "cli_retrieval.json"))])


def _launch(nproc: int, export_dir: Path, shards: Path, out_dir: Path) -> subprocess.Popen:
    out_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__, str(export_dir), str(shards), str(out_dir)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.mark.multiprocess
def test_two_ranks_equal_one_rank(tmp_path):
    shards, tok_dir = _write_dataset(tmp_path)
    index = json.loads((shards / "index.json").read_text())
    sizes = {s: v["samples"] for s, v in index["splits"].items()}
    assert sizes["val"] % 2 == 1 and sizes["train"] >= 10  # uneven per-rank counts
    export_dir = _export_tiny_model(tmp_path, shards, tok_dir)
    procs = {nproc: _launch(nproc, export_dir, shards, tmp_path / f"w{nproc}") for nproc in (1, 2)}  # concurrently
    try:
        outputs = {nproc: proc.communicate(timeout=400) for nproc, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    runs = {}
    for nproc, (stdout, stderr) in outputs.items():
        assert procs[nproc].returncode == 0, stdout[-3000:] + stderr[-5000:]
        ranks = [json.loads((tmp_path / f"w{nproc}" / f"rank{r}.json").read_text()) for r in range(nproc)]
        for other in ranks[1:]:  # every rank returns the same thing
            assert other == ranks[0]
        runs[nproc] = ranks[0]
        last = stdout.strip().splitlines()[-1]
        cli_json = json.loads(last)
        assert cli_json == json.loads((tmp_path / f"w{nproc}" / "cli_retrieval.json").read_text())
        runs[nproc]["cli"] = cli_json
        assert "image -> text" in stdout  # the readable table came first
    one, two = runs[1], runs[2]
    assert one["keys"] == sorted(one["keys"]) and len(one["keys"]) == sizes["val"]
    assert one["keys"] == two["keys"]
    assert one["image"] == two["image"] and one["text"] == two["text"]  # bit-identical embeddings
    for part in ("validate", "zeroshot", "multilabel", "probe", "cli"):
        assert one[part] == two[part], part
    assert two["validate_zero3"] == one["validate"]
    assert two["failure"] == "evaluation failed on 1 rank(s): rank 1: RuntimeError: cannot embed this shard"
    v = one["validate"]
    assert {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall", "median_rank_i2t",
            "median_rank_t2i", "chance_R@1", "zeroshot/accuracy", "zeroshot/auroc"} <= set(v)
    assert v["num_samples"] == sizes["val"]
    assert one["zeroshot"]["num_samples"] == sizes["val"] and one["multilabel"]["num_samples"] == sizes["train"]
    assert {"i2t_R@1", "t2i_R@10", "mean_recall"} <= set(one["cli"])


if __name__ == "__main__":
    worker(*sys.argv[1:4])
