"""Test environment: offline, CPU DeepSpeed, quiet albumentations, one thread per process."""
import os
import sys
from pathlib import Path

_ENV = {
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"),
}
for _k, _v in _ENV.items():
    os.environ.setdefault(_k, _v)
# The venv's bin first: console scripts and torchrun resolve to this interpreter, and DeepSpeed's JIT op
# always sees the same ninja (a different ninja forces a ~30 s rebuild).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

REPO = Path(__file__).resolve().parent.parent
# Real test data kept in the repository (licences and sources: tests/data/README.md).
TEST_DATA = REPO / "tests" / "data"
IU_REPORTS_TGZ = TEST_DATA / "iu_xray_reports" / "NLMCXR_reports.tgz"  # IU X-ray reports, CC BY-NC-ND 4.0
PNEUMONIAMNIST_NPZ = TEST_DATA / "pneumoniamnist" / "pneumoniamnist_subset.npz"  # CC BY 4.0
