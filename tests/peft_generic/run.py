"""Run PEFT's own generic tuner tests (``tests/test_custom_models.py`` of the installed PEFT's sdist) on peft-sam's
tuners: the file's ``TEST_CASES`` are replaced by the cases below, everything else is PEFT's code as released.

    pip install diffusers                      # PEFT's testing_common imports it
    HF_HUB_OFFLINE=1 python tests/peft_generic/run.py [--workdir DIR] [-- extra pytest args]

Downloads the sdist from the package index (nothing else; tests that need the Hub fail offline and are listed
apart). Not part of the CI test command: it takes ~2 minutes and a download. Known results: docs/calisr.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

CASES = """
import peft
import peft_sam
from peft_sam import CaliSrConfig, MPOConfig, SAMConfig

TEST_CASES = [
    ("SAM MLP random", "MLP", SAMConfig, {"target_modules": ["lin0"], "p": 0.1, "selection": "random"}),
    ("SAM MLP magnitude both", "MLP", SAMConfig, {"target_modules": ["lin0", "lin1"], "p": 0.1,
                                                  "selection": "magnitude"}),
    ("SAM MLP mts", "MLP", SAMConfig, {"target_modules": ["lin0"], "p": 0.1, "selection": "random",
                                       "modules_to_save": ["lin1"]}),
    ("SAM EmbConv1D", "EmbConv1D", SAMConfig, {"target_modules": ["emb", "conv1d"], "p": 0.1, "selection": "random"}),
    ("SAM MLP_LayerNorm", "MLP_LayerNorm", SAMConfig, {"p": 0.1, "selection": "random"}),
    ("MPO MLP", "MLP", MPOConfig, {"target_modules": ["lin0"]}),
    ("MPO MLP both", "MLP", MPOConfig, {"target_modules": ["lin0", "lin1"]}),
    ("MPO EmbConv1D", "EmbConv1D", MPOConfig, {"target_modules": ["conv1d"]}),
    ("CaliSr LoRA MLP", "MLP", CaliSrConfig, {"adapter": peft.LoraConfig(target_modules=["lin0"])}),
    ("CaliSr LoRA MLP both", "MLP", CaliSrConfig, {"adapter": peft.LoraConfig(target_modules=["lin0", "lin1"])}),
    ("CaliSr SAM MLP", "MLP", CaliSrConfig, {"adapter": SAMConfig(target_modules=["lin0"], p=0.1, selection="random")}),
    ("CaliSr MPO MLP", "MLP", CaliSrConfig, {"adapter": MPOConfig(target_modules=["lin0"])}),
    ("CaliSr LoRA EmbConv1D", "EmbConv1D", CaliSrConfig,
     {"adapter": peft.LoraConfig(target_modules=["emb", "conv1d"])}),
]
"""
OURS = ("SAMConfig", "MPOConfig", "CaliSrConfig", "SAM ", "MPO ", "CaliSr ")


def prepare(workdir: Path) -> Path:
    """Download and unpack the installed PEFT's sdist; write the test file with our cases. Returns its path."""
    version = importlib.metadata.version("peft")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            f"peft=={version}",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            str(workdir),
        ],
        check=True,
    )
    with tarfile.open(next(workdir.glob(f"peft-{version}.tar.gz"))) as archive:
        archive.extractall(workdir, filter="data")
    tests = workdir / f"peft-{version}" / "tests"
    (tests / "__init__.py").touch()  # the files import each other relatively
    source = (tests / "test_custom_models.py").read_text()
    start, end = source.index("TEST_CASES = ["), source.index("ALL_PEFT_CONFIG_CLASSES = ")
    source = source[:start] + CASES + "\n" + source[end:]
    start = source.index("MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [")
    end = source.index("\n]\n", start) + 3
    source = source[:start] + "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = []\n" + source[end:]
    target = tests / "test_peft_sam_generic.py"
    target.write_text(source)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where to unpack PEFT (default: a temp dir)")
    args, pytest_args = parser.parse_known_args()
    if importlib.util.find_spec("diffusers") is None:
        sys.exit("PEFT's tests/testing_common.py imports diffusers: pip install diffusers first.")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peft_generic_"))
    workdir.mkdir(parents=True, exist_ok=True)
    test_file = prepare(workdir)
    report = workdir / "junit.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            str(test_file),
            "-k",
            "TestPeftCustomModel",
            f"--junitxml={report}",
            *[a for a in pytest_args if a != "--"],
        ],
        cwd=test_file.parent.parent,
    )
    cases = ET.parse(report).getroot().iter("testcase")
    passed, failed = 0, {"ours": [], "other": []}
    for case in cases:
        if case.find("failure") is not None or case.find("error") is not None:
            name = case.get("name", "")
            failed["ours" if any(tag in name for tag in OURS) else "other"].append(name)
        elif case.find("skipped") is None:
            passed += 1
    print(f"\npassed {passed}; failed with a peft-sam case {len(failed['ours'])}, others {len(failed['other'])}")
    for name in failed["ours"]:
        print("  ours: ", name)
    for name in failed["other"]:
        print("  other:", name)
    return 1 if failed["ours"] else 0


if __name__ == "__main__":
    sys.exit(main())
